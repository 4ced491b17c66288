"""Interpretation outputs: impact, top samples, top logits, interventions and the written files,
checked against brute force on small models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from l3d import Decomposition, L3DError, decompose
from l3d.analysis import (
    AnalysisOptions,
    InterventionEffect,
    generate,
    top_logits,
    top_sample_purity,
    top_samples,
    write_analysis,
)
from l3d.analysis.quantities import generate_ids
from l3d.core.divergences import kl
from l3d.core.samples import SampleRows


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(24, 6)
    d = decompose(
        net,
        x,
        params=["0.weight", "2.*"],
        n_subnetworks=4,
        rank=2,
        epochs=3,
        batch_size=8,
        divergence="kl",
        progress=False,
    )
    return d, x


def brute_force_coefficients(d, x, references):
    """c_ik = <V_in_k, grad_W KL(p_ref_i || p_i)> by a loop of backward calls."""
    params = dict(d.model.named_parameters())
    v_in = d.subnetworks.v_in.materialize()
    rows = []
    for i in range(len(x)):
        d.model.zero_grad()
        kl(d.model(x[i : i + 1])[0], references[i]).backward()
        rows.append(sum((v_in[n] * params[n].grad).flatten(1).sum(1) for n in d.names))
    return torch.stack(rows)


def test_impact_is_mean_of_absolute_coefficients_over_references(classifier):
    d, x = classifier
    impact = d.impact(x, n_references=3, seed=5, chunk_size=len(x))
    per_reference = [d.coefficients(x, seed=5 + j) for j in range(3)]
    assert torch.allclose(impact, torch.stack(per_reference).abs().mean(0), atol=1e-6)
    # Absolute value before the mean (eq. 10-11), not |mean|: the two differ here.
    assert not torch.allclose(impact, torch.stack(per_reference).mean(0).abs(), atol=1e-4)


def test_impact_from_factors_equals_impact_from_dense_gradients_and_directions(classifier):
    d, x = classifier
    factored = d.impact(x, n_references=2, seed=1, chunk_size=len(x))
    source = d.gradient_source(x)
    v_in = {n: t.flatten(1) for n, t in d.subnetworks.v_in.materialize().items()}
    dense = 0
    for j in range(2):
        grads = source.batch(x, None, torch.Generator().manual_seed(1 + j)).dense()
        dense = dense + sum(grads[n].flatten(1) @ v.T for n, v in v_in.items()).abs()
    assert torch.allclose(factored, dense / 2, atol=1e-5)


def test_impact_matches_brute_force_with_a_fixed_reference(classifier):
    d, x = classifier
    uniform = Decomposition(  # the same subnetworks with the uniform distribution as reference
        d.config, d.subnetworks, d.history, d.evaluation, d.model,
        reference=lambda outputs, generator: torch.zeros_like(outputs),
    )  # fmt: skip
    impact = uniform.impact(x, n_references=2, chunk_size=5)  # chunks 5,5,5,5,4
    expected = brute_force_coefficients(d, x, torch.zeros(len(x), 5)).abs()
    assert impact.shape == (24, 4)
    assert torch.allclose(impact, expected, atol=1e-5)


def test_random_baseline_directions_have_the_same_shapes_and_unit_norm(classifier):
    d, _ = classifier
    baseline = d.subnetworks.v_out.random_like(seed=3)
    assert baseline.shapes == d.subnetworks.v_out.shapes
    assert baseline.ranks == d.subnetworks.v_out.ranks
    assert torch.allclose(baseline.sq_norms(), torch.ones(4), atol=1e-5)


def test_top_samples_and_purity_against_hand_computed_values():
    impact = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.0, 0.6], [0.5, 0.3]])
    assert top_samples(impact, 3).tolist() == [[0, 1, 4], [2, 3, 4]]
    purity = top_sample_purity(impact, ["a", "a", "b", "b", "b"], n_top=3)
    assert purity.tolist() == pytest.approx([2 / 3, 1.0])


def test_top_logits_equal_finite_differences_of_the_softmax(classifier):
    d, x = classifier
    samples = torch.tensor([3, 7, 11])
    derivative = d.output_derivative(x, 2, samples)
    eps = 1e-3
    plus = F.softmax(d.intervene(x[samples], 2, eps), -1)
    minus = F.softmax(d.intervene(x[samples], 2, -eps), -1)
    assert torch.allclose(derivative, (plus - minus) / (2 * eps), atol=1e-4)
    logits = top_logits(d, x, 2, samples, n_logits=5)
    mean = derivative.mean(0)
    up_i, up_v = logits["positive"]
    down_i, down_v = logits["negative"]
    assert set(up_i.tolist()) == set(torch.nonzero(mean > 0).flatten().tolist())
    assert set(down_i.tolist()) == set(torch.nonzero(mean < 0).flatten().tolist())
    assert torch.allclose(up_v, mean[up_i]) and (up_v[:-1] >= up_v[1:]).all()
    assert torch.allclose(down_v, mean[down_i]) and (down_v[:-1] <= down_v[1:]).all()
    # softmax sums to one, so its derivative sums to zero
    assert abs(float(mean.sum())) < 1e-6


def test_intervention_effect_and_weights_restored(classifier):
    d, x = classifier
    before = {n: p.detach().clone() for n, p in d.model.named_parameters()}
    samples = torch.arange(6)
    with d.perturbed(1, 0.5) as model:
        moved = model(x[:6])
    for n, p in d.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert torch.allclose(moved, d.intervene(x[:6], 1, 0.5), atol=1e-6)
    p0 = F.log_softmax(d.model(x[:6]), -1)
    expected = (p0.exp() * (p0 - F.log_softmax(moved, -1))).sum(-1)
    effects = d.output_change(x, 1, [0.0, 0.5], samples)
    assert effects.shape == (2, 6)
    assert torch.allclose(effects[0], torch.zeros(6), atol=1e-6)
    assert torch.allclose(effects[1], expected.detach(), atol=1e-6)


def test_write_analysis_files_sorted_by_p_active_with_dead_flags(classifier, tmp_path):
    d, x = classifier
    p_active = torch.tensor([0.2, 0.0, 0.5, 0.1])
    evaluation = dataclasses.replace(d.evaluation, p_active=p_active)
    dead = Decomposition(d.config, d.subnetworks, d.history, evaluation, d.model)
    labels = [i % 3 for i in range(len(x))]
    result = write_analysis(
        dead, x, tmp_path, labels=labels, class_names=["zero", "one", "two"],
        options=AnalysisOptions(n_top=4, n_references=2, progress=False),
    )  # fmt: skip
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [s["index"] for s in saved["subnetworks"]] == [2, 0, 3, 1]
    assert [s["dead"] for s in saved["subnetworks"]] == [False, False, False, True]
    assert saved["summary"]["n_dead"] == 1
    first = saved["subnetworks"][0]
    assert len(first["top_samples"]) == 4
    assert {e["label"] for e in first["top_samples"]} <= {"zero", "one", "two"}
    impacts_listed = [e["impact"] for e in first["top_samples"]]
    assert impacts_listed == sorted(impacts_listed, reverse=True)
    assert all(t["value"] > 0 for t in first["top_logits"]["positive"])
    assert all(t["value"] < 0 for t in first["top_logits"]["negative"])
    assert 0 < saved["summary"]["purity"] <= 1 and "purity_random_directions" in saved["summary"]
    assert (tmp_path / "p_active.png").stat().st_size > 0
    saved_impact = load_file(str(tmp_path / "impact.safetensors"))
    assert saved_impact["impact"].shape == saved_impact["impact_random_directions"].shape == (24, 4)
    top = [e["sample"] for e in first["top_samples"]]
    assert saved_impact["impact"][:, 2].topk(4).indices.tolist() == top
    text = (tmp_path / "analysis.md").read_text()
    assert "Subnetwork 2: P_act 0.5000" in text and "**dead**" in text


def test_write_analysis_on_images_saves_grids(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x = torch.randn(10, 1, 8, 8)
    d = decompose(
        net, x, params=["0.*"], n_subnetworks=2, rank=1, epochs=1, divergence="kl", progress=False
    )
    options = AnalysisOptions(n_top=3, n_references=1, progress=False)
    result = write_analysis(d, x, tmp_path, options=options)
    for record in result["subnetworks"]:
        assert (tmp_path / record["grid"]).is_file()
        for e in record["top_samples"]:
            assert (tmp_path / e["image"]).is_file() and e["text"] is None


@pytest.mark.parametrize("padding", ["right", "left"])
def test_per_token_samples_show_token_with_left_context_and_logits_match(tmp_path, padding):
    """Contexts and generation prompts hold the sample's real tokens: left padding showed (and
    generated from) the pad tokens before them."""
    pytest.importorskip("transformers")
    from l3d import hf
    from test_hf import BLOCK, WORDS, tiny_config

    model = hf.random_causal_lm(tiny_config(), seed=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, len(WORDS), (6, 5), generator=g)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[::2, 3:] = 0
    else:
        mask[::2, :2] = 0
    data = {"input_ids": ids, "attention_mask": mask}

    def tokens(row: int, end: int) -> torch.Tensor:
        """The row's real (unpadded) token ids before position `end`."""
        return ids[row, :end][mask[row, :end].bool()]

    d = decompose(
        model, data, params=BLOCK, n_subnetworks=2, rank=1, epochs=1, batch_size=3,
        divergence="kl", per_token=True, progress=False,
    )  # fmt: skip
    positions = SampleRows.of(data, per_token=True).positions(len(ids))
    assert positions.shape[0] == int(mask.sum()) and mask[positions[:, 0], positions[:, 1]].all()

    samples = torch.tensor([0, 4, 9])
    derivative = d.output_derivative(data, 1, samples)
    eps = 1e-3
    plus = F.softmax(d.intervene(data, 1, eps), -1)
    minus = F.softmax(d.intervene(data, 1, -eps), -1)
    rows, cols = positions[samples, 0], positions[samples, 1]
    assert torch.allclose(derivative, ((plus - minus) / (2 * eps))[rows, cols], atol=1e-4)

    class Words:
        def decode(self, token_ids):
            return " ".join(WORDS[i] for i in token_ids)

    options = AnalysisOptions(n_top=3, n_references=1, progress=False)
    result = write_analysis(d, data, tmp_path, tokenizer=Words(), options=options)
    for e in result["subnetworks"][0]["top_samples"]:
        row, pos = positions[e["sample"]].tolist()
        assert e["token"] == WORDS[ids[row, pos]]
        assert e["text"] == " ".join(WORDS[i] for i in tokens(row, pos).tolist())
        assert mask[row, pos]

    class Tokenizer(Words):
        pad_token_id = 0

        def __call__(self, text, return_tensors):
            return {"input_ids": torch.tensor([[WORDS.index(w) for w in text.split()]])}

    base = generate(d, Tokenizer(), "once upon a", max_new_tokens=3)
    assert len(base.split()) == 3
    assert generate(d, Tokenizer(), "once upon a", k=0, delta=0.0, max_new_tokens=3) == base
    # Near the end of the model's context, only the positions left are generated (the
    # synthetic-transformer demo's 12-token model used to end in an IndexError from its
    # position embedding); a prompt that fills the context gets none.
    context = model.config.max_position_embeddings
    near_end = torch.randint(2, len(WORDS), (context - 2,), generator=torch.Generator())
    assert len(generate_ids(d, near_end, max_new_tokens=8)) == 2
    assert generate_ids(d, torch.cat([near_end, near_end[:2]]), max_new_tokens=8) == []

    # Continuations of each live subnetwork's top samples at W0 - δ v_k, W0, W0 + δ v_k, against a
    # loop of argmax steps on the moved model (eos masked: the columns have equal length).
    eos = model.config.eos_token_id

    def greedy(prompt: torch.Tensor, k: int, delta: float, n: int) -> str:
        out = prompt.clone()
        with d.perturbed(k, delta):
            for _ in range(n):
                logits = model(out[None]).logits[0, -1]
                if eos is not None:
                    logits[eos] = -float("inf")
                out = torch.cat([out, logits.argmax()[None]])
        return Words().decode(out[len(prompt) :].tolist())

    delta = options.generation_scale * d.weight_norm()
    assert result["summary"]["generation_delta"] == pytest.approx(delta)
    live = [r for r in result["subnetworks"] if not r["dead"]]
    assert live and all(1 <= len(r["generations"]) <= 2 for r in live)
    for r in live:
        prompts = [g["prompt"] for g in r["generations"]]
        assert len(set(prompts)) == len(prompts)  # distinct contexts
        for g in r["generations"]:
            row, pos = positions[g["sample"]].tolist()
            prompt = tokens(row, pos + 1)
            assert g["prompt"] == Words().decode(prompt.tolist())
            n = options.generation_tokens
            with torch.no_grad():
                assert g["zero"] == greedy(prompt, r["index"], 0.0, n)
                assert g["plus"] == greedy(prompt, r["index"], delta, n)
                assert g["minus"] == greedy(prompt, r["index"], -delta, n)


