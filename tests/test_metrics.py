"""Ground-truth metrics against hand-built subnetworks whose answers are known."""

import pytest
import torch

from l3d import controls
from l3d.config import L3DConfig
from l3d.core.algorithm import Evaluation, SubnetworkPair
from l3d.core.resampling import set_direction_
from l3d.decomposition import Decomposition
from l3d.errors import L3DError
from l3d.experiments import metrics as M
from l3d.toys import TMS, feature_groups, feature_parameter_mask, sparse_features


def tms_with_own_subnetworks(order: list[int]) -> tuple[TMS, Decomposition]:
    """The ideal TMS 5-2 (features on a pentagon, bias suppressing the neighbours' interference)
    and a decomposition whose subnetwork k is exactly feature order[k]'s own parameters."""
    model = TMS(5, 2)
    angles = torch.arange(5) * 2 * torch.pi / 5
    with torch.no_grad():
        model.W_in.copy_(torch.stack([angles.cos(), angles.sin()]))
        model.b.fill_(-0.35)
    model.tie_()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pair = SubnetworkPair.initialize(
        shapes, 5, dict.fromkeys(shapes, 1), "cp", torch.Generator().manual_seed(0)
    )
    for k, j in enumerate(order):
        direction = {
            n: p.detach() * m[j]
            for (n, p), m in zip(model.named_parameters(), feature_parameter_mask(model).values())
        }
        direction["b"] = torch.eye(5)[j] * 0.3
        set_direction_(pair.v_out, k, direction)
        set_direction_(pair.v_in, k, direction)
    pair.v_out.normalize_()
    config = L3DConfig.create(params=["W_in", "W_out", "b"], n_subnetworks=5, batch_size=32)
    evaluation = Evaluation(torch.ones(5), 0.0, 0.0, 0)
    return model, Decomposition(config, pair, [], evaluation, model)


ORDER = [2, 0, 4, 1, 3]


@torch.no_grad()
def dense(dec: Decomposition) -> dict[str, torch.Tensor]:
    return dec.subnetworks.v_out.materialize()


def test_parameter_share_finds_each_features_own_subnetwork():
    model, dec = tms_with_own_subnetworks(ORDER)
    share = M.parameter_share(dense(dec), feature_parameter_mask(model))
    assert share.shape == (5, 5)
    for k, j in enumerate(ORDER):
        assert share[k, j] == pytest.approx(1.0, abs=1e-5)
        assert share[k].sum() == pytest.approx(1.0, abs=1e-5)
    rec = M.recovery(share.T)
    assert rec["assignment"] == [ORDER.index(j) for j in range(5)]
    assert rec["all_recovered"]


def test_mmcs_is_one_for_exact_columns_and_sign_free():
    model, dec = tms_with_own_subnetworks(ORDER)
    directions = dense(dec)["W_in"]
    assert M.mmcs(model.W_in.detach(), -directions) == pytest.approx([1.0] * 5, abs=1e-5)


def test_recovery_flags_two_subnetworks_on_one_unit():
    share = torch.eye(3)
    share[:, 2] = torch.tensor([0.9, 0.1, 0.0])  # subnetwork 2 duplicates unit 0; unit 2 has none
    rec = M.recovery(share)
    assert rec["n_recovered"] == 2
    assert not rec["all_recovered"]


def test_match_units_brute_force():
    import itertools

    g = torch.Generator().manual_seed(0)
    score = torch.rand(4, 6, generator=g)
    assignment = M.match_units(score)
    best = max(
        itertools.permutations(range(6), 4),
        key=lambda cols: sum(score[i, c] for i, c in enumerate(cols)),
    )
    assert assignment == list(best)


def test_single_unit_samples():
    x = torch.tensor([[0.5, 0, 0, 0], [0, 0.2, 0.3, 0], [0, 0, 0, 0.1], [0.1, 0, 0, 0.1]])
    units = feature_groups(4, 2)  # units {0,1} and {2,3}
    assert M.single_unit_samples(x, units).tolist() == [0, -1, 1, -1]


def test_own_subnetworks_are_selective_and_pass_the_probe():
    _, dec = tms_with_own_subnetworks(ORDER)
    x = sparse_features(500, 5, generator=torch.Generator().manual_seed(1))
    units = feature_groups(5)
    impacts = M.unit_impacts(dec, x, units, n_references=3)
    rec = M.recovery(M.impact_share(impacts))
    assert rec["assignment"] == [ORDER.index(j) for j in range(5)]
    probe = M.one_hot_probe(dec, units)
    assert probe["errors"]["0.1"] == 0
    sel = M.sample_selectivity(dec, x, units, rec["assignment"], deltas=(0.5,))
    # Feature j's own parameters only touch samples where j is active (ReLU output) ...
    assert sel["0.5"]["min_ratio"] > 10
    # ... and the ablation check sees active subnetworks move outputs far more than inactive ones.
    ab = M.ablation_check(dec, x, deltas=(0.5,))
    assert ab["0.5"]["ratio"] > 5


