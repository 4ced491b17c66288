"""Contrastive-pair decomposition (l3d.pairs) against brute force and known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import l3d
from l3d.core.divergences import kl
from l3d.core.samples import Referenced
from l3d.errors import L3DError
from l3d.pairs import (
    off_target_scores,
    pair_coefficients,
    pair_data,
    pair_gradients,
    patching_scores,
    singular_directions,
    switch_rates,
    unit_directions,
)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    x = torch.randn(24, 6)
    counterparts = x + 0.5 * torch.randn(24, 6)
    d = l3d.decompose_pairs(
        net, x, counterparts, params=["0.weight", "2.*"], n_subnetworks=3, rank=2,
        epochs=3, batch_size=8, divergence="kl", progress=False,
    )  # fmt: skip
    return d, x, counterparts


def test_pair_coefficients_equal_a_loop_of_backward_calls(classifier):
    d, x, counterparts = classifier
    params = dict(d.model.named_parameters())
    v_in = d.subnetworks.v_in.materialize()
    expected = []
    for i in range(len(x)):
        d.model.zero_grad()
        with torch.no_grad():
            reference = d.model(counterparts[i : i + 1])[0]  # detached counterpart output
        kl(d.model(x[i : i + 1])[0], reference).backward()
        expected.append(sum((v_in[n] * params[n].grad).flatten(1).sum(1) for n in d.names))
    torch.testing.assert_close(pair_coefficients(d, x, counterparts), torch.stack(expected))
    assert d.config.reference == "counterpart" and d.config.top_k == 1.0


def test_symmetric_and_several_counterparts_make_their_own_pairs(classifier):
    d, x, counterparts = classifier
    data = pair_data(d.model, x, [counterparts, 2 * counterparts], symmetric=True)
    assert data.references.shape == (4 * len(x), 5)
    with torch.no_grad():
        torch.testing.assert_close(data.references[: len(x)], d.model(counterparts))
        torch.testing.assert_close(data.references[len(x) : 2 * len(x)], d.model(2 * counterparts))
        torch.testing.assert_close(data.references[2 * len(x) : 3 * len(x)], d.model(x))
    torch.testing.assert_close(data.inputs[2 * len(x) : 3 * len(x)], counterparts)


def test_no_sparsity_finds_the_one_direction_the_pair_gradients_span():
    """f(x) = W x, x = a_i e_0, x' = 0: every pair gradient of the MSE is a multiple of the fixed
    matrix W e_0 e_0^T, so one rank-1 subnetwork reconstructs all of them."""
    torch.manual_seed(1)
    net = nn.Linear(4, 3, bias=False)
    a = torch.rand(64, 1) + 0.5
    x = torch.cat([a, torch.zeros(64, 3)], dim=1)
    d = l3d.decompose_pairs(
        net, x, torch.zeros_like(x), params=["weight"], n_subnetworks=1, rank=1,
        epochs=60, batch_size=16, lr=0.05, loss="pooled_squared", progress=False,
    )  # fmt: skip
    expected = torch.outer(net.weight.detach()[:, 0], torch.eye(4)[0])
    v = d.v_out(0)["weight"]
    cosine = float((v * expected).sum() / (v.norm() * expected.norm()))
    assert abs(cosine) > 0.999
    assert d.evaluation.loss_pooled_squared < 1e-4


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids).cumsum(1)
        return self.head(torch.tanh(h))


def test_per_token_pairs_use_only_the_given_positions():
    torch.manual_seed(2)
    model = TokenModel()
    ids = torch.randint(0, 7, (6, 5))
    other = ids.clone()
    other[:, 2] = (ids[:, 2] + 1) % 7  # the pairs differ from position 2 on
    positions = torch.zeros(6, 5, dtype=torch.bool)
    positions[:, 4] = True  # compare the last token only
    d = l3d.decompose_pairs(
        model, {"input_ids": ids}, {"input_ids": other}, params=["head.weight"],
        n_subnetworks=2, epochs=2, batch_size=3, divergence="kl", per_token=True,
        positions=positions, progress=False,
    )  # fmt: skip
    c = pair_coefficients(d, {"input_ids": ids}, {"input_ids": other}, positions=positions)
    assert c.shape == (6, 2)  # one sample per pair: its last position
    assert d.evaluation.n_samples == 6
    # The same pairs over every position: position 4's rows are the masked run's rows.
    all_positions = pair_coefficients(d, {"input_ids": ids}, {"input_ids": other})
    torch.testing.assert_close(all_positions.view(6, 5, 2)[:, 4], c)


def test_patching_score_is_one_for_the_subnetwork_that_is_the_difference():
    """With a rank-1 linear model W0 = c u v^T and counterparts x' = 1.5 x, f(x') = f(x, 1.5 W0):
    moving W0 by 0.5 c along the unit direction u v^T closes the whole difference, so a
    subnetwork set to that direction scores 1; scores always lie in [0, 1]."""
    torch.manual_seed(3)
    net = nn.Linear(3, 2, bias=False)
    x = torch.randn(32, 3)
    d = l3d.decompose_pairs(
        net, x, 1.5 * x, params=["weight"], n_subnetworks=2, epochs=30, batch_size=8,
        progress=False,
    )  # fmt: skip
    w0 = net.weight.detach()
    u, s, vh = torch.linalg.svd(w0 / w0.norm())
    with torch.no_grad():  # W0 made rank 1, subnetwork 0 set to u v^T
        net.weight.copy_(s[0] * torch.outer(u[:, 0], vh[0]) * w0.norm())
        d.target.w0["weight"].copy_(net.weight)
        d.subnetworks.v_out.factors[0].modes[0][0, 0] = u[:, 0]
        d.subnetworks.v_out.factors[0].modes[1][0, 0] = vh[0]
    scores = patching_scores(d, x, 1.5 * x, deltas=torch.linspace(-3, 3, 601))
    assert scores[0] > 0.999
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1


@pytest.mark.parametrize(
    ("counterparts", "positions", "message"),
    [
        (torch.zeros(5, 6), None, "must have the inputs' shapes"),
        (torch.zeros(24, 7), None, "must have the inputs' shapes"),
        ([], None, "no counterparts given"),
        (torch.zeros(24, 6), torch.ones(24, 3, dtype=torch.bool), "positions= restricts"),
        # NaN counterparts were reported as NaN per-sample gradients, "check inputs".
        (torch.full((24, 6), float("nan")), None, "144 NaN/inf values in the counterparts"),
        # Another dtype failed in the model ("expected m1 and m2 to have the same dtype").
        (torch.zeros(24, 6, dtype=torch.float64), None, r"must have the inputs' dtypes"),
        (torch.zeros(24, 6, dtype=torch.bool), None, r"must have the inputs' dtypes"),
        # A dict for one tensor reached the model as a keyword argument.
        ({"input": torch.zeros(24, 6)}, None, "the inputs are one tensor: give the counterparts"),
    ],
)
def test_bad_pairs_are_one_line_errors(classifier, counterparts, positions, message):
    d, x, _ = classifier
    with pytest.raises(L3DError, match=message) as err:
        pair_data(d.model, x, counterparts, positions=positions)
    assert "\n" not in str(err.value)


def test_pairs_without_rows_or_difference_are_refused_and_some_equal_pairs_are_kept(classifier):
    """No rows was torch.cat's "expected a non-empty list of Tensors"; counterparts identical to
    their inputs decomposed to loss 0 (every pair gradient is zero) and only the analysis said
    so. A few identical pairs among others are fine: their gradients are zero, the others' not."""
    d, x, counterparts = classifier
    with pytest.raises(L3DError, match="no pairs: the inputs have 0 rows"):
        pair_data(d.model, x[:0], counterparts[:0])
    for pairs in ([x, x.clone()], [x, [x.clone(), x.clone()]]):
        with pytest.raises(L3DError, match=r"the pairs' outputs are identical at W0") as err:
            pair_data(d.model, *pairs, symmetric=True)
        assert "\n" not in str(err.value)
    with pytest.raises(L3DError, match=r"the pairs' outputs are identical at W0"):
        patching_scores(d, Referenced(x, d.model(x).detach()))  # the analysis says the same
    some = torch.cat([x[:20], counterparts[20:]])
    data = pair_data(d.model, x, [x, some])
    torch.testing.assert_close(data.references[24 + 20 :], d.model(counterparts[20:]))


