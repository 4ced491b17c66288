"""The experiment runner end to end (reduced), the registry, and dead-subnetwork resampling."""

import json
import re

import pytest
import torch

from l3d.config import L3DConfig
from l3d.core.algorithm import evaluate
from l3d.core.resampling import set_direction_, stale_subnetworks
from l3d.core.subnetworks import Subnetworks
from l3d.decomposition import build
from l3d.errors import L3DError
from l3d.experiments import EXPERIMENTS, run_experiment
from l3d.experiments.registry import PROFILES, get_spec, load_experiments, load_profile
from l3d.experiments.suite import results_table
from l3d.toys import TMS, sparse_features
from l3d.toys.registry import TOYS, Toy, get_toy, train_toy_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One toy cache for the module, so the TMS toy is trained once for all tests."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("L3D_CACHE", str(path))
        yield path


def test_registry_names_the_issue_toys():
    assert set(EXPERIMENTS) == {
        "tms",
        "tms40",
        "tmcs",
        "higher_rank",
        "squares",
        "squares_wide",
        "resid_mlp",
    }
    assert list(TOYS) == list(EXPERIMENTS)  # each experiment decomposes the toy of its name
    assert all(spec.toy is TOYS[name] for name, spec in EXPERIMENTS.items())
    with pytest.raises(L3DError, match="did you mean .*tmcs"):
        get_spec("tmsc")


def test_every_shipped_profile_validates_and_follows_the_improved_schedule():
    assert sorted(p.stem for p in PROFILES.glob("*.yaml")) == sorted(["common", *TOYS])
    assert load_experiments(PROFILES) == EXPERIMENTS
    for name, spec in EXPERIMENTS.items():
        for fields in (spec.paper, spec.improved):
            assert L3DConfig.create(params=["*"], **fields).n_subnetworks >= 1
        # docs/toys.md: decay and resample every 10 % of the epochs, resample in the first half
        epochs = spec.improved["epochs"]
        assert spec.improved["lr_decay_every"] == spec.improved["resample_every"] == epochs // 10
        assert spec.improved["resample_until"] == epochs // 2, name
        assert spec.paper["epochs"] == 1000 and spec.paper["lr_decay_unit"] == "step"
    assert EXPERIMENTS["squares"].sweep == ("n_subnetworks", (3, 5, 10, 15))
    assert EXPERIMENTS["squares"].sweep_overrides == {"rank": 1}


@pytest.mark.parametrize(
    "l3d, extra, message",
    [
        ("topk: 0.2", "", r"improved\.l3d: unknown config key 'topk' \(did you mean top_k\?\)$"),
        ("top_k: 2", "", r"improved\.l3d: config key 'top_k': must be in \(0, 1\]"),
        ("seed: 3", "", r"improved\.l3d: 'seed' is set by the experiment runner"),
        ("", "sweeep: {}", r"unknown config key 'sweeep' \(did you mean sweep\?\)$"),
        ("", "sweep: {key: rnak, values: [1]}", r"sweep .*'rnak' \(did you mean rank\?\)$"),
        ("top_k: [0.1", "", r"is not valid YAML at line 3"),
    ],
)
def test_a_profile_typo_is_a_one_line_error_naming_the_file(tmp_path, l3d, extra, message):
    path = tmp_path / "tms.yaml"
    path.write_text(
        "paper: {l3d: {n_subnetworks: 5}}\n"
        f"improved:\n  l3d: {{n_subnetworks: 5, {l3d}}}\n{extra}\n"
    )
    with pytest.raises(L3DError, match=f"^{re.escape(str(path))}:? {message}") as err:
        load_profile(path, TOYS["tms"])
    assert "\n" not in str(err.value)


def test_a_profile_sets_how_many_inputs_are_decomposed(cache, tmp_path):
    """`n_samples` of a settings section: the inputs the decomposition trains on (ResidMLP's
    improved profile: 10,000); without it the paper's 1000; below 2 it is refused."""
    assert get_spec("resid_mlp").inputs_for("improved") == 10_000
    assert get_spec("resid_mlp").inputs_for("paper") == 1000
    path = tmp_path / "tms.yaml"
    path.write_text(
        "paper: {l3d: {n_subnetworks: 5}}\nimproved: {n_samples: 64, l3d: {n_subnetworks: 5}}\n"
    )
    spec = load_profile(path, TOYS["tms"])
    assert spec.inputs_for("improved") == 64 and spec.inputs_for("paper") == 1000
    path.write_text(
        "paper: {l3d: {n_subnetworks: 5}}\nimproved: {n_samples: 1, l3d: {n_subnetworks: 5}}\n"
    )
    with pytest.raises(L3DError, match="n_samples"):
        load_profile(path, TOYS["tms"])