def tms_with_bias_subnetworks(biases: torch.Tensor) -> Decomposition:
    """A TMS 5-2 whose outputs are all on (b = 1 and small weights keep the ReLU open for
    |delta| < 0.5) and whose
    subnetwork k moves the bias alone, along biases[k]: output i moves by delta * biases[k, i] on
    every sample, an intervention whose output-wise effect is known exactly."""
    model = TMS(5, 2, seed=0)
    with torch.no_grad():
        model.W_in.mul_(0.1 / model.W_in.abs().max())  # |W_out W_in x| <= 0.1 for x in [0, 1]^5
        model.W_out.copy_(model.W_in.T)
        model.b.fill_(1.0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pair = SubnetworkPair.initialize(
        shapes, len(biases), dict.fromkeys(shapes, 1), "cp", torch.Generator().manual_seed(0)
    )
    for k, b in enumerate(biases):
        direction = {n: torch.zeros(s) for n, s in shapes.items()} | {"b": b}
        set_direction_(pair.v_out, k, direction)
        set_direction_(pair.v_in, k, direction)
    pair.v_out.normalize_()
    config = L3DConfig.create(params=list(shapes), n_subnetworks=len(biases), batch_size=32)
    evaluation = Evaluation(torch.ones(len(biases)), 0.0, 0.0, 0)
    return Decomposition(config, pair, [], evaluation, model)


def test_output_selectivity_of_an_intervention_on_the_matched_output_alone():
    dec = tms_with_bias_subnetworks(torch.eye(5)[ORDER])  # subnetwork k moves output ORDER[k]
    x = sparse_features(500, 5, generator=torch.Generator().manual_seed(1))
    assignment = [ORDER.index(j) for j in range(5)]
    sel = M.output_selectivity(dec, x, feature_groups(5), assignment, deltas=(0.5,))
    for samples in ("active", "all"):
        assert sel[samples]["0.5"]["min_ratio"] > 1e5  # the other outputs do not move at all
    # The wrong subnetwork for each unit moves an output that is not the unit's: ratio 0.
    shifted = assignment[1:] + assignment[:1]
    wrong = M.output_selectivity(dec, x, feature_groups(5), shifted, deltas=(0.5,))
    assert wrong["all"]["0.5"]["median_ratio"] < 1e-6


def test_output_selectivity_is_one_when_every_output_moves_equally():
    dec = tms_with_bias_subnetworks(torch.ones(5, 5))
    x = sparse_features(500, 5, generator=torch.Generator().manual_seed(1))
    sel = M.output_selectivity(dec, x, feature_groups(5), [0, 1, 2, 3, 4], deltas=(0.25, 0.5))
    for samples in ("active", "all"):
        for delta in ("0.25", "0.5"):
            assert sel[samples][delta]["min_ratio"] == pytest.approx(1.0, rel=1e-4)
            assert sel[samples][delta]["median_ratio"] == pytest.approx(1.0, rel=1e-4)


def test_gradient_direction_of_a_separable_model_is_output_selective():
    # All outputs on, so f_j = W_out[j] W_in x + b_j: output j's gradient lies on b_j and W_out's
    # row j (which move output j alone) plus a W_in part scaled by the small W_out[j], which
    # leaks into the other outputs only weakly.
    dec = tms_with_bias_subnetworks(torch.eye(5))
    x = sparse_features(500, 5, generator=torch.Generator().manual_seed(1))
    sel = M.gradient_output_selectivity(dec, x, feature_groups(5), deltas=(0.25,))
    assert sel["active"]["0.25"]["min_ratio"] > 20
    # Restricted to W_in, the direction moves output j only through the shared hidden layer.
    w_in = M.gradient_output_selectivity(dec, x, feature_groups(5), deltas=(0.25,), params=["W_in"])
    assert w_in["active"]["0.25"]["median_ratio"] < sel["active"]["0.25"]["median_ratio"] / 5


def test_output_selectivity_needs_one_output_per_feature():
    dec = tms_with_bias_subnetworks(torch.eye(5))
    x = sparse_features(50, 5, generator=torch.Generator().manual_seed(1))
    with pytest.raises(L3DError, match="one output per input feature"):
        M.output_selectivity(dec, x, feature_groups(10, 2), [0, 1, 2, 3, 4])


def test_coefficient_recovery_is_exact_for_true_paths():
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.rand(6, 4, generator=g)  # (outputs, inputs)
    hidden = torch.randn(3, 4, generator=g)
    w_in = torch.stack([hidden * torch.eye(4)[i] for i in range(4)])  # input i's column only
    u = torch.randn(4, 3, generator=g)
    # W_out part of subnetwork i: A[:, i] (x) (its hidden code), scaled arbitrarily and
    # sign-flipped.
    w_out = torch.stack(
        [-(i + 1.0) * torch.outer(a[:, i], u[i]) / (u[i] @ hidden[:, i]) for i in range(4)]
    )
    w_in = torch.stack([torch.outer(hidden[:, i], torch.eye(4)[i]) for i in range(4)])
    rec = M.coefficient_recovery(w_in, w_out, a, live=[0, 1, 2, 3])
    assert rec["inputs"] == [0, 1, 2, 3]
    assert all(r == pytest.approx(1.0, abs=1e-6) for r in rec["per_subnetwork_r"])
    assert rec["n_inputs_covered"] == 4


def test_mean_std():
    assert M.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert M.mean_std([2.0]) == (2.0, 0.0)


def test_unit_matching_does_not_pick_a_near_empty_twin():
    # Subnetwork 2 has almost no impact, all of it on unit 0: its share is 1.0, yet subnetwork 0
    # does unit 0's work at share 0.95.
    impacts = torch.tensor([[0.95, 0.02, 1e-4], [0.05, 0.98, 0.0]])
    share = M.impact_share(impacts)
    assert M.recovery(share)["assignment"][0] == 2  # matching on the share alone is fooled
    rec = M.unit_recovery(impacts)
    assert rec["assignment"] == [0, 1]
    assert rec["matched_share"] == pytest.approx([0.95, 0.98], abs=1e-3)


def test_recovery_reports_strict_thresholds():
    share = torch.tensor([[0.95, 0.0, 0.0], [0.05, 0.85, 0.0], [0.0, 0.15, 0.6]])
    rec = M.recovery(share)
    assert rec["n_recovered"] == 3
    assert rec["n_recovered_at"] == {"0.5": 3, "0.8": 2, "0.9": 1}
    assert rec["min_matched_share"] == pytest.approx(0.6)


def test_matched_cosines_finds_permuted_and_flipped_subnetworks():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 30, generator=g)
    b = torch.cat([-a[[2, 0, 3, 1]] * 3.0, torch.randn(2, 30, generator=g)])
    assert controls.matched_cosines(a, b) == pytest.approx([1.0] * 4, abs=1e-6)