def test_inputs_the_model_fails_on_are_named_before_their_counterparts():
    """Inputs and counterparts alike (no mismatch between them) but not what the model takes."""
    net = nn.Linear(6, 2)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(L3DError, match=r"the model fails on the inputs' first samples \(tensor f"):
        pair_data(net, x, x + 1)


def test_positions_of_the_wrong_shape_are_refused():
    model = TokenModel()
    ids = {"input_ids": torch.randint(0, 7, (4, 5))}
    with pytest.raises(L3DError, match=r"positions must be a bool tensor shaped \(batch, seq\)"):
        pair_data(model, ids, ids, positions=torch.ones(4, 4, dtype=torch.bool))


def test_a_pair_decomposition_saves_and_loads(classifier, tmp_path):
    d, x, counterparts = classifier
    d.save(tmp_path / "pairs")
    loaded = l3d.load(tmp_path / "pairs", d.model)
    torch.testing.assert_close(
        pair_coefficients(loaded, x, counterparts), pair_coefficients(d, x, counterparts)
    )
    with pytest.raises(L3DError, match="counterpart"):
        loaded.coefficients(x)  # references of pairs come with the pairs, not from the batch


def test_pair_gradients_project_to_the_pair_coefficients(classifier):
    d, x, counterparts = classifier
    gradients = pair_gradients(d, x, counterparts)
    v_in = d.subnetworks.v_in.materialize()
    projected = sum(
        torch.einsum("nw,kw->nk", gradients[n].flatten(1), v_in[n].flatten(1)) for n in d.names
    )
    torch.testing.assert_close(projected, pair_coefficients(d, x, counterparts))
    both = pair_gradients(d, x, counterparts, symmetric=True)
    assert all(both[n].shape == (2 * len(x), *d.shapes[n]) for n in d.names)