class _Offset(nn.Module):
    """`net`'s outputs times `scale` plus `offset`: with a large offset and a small scale, every
    intervention moves the outputs by less than their float32 round-off."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.scale, self.offset = 1.0, 0.0

    def forward(self, x):
        return self.net(x) * self.scale + self.offset


@pytest.fixture(scope="module")
def round_off():
    """A decomposition whose interventions change the outputs at round-off level only."""
    torch.manual_seed(0)
    model = _Offset(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)))
    x = torch.randn(40, 6)
    d = decompose(
        model, x, params=["net.0.weight", "net.2.*"], n_subnetworks=3, epochs=1, batch_size=8,
        divergence="kl", progress=False,
    )  # fmt: skip
    model.scale, model.offset = 1e-4, 1e3
    return d, x


def test_output_change_at_round_off_is_non_negative_and_below_the_noise_floor(round_off):
    d, x = round_off
    changes, floor = d.output_change_and_floor(x, 0, [-1.0, 1.0])
    assert (changes >= 0).all()
    # The documented rule: (100 ulps of the largest |output|, at least 1 for probabilities)^2.
    eps = torch.finfo(torch.float32).eps
    scale = float(d.intervene(x, 0, 0.0).abs().max())
    assert floor == pytest.approx((100 * eps * scale) ** 2)
    assert float(changes.max()) < floor
    torch.testing.assert_close(changes, d.output_change(x, 0, [-1.0, 1.0]))


def test_intervention_selectivity_below_noise_is_none_not_a_ratio():
    effect = InterventionEffect(0.1, top=(2e-9, 3e-9), random=(0.0, 1e-12), noise_floor=1e-8)
    assert effect.below_noise and effect.selectivity is None
    off_target_quiet = InterventionEffect(
        0.1, top=(0.5, 0.4), random=(1e-12, 0.0), noise_floor=1e-8
    )
    assert off_target_quiet.below_noise and off_target_quiet.selectivity is None
    measured = InterventionEffect(0.1, top=(0.5, 0.4), random=(0.2, 0.1), noise_floor=1e-8)
    assert not measured.below_noise and measured.selectivity == pytest.approx(2.5)
    quiet_on_top = InterventionEffect(0.1, top=(0.0, 1e-9), random=(0.2, 0.1), noise_floor=1e-8)
    assert not quiet_on_top.below_noise and quiet_on_top.selectivity == pytest.approx(5e-9)


def test_write_analysis_reports_round_off_interventions_as_below_noise(round_off, tmp_path):
    d, x = round_off
    options = AnalysisOptions(n_top=4, n_references=1, progress=False)
    result = write_analysis(d, x, tmp_path, options=options)
    summary = json.loads((tmp_path / "analysis.json").read_text())["summary"]
    live = [r for r in result["subnetworks"] if not r["dead"]]
    assert live
    for r in result["subnetworks"]:
        i = r["intervention"]
        assert i["below_noise"] and i["selectivity"] is None and i["noise_floor"] > 0
        assert min(*i["top_samples"].values(), *i["random_samples"].values()) >= 0
    assert summary["median_intervention_selectivity"] is None
    assert summary["n_intervention_below_noise"] == len(live)
    text = (tmp_path / "analysis.md").read_text()
    assert "below noise" in text and f"{len(live)} of {len(live)} live" in text


def test_write_analysis_median_selectivity_skips_below_noise(classifier, tmp_path):
    d, x = classifier
    options = AnalysisOptions(n_top=4, n_references=1, progress=False)
    result = write_analysis(d, x, tmp_path, options=options)
    summary = result["summary"]
    ratios = [r["intervention"]["selectivity"] for r in result["subnetworks"] if not r["dead"]]
    assert summary["n_intervention_below_noise"] == 0 and None not in ratios
    assert summary["median_intervention_selectivity"] == pytest.approx(
        float(torch.tensor(ratios).median())
    )
    for r in result["subnetworks"]:
        i = r["intervention"]
        assert i["top_samples"]["plus"] > 1e4 * i["noise_floor"]  # real changes: far above it
    assert "Median intervention selectivity" in (tmp_path / "analysis.md").read_text()


def test_write_analysis_shows_a_progress_bar_over_subnetworks(classifier, tmp_path, capsys):
    d, x = classifier
    write_analysis(d, x, tmp_path, options=AnalysisOptions(n_top=2, n_references=1))
    err = capsys.readouterr().err
    assert "analysis" in err and "4/4" in err and "subnetwork" in err
    write_analysis(d, x, tmp_path, options=AnalysisOptions(n_top=2, n_references=1, progress=False))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_top", 0),  # wrote a NaN median selectivity into analysis.json
        ("n_references", 0),
        ("n_logits", -1),
        ("intervention_scale", 0.0),  # every intervention "below noise", silently
        ("intervention_scale", float("nan")),
        ("generation_scale", float("inf")),
        ("n_generations", -1),
        ("generation_tokens", 0),
        ("chunk_size", 0),
    ],
)
def test_analysis_options_out_of_range_are_one_line_errors(field, value):
    from l3d import L3DError

    with pytest.raises(L3DError, match=rf"AnalysisOptions\.{field} must be .*; got {value}") as err:
        AnalysisOptions(**{field: value})
    assert "\n" not in str(err.value)


def test_analysis_markdown_shows_odd_tokens_as_written():
    """analysis.md wrote tokens raw: '<script>' and '</td>' vanished in a Markdown viewer, '&amp;'
    showed as '&', a right-to-left override reversed the rest of the line."""
    from l3d.analysis.writing import _cell

    assert _cell("<script>&amp;") == "&lt;script&gt;&amp;amp;"
    assert _cell("a|b\nc`") == "a\\|b⏎c'"
    assert _cell("x\u202ey") == "x\\u202ey" and _cell("\x02", code=True) == "\\x02"
    assert _cell("<b>", code=True) == "<b>"  # a code span shows it literally


def test_selectivity_compares_the_top_samples_with_the_others(classifier, tmp_path):
    """The random baseline held the top samples too: with every sample among the random ones
    (24 here, fewer than the 64 drawn) the ratio shrank towards 1, and with n_top at the sample
    count it was exactly 1 (the same samples on both sides), with no word."""
    from l3d.analysis.quantities import intervention_effect

    d, x = classifier
    top, random = torch.tensor([3, 7]), torch.arange(24)
    effect = intervention_effect(d, x, 1, 0.5, top, random)
    change = d.output_change(x, 1, [-0.5, 0.5])  # (2, 24)
    others = torch.ones(24, dtype=torch.bool)
    others[top] = False
    assert effect.random == pytest.approx(tuple(change[:, others].mean(1).tolist()), rel=1e-5)
    assert effect.top == pytest.approx(tuple(change[:, top].mean(1).tolist()), rel=1e-5)
    with pytest.raises(L3DError, match=r"--n-top 24 is not below the 24 samples analysed"):
        write_analysis(d, x, tmp_path / "a", options=AnalysisOptions(n_top=24, progress=False))
    with pytest.raises(L3DError, match=r"no samples to analyse"):
        write_analysis(d, x[:0], tmp_path / "b", options=AnalysisOptions(progress=False))