def test_a_profile_folder_needs_one_profile_per_toy(tmp_path):
    for source in PROFILES.glob("*.yaml"):
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "tmss.yaml").write_text((PROFILES / "tms.yaml").read_text())
    with pytest.raises(L3DError, match=r"tmss.yaml: .*unknown toy 'tmss' \(did you mean tms"):
        load_experiments(tmp_path)
    (tmp_path / "tmss.yaml").unlink()
    (tmp_path / "tmcs.yaml").unlink()
    with pytest.raises(L3DError, match="no experiment profile for toy tmcs"):
        load_experiments(tmp_path)


def test_l3d_experiment_passes_every_option(tmp_path, monkeypatch, capsys):
    from l3d import experiments
    from l3d.cli import main

    calls = []

    def run_named(name, seeds, out, **options):
        calls.append((name, seeds, out, options))
        (tmp_path / "summary.md").write_text("| table |")
        return tmp_path / "summary.md"

    monkeypatch.setattr(experiments, "run_named", run_named)
    argv = ["tms", "--seeds", "1,2", "--out", "o", "--settings", "improved", "--quick"]
    assert main(["experiment", *argv, "--no-sweep", "--no-controls", "--set", "top_k=0.2"]) == 0
    assert calls == [
        (
            "tms",
            "1,2",
            "o",
            {
                "settings": "improved",
                "quick": True,
                "sweep": False,
                "progress": True,
                "set_options": ["top_k=0.2"],
                "controls": False,
            },
        )
    ]
    assert "| table |" in capsys.readouterr().out
    assert main(["experiment", "--list"]) == 0 and "resid_mlp" in capsys.readouterr().out