def test_singular_directions_are_the_top_right_singular_vectors():
    """Gradients that are multiples of two orthogonal directions, one in 3 of 4 samples: the top
    singular direction is the frequent one (up to sign), then the other; unit norm each."""
    a, b = torch.zeros(4, 3), torch.zeros(4, 3)
    a[0, 0], b[1, 2] = 1.0, 1.0
    scales = torch.tensor([1.0, -2.0, 3.0, 0.5])
    gradients = {"w": torch.stack([s * (a if i < 3 else b) for i, s in enumerate(scales)])}
    directions = unit_directions(singular_directions(gradients, 2))
    assert len(directions) == 2
    torch.testing.assert_close(directions[0]["w"].abs(), a)
    torch.testing.assert_close(directions[1]["w"].abs(), b)


def test_switch_rates_count_the_answers_that_become_the_counterparts():
    """f(x) = W x with W0 = I, so the answer (argmax) is the largest entry of x; counterparts swap
    the first two entries (and so the answer). W0 + 2 v along the unit direction v = (the swap
    permutation - diag(1, 1, 0)) / 2 is that permutation: every answer switches, none at 0."""
    net = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(3))
    x = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    counterparts = x[:, [1, 0, 2]]  # the last pair's answer (2) is the same: not counted
    d = l3d.decompose_pairs(
        net, x, counterparts, params=["weight"], n_subnetworks=1, epochs=1, progress=False
    )
    swap = torch.tensor([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]) / 2
    rates = switch_rates(
        d, x, counterparts, torch.tensor([0.0, 1.0, 2.0]), directions=[{"weight": swap}]
    )
    assert rates.shape == (1, 3)
    assert float(rates[0, 0]) == 0.0 and float(rates[0, 2]) == 1.0
    same_answer = torch.tensor([[0.0, 0.5, 1.0]])  # the outputs differ, the answers not
    with pytest.raises(L3DError, match="nothing to switch"):
        switch_rates(d, same_answer, same_answer[:, [1, 0, 2]], torch.tensor([1.0]))
    with pytest.raises(L3DError, match="the pairs' outputs are identical at W0"):
        switch_rates(d, x[3:], counterparts[3:], torch.tensor([1.0]))