def test_matched_cosines_brute_force():
    import itertools

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    cos = (
        torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    ).abs()
    best = max(
        itertools.permutations(range(5), 3), key=lambda c: sum(cos[i, j] for i, j in enumerate(c))
    )
    assert sum(controls.matched_cosines(a, b)) == pytest.approx(
        float(sum(cos[i, j] for i, j in enumerate(best)))
    )


def test_per_sample_ablation_against_a_loop():
    g = torch.Generator().manual_seed(2)
    coeffs = torch.randn(6, 4, generator=g)
    active = coeffs.abs() > 0.8
    active[0] = False  # a sample with no active subnetwork is left out
    changes = torch.rand(6, 4, generator=g) + 0.1
    out = M._per_sample_ablation(coeffs, active, changes, seed=3)
    draw = torch.rand(active.shape, generator=torch.Generator().manual_seed(3))
    ratios = []
    for i in range(6):
        on = [k for k in range(4) if active[i, k]]
        off = [k for k in range(4) if not active[i, k]]
        if not on or not off:
            continue
        top = max(on, key=lambda k: coeffs[i, k].abs())
        other = max(off, key=lambda k: draw[i, k])
        ratios.append(float(changes[i, top] / changes[i, other]))
    assert out["n_samples"] == len(ratios)
    assert out["median_ratio"] == pytest.approx(float(torch.tensor(ratios).median()))
    assert out["fraction_active_larger"] == pytest.approx(sum(r > 1 for r in ratios) / len(ratios))


def test_own_subnetworks_pass_the_per_sample_ablation():
    _, dec = tms_with_own_subnetworks(ORDER)
    x = sparse_features(300, 5, generator=torch.Generator().manual_seed(1))
    per_sample = M.ablation_check(dec, x, deltas=(0.5,))["0.5"]["per_sample"]
    assert per_sample["n_samples"] > 50
    assert per_sample["median_ratio"] > 10
    assert per_sample["fraction_active_larger"] > 0.95