def test_toy_is_trained_once_then_loaded_from_the_cache(cache):
    spec = get_toy("tms")
    first = train_toy_model(spec, 1)
    files = list(cache.glob("toys/tms-seed1-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = train_toy_model(spec, 1)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert (first.model.W_in.norm(dim=0) > 0.5).all()


def test_with_epochs_scales_every_per_epoch_interval():
    from l3d.experiments.runner import QUICK_EPOCHS, settings_for, with_epochs

    improved, paper = EXPERIMENTS["tms"].improved, EXPERIMENTS["tms"].paper
    short = with_epochs(improved, 50)
    assert short == {**improved, "epochs": 50, "lr_decay_every": 5, "resample_every": 5,
                     "resample_until": 25}  # fmt: skip
    assert with_epochs(improved, 2)["resample_every"] == 1  # never 0
    assert with_epochs(paper, 2) == {**paper, "epochs": 2}  # per-step decay stays per step
    assert settings_for(EXPERIMENTS["tms"], "improved", quick=True) == with_epochs(
        improved, QUICK_EPOCHS
    )


def test_each_seed_has_a_stage_for_the_toy_l3d_every_metric_each_sweep_point_and_figures():
    from l3d.experiments.runner import METRIC_STAGES, n_stages

    assert n_stages(EXPERIMENTS["tms"], sweep=True) == 3 + len(METRIC_STAGES)  # no sweep
    assert n_stages(EXPERIMENTS["squares"], sweep=True) == 3 + len(METRIC_STAGES) + 4
    assert n_stages(EXPERIMENTS["squares"], sweep=False) == 3 + len(METRIC_STAGES)
    assert n_stages(EXPERIMENTS["squares"], sweep=False, controls=True) == 5 + len(METRIC_STAGES)


def test_random_network_control_and_cross_seed_stability(cache):
    from l3d.experiments.runner import (
        N_DECOMPOSE,
        control_markdown,
        decompose_toy,
        measure,
        random_control,
        settings_for,
        stability,
    )

    spec = EXPERIMENTS["tms"]
    toy = train_toy_model(spec.toy, 1)
    fields = settings_for(spec, "improved", quick=True)
    inputs = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(10_001))
    decomposition, _ = decompose_toy(toy, fields, 1, inputs)
    trained = measure(spec, toy, decomposition, 1)
    control = random_control(spec, toy, fields, 1, inputs, trained)
    # The control decomposes an untrained TMS: different weights, so different numbers ...
    assert control["control"]["loss_pooled_squared"] != trained["heldout"]["loss_pooled_squared"]
    assert control["trained"]["mean_matched_share"] == pytest.approx(
        sum(trained["recovery"]["matched_share"]) / 5
    )
    # ... and the trained TMS's features are far more selective than a random network's.
    assert (
        control["gain_selectivity"] > 2
        and "selectivity_median_ratio_delta1" not in (control["small_gaps"])
    )
    stable = stability(toy, fields, 1, inputs, decomposition)
    assert stable["second_seed"] == 2 and len(stable["matched_cosines"]) == 5
    assert stable["mmcs"] > 0.9  # TMS's five features are found again from another seed
    lines = "\n".join(control_markdown({"control": {"seed": 1, **control}, "stability": stable}))
    assert "random network" in lines and "Cross-seed stability" in lines


def test_quick_tms_run_recovers_every_feature_and_shows_its_progress(cache, tmp_path, capsys):
    out = tmp_path / "tms"
    report = run_experiment("tms", [1], out, settings="improved", quick=True, progress=True)
    # progress: a bar over seeds, one over the seed's stages naming each, the L3D epoch bar
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("tms: 100%") and "1/1" in line for line in lines)
    for stage in ("toy", "L3D, 30 epochs", "metrics: held-out losses", "metrics: ablation",
                  "save and figures"):  # fmt: skip
        assert any(line.startswith("seed 1: ") and stage in line for line in lines), stage
    assert any(line.startswith("seed 1: 11/12 stages") and "figures" in line for line in lines)
    epoch_bar = [line for line in lines if not line.startswith(("tms", "seed"))]
    assert any("30/30" in line for line in epoch_bar)  # the decomposition's own bar
    seed = report["seeds"][0]
    # Each feature's matched subnetwork holds > 0.9 of its norm on that feature's own parameters.
    assert min(seed["parameter_recovery"]["matched_share"]) > 0.9
    assert seed["recovery"]["all_recovered"]
    assert seed["mmcs"] > 0.95
    assert seed["heldout"]["loss_pooled_squared"] < 0.3
    assert json.loads((out / "metrics.json").read_text())["summary"]["n_units"] == 5
    for name in ("summary.md", "seed1/subnetworks.png", "seed1/encoder_directions.png"):
        assert (out / name).is_file()
    assert (out / "seed1/decomposition/subnetworks.safetensors").is_file()
    header, _, row = results_table({"tms": report["summary"]}, {"tms": 1.0}).splitlines()
    assert header.count("|") == row.count("|") and "output selectivity" in header
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert "-" not in cells[7:14]  # TMS has MMCS, output selectivity and a hand-set solution
    assert cells[14:16] == ["-", "-"]  # a quick run has no random-network control
    # The hand-set solution (each feature's own gradient direction) is found by the probe without
    # error, yet its impact shares stay below 0.9: interference in 2 dimensions caps the metric.
    hand_set = seed["hand_set"]
    assert hand_set["n_subnetworks"] == 5 and hand_set["probe_errors"]["0.1"] == 0
    assert 0.5 < hand_set["min_matched_share"] < 0.9


def test_bad_settings_and_seeds_are_one_line_errors(cache, tmp_path):
    with pytest.raises(L3DError, match="unknown settings"):
        run_experiment("tms", [0], tmp_path, settings="best")
    with pytest.raises(L3DError, match="no seeds"):
        run_experiment("tms", [], tmp_path)


def test_overrides_replace_profile_fields_and_typos_fail_before_training(cache, tmp_path):
    from l3d.experiments import parse_overrides

    overrides = parse_overrides(["divergence=mse_authors", "top_k=0.3", "resample_every=2"])
    assert overrides == {"divergence": "mse_authors", "top_k": 0.3, "resample_every": 2}
    out = tmp_path / "tms"
    report = run_experiment(
        "tms", [1], out, settings="improved", quick=True, progress=False, overrides=overrides
    )
    config = (out / "seed1/decomposition/config.yaml").read_text()
    assert "divergence: mse_authors" in config and "top_k: 0.3" in config
    assert report["seeds"][0]["settings"]["top_k"] == 0.3  # (quick mode rescales resample_every)
    assert report["summary"]["overrides"] == overrides
    assert "overrides" in (out / "summary.md").read_text()
    with pytest.raises(L3DError, match=r"unknown config key 'topk' \(did you mean top_k\?\)"):
        run_experiment("tms", [1], tmp_path / "x", overrides={"topk": 0.2})
    assert not (tmp_path / "x").exists()