def test_patching_scores_take_pairs_as_data(classifier):
    d, x, counterparts = classifier
    deltas = torch.linspace(-1, 1, 5)
    data = pair_data(d.model, x, counterparts)
    torch.testing.assert_close(
        patching_scores(d, data, deltas=deltas), patching_scores(d, x, counterparts, deltas=deltas)
    )
    with pytest.raises(L3DError, match="not both"):
        patching_scores(d, Referenced(x, data.references), counterparts)
    with pytest.raises(L3DError, match="counterparts missing"):
        patching_scores(d, x)


def test_off_target_scores_equal_a_loop_over_steps(classifier):
    """Brute force, with the weights moved by hand: for each direction, the step that minimises
    the target pairs' mean KL, then the other pairs' mean KL there against W0's. The target
    pairs shift input 0 and the other pairs input 5, so the target pairs' top singular
    direction closes them and moves the other pairs (a nonzero score); the untrained
    subnetwork's best step is 0 (a zero score)."""
    d, _, _ = classifier
    torch.manual_seed(4)
    x, other_x = torch.randn(16, 6), torch.randn(16, 6)
    counterparts = x + torch.tensor([1.5, 0, 0, 0, 0, 0])
    other_counterparts = other_x + torch.tensor([0, 0, 0, 0, 0, 1.5])
    directions = [
        *unit_directions(singular_directions(pair_gradients(d, x, counterparts), 1)),
        d.v_out(0),
    ]
    deltas = torch.linspace(-2, 2, 17)
    params = dict(d.model.named_parameters())

    def mean_kl(inputs, references, v, delta):
        moved = {n: p + delta * v[n] if n in v else p for n, p in params.items()}
        outputs = torch.func.functional_call(d.model, moved, (inputs,))
        return float(torch.stack([kl(o, r) for o, r in zip(outputs, references)]).mean())

    expected = []
    with torch.no_grad():
        target_refs, other_refs = d.model(counterparts), d.model(other_counterparts)
        for v in directions:
            step = min(deltas.tolist(), key=lambda s: mean_kl(x, target_refs, v, s))
            base = mean_kl(other_x, other_refs, v, 0.0)
            expected.append(1 - mean_kl(other_x, other_refs, v, step) / base)
    target = pair_data(d.model, x, counterparts)
    other = pair_data(d.model, other_x, other_counterparts)
    scores = off_target_scores(d, target, other, deltas=deltas, directions=directions)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert abs(float(scores[0])) > 0.1 and float(scores[1]) == 0.0
    assert patching_scores(d, target, deltas=deltas, directions=directions)[0] > 0.5
    # The target pairs as their own other pairs: the off-target score is the patching score.
    torch.testing.assert_close(
        off_target_scores(d, target, target, deltas=deltas, directions=directions),
        patching_scores(d, target, deltas=deltas, directions=directions),
    )
    same = Referenced(x, d.model(x).detach())  # pair_data refuses such pairs itself
    with pytest.raises(L3DError, match="the other pairs' outputs are identical at W0"):
        off_target_scores(d, target, same, deltas=deltas)


def _token_pairs(n: int = 4, seq: int = 6) -> tuple[dict, dict]:
    """Token pairs for TokenModel (a running sum over positions, so causal): counterparts change
    token 1, so the outputs differ from position 1 on. Both with an all-ones attention mask."""
    ids = torch.randint(0, 7, (n, seq), generator=torch.Generator().manual_seed(5))
    other = ids.clone()
    other[:, 1] = (ids[:, 1] + 1) % 7
    mask = torch.ones(n, seq, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}, {"input_ids": other, "attention_mask": mask}


@pytest.fixture(scope="module")
def token_run():
    torch.manual_seed(6)
    model = TokenModel()
    x, c = _token_pairs()
    d = l3d.decompose_pairs(
        model, x, c, params=["head.weight"], n_subnetworks=2, epochs=1, batch_size=4,
        divergence="kl", per_token=True, progress=False,
    )  # fmt: skip
    return d, x, c


def test_positions_only_on_the_inputs_padding_are_refused(token_run):
    """Positions where the inputs' attention_mask is 0 are no samples: pair_data accepted them
    (0 samples) and the run failed later with torch's "selected index k out of range"."""
    d, x, c = token_run
    padded = {**x, "attention_mask": x["attention_mask"].clone()}
    padded["attention_mask"][:, 4:] = 0
    c_padded = {**c, "attention_mask": padded["attention_mask"].clone()}
    positions = torch.zeros(4, 6, dtype=torch.bool)
    positions[:, 5] = True
    options = dict(params=["head.weight"], n_subnetworks=2, epochs=1, per_token=True)
    calls = [
        lambda: pair_data(d.model, padded, c_padded, positions=positions),
        lambda: l3d.decompose_pairs(
            d.model, padded, c_padded, positions=positions, progress=False, **options
        ),
        lambda: patching_scores(d, padded, c_padded, positions=positions),
        lambda: switch_rates(d, padded, c_padded, torch.tensor([1.0]), positions=positions),
        lambda: pair_coefficients(d, padded, c_padded, positions=positions),
    ]
    for call in calls:
        with pytest.raises(
            L3DError, match=r"positions mark only padding \(attention_mask 0\)"
        ) as e:
            call()
        assert "\n" not in str(e.value)
    positions[:, 3] = True  # one compared position with a token is enough
    data = pair_data(d.model, padded, c_padded, positions=positions)
    assert pair_coefficients(d, padded, c_padded, positions=positions).shape == (4, 2)
    assert data.references.shape == (4, 6, 7)


def test_a_counterparts_padding_is_never_a_reference(token_run):
    """A counterpart shorter than its input (attention_mask 0 at a compared position) gave its
    output at a padding token as the reference, silently. Refused, naming the pair and position,
    with and without positions, and the other way round with symmetric=True."""
    d, x, c = token_run
    short = {**c, "attention_mask": c["attention_mask"].clone()}
    short["attention_mask"][2, 3:] = 0  # pair 2's counterpart is 3 tokens long
    positions = torch.zeros(4, 6, dtype=torch.bool)
    positions[:, 5] = True
    fix = "pad the counterpart like its input"
    for pos in (positions, None):
        with pytest.raises(L3DError, match=rf"pair 2 .*position {3 if pos is None else 5}.*{fix}"):
            pair_data(d.model, x, short, positions=pos)
    with pytest.raises(L3DError, match=rf"pair 2 .*position 5.*{fix}"):
        l3d.decompose_pairs(
            d.model, x, short, params=["head.weight"], n_subnetworks=2, epochs=1,
            per_token=True, positions=positions, progress=False,
        )  # fmt: skip
    with pytest.raises(L3DError, match=r"pair 2 .*position 5"):
        patching_scores(d, x, short, positions=positions)
    # symmetric: the input is the reference of the reversed pair, so its padding is refused too
    with pytest.raises(L3DError, match=r"pair 2 .*position 3"):
        pair_data(d.model, short, x, symmetric=True)
    # Positions only where both have tokens are fine; the references are the real outputs there.
    positions[:, 5], positions[:, 2] = False, True
    data = pair_data(d.model, x, short, positions=positions)
    with torch.no_grad():
        torch.testing.assert_close(data.references[:, 2], d.model(**short)[:, 2])
    # Padding at the same positions in both is no sample, and fine.
    both = {**x, "attention_mask": short["attention_mask"]}
    pair_data(d.model, both, short)