def test_set_direction_fits_low_rank_tensors_exactly():
    shapes = {"w": (4, 3), "b": (4,)}
    subs = Subnetworks(shapes, 3, {"w": 2, "b": 1}, "cp", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    target = {
        "w": torch.randn(4, 2, generator=g) @ torch.randn(2, 3, generator=g),
        "b": torch.randn(4, generator=g),
    }
    set_direction_(subs, 1, target)
    with torch.no_grad():
        dense = subs.materialize()
    assert torch.allclose(dense["w"][1], target["w"], atol=1e-5)
    assert torch.allclose(dense["b"][1], target["b"], atol=1e-6)


def test_stale_subnetworks_are_the_dead_and_the_less_active_duplicate():
    shapes = {"w": (3, 3)}
    subs = Subnetworks(shapes, 4, {"w": 1}, "cp", torch.Generator().manual_seed(0))
    with torch.no_grad():
        for f in subs.tensors[0].modes:
            f[2] = -f[0]  # subnetwork 2 is subnetwork 0 with its sign flipped
    assert stale_subnetworks(subs, torch.tensor([0.3, 0.2, 0.1, 0.0]), 0.9) == [2, 3]
    assert stale_subnetworks(subs, torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.9) == [0]


@pytest.mark.parametrize("method", ["jacobian", "vmap", "structured"])
def test_resampling_revives_a_dead_subnetwork_on_every_gradient_path(method):
    x = sparse_features(256, 5, generator=torch.Generator().manual_seed(0))
    model = TMS(5, 2, seed=1)
    base = dict(params=["W_in", "W_out", "b"], n_subnetworks=6, top_k=0.2, epochs=3)

    def train(**resampling):
        config = L3DConfig.create(**base, gradient_method=method, **resampling)
        _, source, trainer = build(model, x, config)
        assert source.method == method
        with torch.no_grad():  # V_in_5 = 0: c_5 = 0, never in the top-k, and never gets a gradient
            for f in trainer.pair.v_in.tensors:
                f.modes[0][5] = 0
        for _ in range(config.epochs):
            trainer.run_epoch()
        return evaluate(trainer.pair, source, config.top_k, 0).p_active, trainer.history

    p_act, history = train()
    assert p_act[5] == 0 and not any("resampled" in r for r in history)
    p_act, history = train(resample_every=1, resample_until=2)
    assert p_act[5] > 0
    assert [r.get("resampled") for r in history] == [[5], None, None]


def test_unit_probe_pool_gives_every_unit_enough_single_unit_samples():
    from torch import nn

    from l3d.experiments import metrics as M
    from l3d.experiments.runner import MIN_SAMPLES_PER_UNIT, unit_probe_pool
    from l3d.toys import feature_groups

    def toy(n_features: int) -> Toy:
        def sample(n, generator):
            return sparse_features(n, n_features, generator=generator)

        return Toy(nn.Identity(), feature_groups(n_features), sample)

    few, many = toy(5), toy(40)
    heldout = few.sample(1000, torch.Generator().manual_seed(0))
    assert unit_probe_pool(few, heldout, 0) is heldout  # 5 units: ~180 samples each already
    heldout = many.sample(1000, torch.Generator().manual_seed(0))
    before = torch.bincount(M.single_unit_samples(heldout, many.units) + 1, minlength=41)[1:]
    assert before.min() < MIN_SAMPLES_PER_UNIT  # 40 units: ~8 each in 1000 samples
    pool = unit_probe_pool(many, heldout, 0)
    after = torch.bincount(M.single_unit_samples(pool, many.units) + 1, minlength=41)[1:]
    assert after.min() >= MIN_SAMPLES_PER_UNIT and len(pool) <= 10_000


def test_controls_of_an_auto_count_use_the_chosen_count(tmp_path, monkeypatch):
    """--set n_subnetworks=auto: the random-network control and the second seed decompose at
    the count the run chose, not at a count chosen again on their own gradients."""
    from l3d.experiments import runner

    asked, got = [], []
    original = runner.decompose_toy

    def spy(toy, fields, *args, **kwargs):
        asked.append(fields["n_subnetworks"])
        decomposition, resampled = original(toy, fields, *args, **kwargs)
        got.append(decomposition.n_subnetworks)
        return decomposition, resampled

    monkeypatch.setattr(runner, "decompose_toy", spy)
    overrides = {"n_subnetworks": "auto", "epochs": 2, "warm_start_epochs": 1}
    runner.run_experiment(
        "tms", [0], tmp_path, settings="improved", sweep=False, progress=False, overrides=overrides
    )
    # The run, then the random-network control and the second seed at the run's count.
    assert asked == ["auto", got[0], got[0]] and got == [got[0]] * 3 and got[0] >= 2