class Pooled(nn.Module):
    """A sequence classifier: one output row per sequence (no sequence axis)."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, n_out)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.embed(input_ids).mean(1)))


@pytest.mark.parametrize("n_out", [3, 6])  # 6: as wide as the sequence
def test_positions_in_a_run_that_is_not_per_token_are_refused(n_out):
    """positions mark per-token samples: without per_token they were an IndexError in the
    difference check (outputs narrower than seq) or silently ignored (as wide)."""
    torch.manual_seed(7)
    model = Pooled(n_out)
    x, c = _token_pairs()
    c["input_ids"][:, 0] = (x["input_ids"][:, 0] + 1) % 7
    positions = torch.zeros(4, 6, dtype=torch.bool)
    positions[:, 5] = True
    options = dict(params=["head.weight"], n_subnetworks=2, epochs=1, progress=False)
    with pytest.raises(L3DError, match=r"positions .*per_token=True") as err:
        l3d.decompose_pairs(model, x, c, positions=positions, **options)
    assert "\n" not in str(err.value)
    d = l3d.decompose_pairs(model, x, c, **options)
    for call in (pair_coefficients, patching_scores):
        with pytest.raises(L3DError, match=r"positions .*per_token=True"):
            call(d, x, c, positions=positions)
    # pair_data alone has no config: the outputs show that there is no position to mark
    with pytest.raises(L3DError, match=rf"outputs \(4, {n_out}\) have no sequence axis"):
        pair_data(model, x, c, positions=positions)
    assert pair_data(model, x, c).references.shape == (4, n_out)


def test_positions_that_mark_nothing_or_no_difference_say_so(token_run):
    """All-false positions got "give counterparts that change the model's output", the wrong fix;
    positions where the pairs do not differ now name the positions."""
    d, x, c = token_run
    with pytest.raises(L3DError, match=r"positions mark no position: mark at least one"):
        pair_data(d.model, x, c, positions=torch.zeros(4, 6, dtype=torch.bool))
    before = torch.zeros(4, 6, dtype=torch.bool)
    before[:, 0] = True  # position 0 comes before the difference (causal): identical outputs
    with pytest.raises(L3DError, match=r"identical at W0 at the marked positions.*positions"):
        pair_data(d.model, x, c, positions=before)


def test_pairs_without_samples_are_refused_by_the_analysis(token_run):
    """Pairs as data whose every compared position is padding have no samples: patching_scores
    returned 0 (max(0, nan)), a plausible score."""
    d, x, c = token_run
    padded = {**x, "attention_mask": torch.zeros_like(x["attention_mask"])}
    with torch.no_grad():
        data = Referenced(padded, d.model(**c))
    with pytest.raises(L3DError, match=r"no samples to analyse: .*padding") as err:
        patching_scores(d, data)
    assert "\n" not in str(err.value)
    good = pair_data(d.model, x, c)
    for target, other in ((data, good), (good, data)):
        with pytest.raises(L3DError, match=r"no samples to analyse: .*padding"):
            off_target_scores(d, target, other)


def test_positions_of_the_wrong_type_are_named(token_run):
    """A list was an AttributeError; a numpy bool array was "must be a bool tensor ... got bool"."""
    d, x, c = token_run
    np = pytest.importorskip("numpy")
    for given, name in (([[True] * 6] * 4, "list"), (np.ones((4, 6), dtype=bool), "numpy.ndarray")):
        with pytest.raises(L3DError, match=rf"positions must be a torch.Tensor.*got {name}:"):
            pair_data(d.model, x, c, positions=given)
