"""Run one named toy experiment over seeds: train (or load) the toy, decompose it with L3D, measure
the ground-truth metrics on held-out samples, and write metrics.json, figures and summary.md."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from l3d import controls
from l3d.config import SEEDS, L3DConfig
from l3d.core.trainer import single_thread_if
from l3d.decomposition import Decomposition, run
from l3d.errors import L3DError
from l3d.experiments import metrics as M
from l3d.experiments.figures import experiment_figures, seed_figures
from l3d.experiments.handset import hand_set_decomposition
from l3d.experiments.registry import N_DECOMPOSE, ExperimentSpec, get_spec
from l3d.io import write_json, write_text
from l3d.runs.folder import writable_folder
from l3d.runs.spec import apply_overrides
from l3d.toys import TMS, feature_parameter_mask
from l3d.toys.registry import Toy, train_toy_model

Settings = Literal["paper", "improved"]
OUTPUT_SELECTIVITY_SUMMARY = (("active", "0.25"), ("active", "1.0"), ("all", "1.0"))
"""(samples, delta) of the output-wise selectivity in the summary: small and large interventions on
the unit's samples, and the large one on all samples."""
OUTPUT_SELECTIVITY_KEYS = {
    "selectivity_outputs": "subnetwork, all decomposed tensors",
    "selectivity_outputs_hidden_only": "subnetwork, hidden layers only (Fig. S8)",
    "selectivity_outputs_gradient": "model's own gradient direction of the output, all tensors",
    "selectivity_outputs_gradient_hidden_only": (
        "model's own gradient direction, hidden layers only"
    ),
}
"""Output-wise selectivity entries of metrics.json and how summary.md names them."""
QUICK_EPOCHS = 30
"""Epochs of a quick run (smoke tests, CI): the schedule is compressed to fit."""
METRIC_STAGES = (
    "held-out losses",
    "unit matching",
    "sample selectivity",
    "output selectivity",
    "intervention curves",
    "intervention grid",
    "one-hot probe",
    "ablation",
    "hand-set solution",
)
"""The stages of `measure`, in order, as the progress bar names them (a stage a toy does not
have passes at once)."""
Stage = Callable[[str], None]
"""Called with the name of the stage that starts (progress reporting)."""


def _no_stage(name: str) -> None:
    pass


def settings_for(spec: ExperimentSpec, settings: Settings, quick: bool) -> dict:
    """The profile's fields; quick compresses epochs and every per-epoch interval by the same
    factor (per-step decay intervals are left alone)."""
    if settings not in ("paper", "improved"):
        raise L3DError(f"unknown settings '{settings}': use 'paper' or 'improved'")
    fields = dict(spec.paper if settings == "paper" else spec.improved)
    if quick and fields["epochs"] > QUICK_EPOCHS:
        fields = with_epochs(fields, QUICK_EPOCHS)
    return fields


def with_epochs(fields: dict, epochs: int) -> dict:
    """Profile fields run for `epochs` epochs instead: every per-epoch interval (resampling, warm
    start, a per-epoch lr decay) scaled by the same factor; per-step decay intervals are left
    alone."""
    scale = epochs / fields["epochs"]
    fields = {**fields, "epochs": epochs}
    for key in ("resample_every", "resample_until", "warm_start_epochs"):
        if fields.get(key):
            fields[key] = max(1, round(fields[key] * scale))
    if fields.get("lr_decay_unit") == "epoch":
        fields["lr_decay_every"] = max(1, round(fields["lr_decay_every"] * scale))
    return fields


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (the --seeds syntax of the experiment commands)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise L3DError(
            f"--seeds takes comma-separated integers, e.g. 0,1,2; got '{text}'"
        ) from None
    beyond = [s for s in seeds if not SEEDS[0] <= s <= SEEDS[1]]
    if beyond:
        raise L3DError(
            f"--seeds: {beyond[0]} does not fit in 64 bits: give seeds in {SEEDS[0]}..{SEEDS[1]}"
        )
    return seeds


def parse_overrides(pairs: list[str]) -> dict:
    """['divergence=mse_authors', 'top_k=0.2'] -> {'divergence': 'mse_authors', 'top_k': 0.2}:
    the `--set` syntax of `l3d decompose` (values parsed as YAML), flattened to profile fields."""
    data = apply_overrides({}, pairs)
    return {**data.pop("l3d", {}), **data}


def with_overrides(spec: ExperimentSpec, settings: Settings, overrides: dict) -> ExperimentSpec:
    """The spec with `overrides` replacing fields of its `settings` profile; unknown or invalid
    fields fail here, before any training, with the config's close-match message."""
    fields = {**settings_for(spec, settings, quick=False), **overrides}
    L3DConfig.create(params=["override-check"], **fields)
    if settings == "paper":
        return dataclasses.replace(spec, paper=fields)
    return dataclasses.replace(spec, improved=fields)


def decompose_toy(
    toy: Toy, fields: dict, seed: int, inputs: torch.Tensor, progress: bool = False
) -> tuple[Decomposition, list[dict]]:
    """L3D on all of the toy's parameters (Appendix B.4: biases included); also returns the log of
    re-initialised subnetworks. progress: the decomposition's epoch bar."""
    params = [n for n, _ in toy.model.named_parameters()]
    config = L3DConfig.create(params=params, seed=seed, **fields)
    decomposition = run(toy.model, inputs, config, progress=progress)
    resampled = [
        {"epoch": r["epoch"] + 1, "subnetworks": r["resampled"]}
        for r in decomposition.history
        if "resampled" in r
    ]
    return decomposition, resampled


SINGLE_THREAD_PARAMS = 20_000
MIN_SAMPLES_PER_UNIT = 30
MAX_PROBE_POOL = 10_000


def unit_probe_pool(toy: Toy, heldout: torch.Tensor, seed: int) -> torch.Tensor:
    """Held-out samples for the impact-based matching of units to subnetworks: `heldout` when
    every unit is the only active one in at least MIN_SAMPLES_PER_UNIT of them, else a larger
    fresh draw from the same distribution (up to MAX_PROBE_POOL). With 40 or 100 units, 1000
    samples give each unit ~6 single-unit samples, too few to average impacts over (a TMS 40-10
    feature whose 5 samples all sit below its ReLU threshold has zero gradients there)."""
    counts = torch.bincount(
        M.single_unit_samples(heldout, toy.units) + 1, minlength=len(toy.units) + 1
    )[1:]
    if int(counts.min()) >= MIN_SAMPLES_PER_UNIT:
        return heldout
    rate = max(float(counts.float().mean()), 1.0) / len(heldout)  # single-unit samples per sample
    n = min(MAX_PROBE_POOL, int(MIN_SAMPLES_PER_UNIT * 2 / rate))
    return toy.sample(n, torch.Generator().manual_seed(seed + 30_000))


def measure(
    spec: ExperimentSpec,
    toy: Toy,
    decomposition: Decomposition,
    seed: int,
    stage: Stage = _no_stage,
) -> dict:
    """Every ground-truth metric of one decomposition on fresh held-out samples; `stage` is told
    each of METRIC_STAGES as it starts."""
    heldout = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(seed + 20_000))
    stage(METRIC_STAGES[0])
    out: dict = {"heldout": M.heldout_losses(decomposition, heldout, seed + 3)}
    out["train_losses"] = {
        "loss_pooled_squared": decomposition.evaluation.loss_pooled_squared,
        "loss_paper": decomposition.evaluation.loss_paper,
    }
    stage(METRIC_STAGES[1])
    probes = unit_probe_pool(toy, heldout, seed)
    out["unit_probe_samples"] = len(probes)
    impacts = M.unit_impacts(decomposition, probes, toy.units)
    share = M.impact_share(impacts)
    out["impact_share"] = share.tolist()
    out["recovery"] = M.unit_recovery(impacts)
    assignment = out["recovery"]["assignment"]
    directions = M.dense_directions(decomposition)
    if spec.tms_masks:
        assert isinstance(toy.model, TMS)
        own = M.parameter_share(directions, feature_parameter_mask(toy.model))  # (n_v, n_units)
        out["parameter_recovery"] = M.recovery(own.T)
        out["mmcs_per_feature"] = M.mmcs(toy.model.W_in.detach(), directions["W_in"])
        out["mmcs"] = sum(out["mmcs_per_feature"]) / len(out["mmcs_per_feature"])
    if "A" in toy.info:
        # eq. 12 over the subnetworks matched to inputs: with excess subnetworks, the unmatched
        # ones carry no input's path (with n_v = n_inputs this is every live subnetwork).
        dead = out["heldout"]["dead_subnetworks"]
        live = [k for k in assignment if k not in dead]
        out["coefficients"] = M.coefficient_recovery(
            directions["W_in"], directions["W_out"], toy.info["A"], live
        )
    hidden = list(spec.hidden_params) or None
    stage(METRIC_STAGES[2])
    out["selectivity_samples"] = M.sample_selectivity(decomposition, heldout, toy.units, assignment)
    if hidden:
        out["selectivity_samples_hidden_only"] = M.sample_selectivity(
            decomposition, heldout, toy.units, assignment, params=hidden
        )
    # Output-wise selectivity needs output j to belong to unit j: true where the label is
    # elementwise (TMS, X^2, ResidMLP), not for y = A x (TMCS, higher-rank), where every input
    # reaches every output.
    output_matched = "A" not in toy.info
    stage(METRIC_STAGES[3])
    if output_matched:
        out["selectivity_outputs"] = M.output_selectivity(
            decomposition, heldout, toy.units, assignment
        )
        # The same ratio for the model's own first-order direction of each output: how
        # selective a subnetwork that is faithful to the gradients can be on this toy.
        out["selectivity_outputs_gradient"] = M.gradient_output_selectivity(
            decomposition, heldout, toy.units
        )
        if hidden:
            out["selectivity_outputs_hidden_only"] = M.output_selectivity(
                decomposition, heldout, toy.units, assignment, params=hidden
            )
            out["selectivity_outputs_gradient_hidden_only"] = M.gradient_output_selectivity(
                decomposition, heldout, toy.units, params=hidden
            )
    stage(METRIC_STAGES[4])
    out["intervention_curves"] = intervention_curves(
        decomposition, heldout, toy, assignment, per_output=output_matched, hidden=hidden
    )
    stage(METRIC_STAGES[5])
    if toy.units.shape[0] >= 2:
        out["intervention_grid"] = M.intervention_grid(
            decomposition, heldout, toy.units, (0, 1), assignment, torch.linspace(-2, 2, 9)
        )
    stage(METRIC_STAGES[6])
    out["one_hot_probe"] = M.one_hot_probe(decomposition, toy.units)
    stage(METRIC_STAGES[7])
    out["ablation"] = M.ablation_check(decomposition, heldout, seed=seed + 4)
    out["p_active"] = out["heldout"]["p_active"]
    out["dead_subnetworks"] = out["heldout"]["dead_subnetworks"]
    stage(METRIC_STAGES[8])
    out["hand_set"] = hand_set(toy, decomposition, seed, heldout, probes)
    return out


def hand_set(
    toy: Toy, decomposition: Decomposition, seed: int, heldout: torch.Tensor, probes: torch.Tensor
) -> dict:
    """The purity metrics of the toy's hand-set decomposition (`handset.py`: each unit's exact
    gradient direction, at the learned one's ranks) on the same held-out samples: the planted
    answer's scores, the ceiling where the units' gradients are nearly orthogonal."""
    # Evaluated on the held-out samples at the seed of the learned one's `heldout_losses`.
    planted = hand_set_decomposition(toy, decomposition, heldout, seed + 3)
    rec = M.unit_recovery(M.unit_impacts(planted, probes, toy.units))
    out = {
        "n_subnetworks": planted.n_subnetworks,
        "loss_pooled_squared": planted.evaluation.loss_pooled_squared,
        "n_recovered_at": rec["n_recovered_at"],
        "min_matched_share": rec["min_matched_share"],
        "probe_errors": M.one_hot_probe(planted, toy.units)["errors"],
    }
    if "A" in toy.info:
        directions = M.dense_directions(planted)
        out["pearson_r"] = M.coefficient_recovery(
            directions["W_in"], directions["W_out"], toy.info["A"], rec["assignment"]
        )["pearson_r"]
    return out


def intervention_curves(
    decomposition: Decomposition,
    inputs: torch.Tensor,
    toy: Toy,
    assignment: list[int],
    per_output: bool = False,
    hidden: list[str] | None = None,
) -> dict:
    """For the first (up to 5) units, as delta sweeps [-2, 2] along the unit's subnetwork: mean
    output change on the unit's samples and on the others (Figs 4, 9); with per_output, also the
    mean |Δ output_i| of every output i on the unit's samples (Fig. 9 read output-wise), for
    all decomposed tensors and, given `hidden`, the hidden layers alone (Fig. S8)."""
    deltas = torch.linspace(-2, 2, 17)
    active = (inputs.abs() > 0).float() @ toy.units.float().T > 0
    curves = []
    for j, k in list(enumerate(assignment))[:5]:
        on, off = active[:, j], ~active[:, j]

        curve: dict = {"unit": j, "subnetwork": k, "matched": [], "others": []}
        if per_output:
            curve |= {"per_output": [], **({"per_output_hidden_only": []} if hidden else {})}
        for d in deltas.tolist():
            change = M.output_deltas(decomposition, inputs, k, d)  # (n_samples, n_outputs)
            curve["matched"].append(change[on].mean().item() if on.any() else 0.0)
            curve["others"].append(change[off].mean().item() if off.any() else 0.0)
            if per_output:
                curve["per_output"].append(_mean_over(change, on))
                if hidden:
                    curve["per_output_hidden_only"].append(
                        _mean_over(M.output_deltas(decomposition, inputs, k, d, hidden), on)
                    )
        curves.append(curve)
    return {"deltas": deltas.tolist(), "curves": curves}


def _mean_over(change: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """(n_outputs,) mean of change (n_samples, n_outputs) over the selected rows (0 if none)."""
    return (change[rows].mean(0) if rows.any() else change.new_zeros(change.shape[1])).tolist()


class SeedProgress:
    """One seed's stages as a progress bar (below the seeds' bar, which has the ETA over seeds):
    the toy, L3D (the decomposition's own epoch bar, with its ETA, below this one), each of
    METRIC_STAGES, each sweep point, and saving with figures; the running stage named beside it."""

    def __init__(self, seed: int, n_stages: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=n_stages,
            desc=f"seed {seed}",
            unit="stage",
            leave=False,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| [{elapsed}{postfix}]",
        )
        self.enabled = enabled
        self._started = False

    def __call__(self, name: str) -> None:
        if self._started:
            self.bar.update(1)  # the previous stage is done
        self._started = True
        # always drawn: tqdm skips redraws within 0.1 s, and a stage may then run for minutes
        self.bar.set_postfix_str(name, refresh=True)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def n_stages(spec: ExperimentSpec, sweep: bool, controls: bool = False) -> int:
    """Stages of one seed: toy, L3D, METRIC_STAGES, the sweep's points, the random-network
    control and the second decomposition seed, save and figures."""
    n_sweep = len(spec.sweep[1]) if spec.sweep and sweep else 0
    return 3 + len(METRIC_STAGES) + n_sweep + (2 if controls else 0)


def run_seed(
    spec: ExperimentSpec,
    seed: int,
    settings: Settings,
    quick: bool,
    out_dir: Path,
    sweep: bool,
    progress: bool = False,
    controls: bool = False,
) -> dict:
    """One seed: toy, decomposition, metrics, the sweep (when `sweep` and not `quick`), the
    random-network control and cross-seed stability (when `controls` and not `quick`), figures.
    progress: a bar over the seed's stages and the decomposition's epoch bar."""
    sweep = bool(spec.sweep) and sweep and not quick
    controls = controls and not quick
    stages = SeedProgress(seed, n_stages(spec, sweep, controls), progress)
    try:
        stages("toy")
        start = time.perf_counter()
        toy = train_toy_model(spec.toy, seed)
        toy_seconds = time.perf_counter() - start
        # Toy-sized products only lose to a second thread's synchronisation (on a shared 2-core
        # machine, metrics ran 2.5x slower with two); ResidMLP's 1000-wide ones still gain.
        n_params = sum(p.numel() for p in toy.model.parameters())
        with single_thread_if(n_params < SINGLE_THREAD_PARAMS):
            return _run_seed(
                spec, toy, toy_seconds, seed, settings, quick, out_dir, sweep, controls, stages
            )
    finally:
        stages.close()


def _run_seed(
    spec: ExperimentSpec,
    toy: Toy,
    toy_seconds: float,
    seed: int,
    settings: Settings,
    quick: bool,
    out_dir: Path,
    sweep: bool,
    controls: bool,
    stages: SeedProgress,
) -> dict:
    inputs = toy.sample(spec.inputs_for(settings), torch.Generator().manual_seed(seed + 10_000))
    fields = settings_for(spec, settings, quick)
    stages(f"L3D, {fields['epochs']} epochs")
    start = time.perf_counter()
    decomposition, resampled = decompose_toy(toy, fields, seed, inputs, stages.enabled)
    l3d_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = {
        "seed": seed,
        "toy": {k: v for k, v in toy.info.items() if k != "A"},
        "settings": fields,
        "resampled": resampled,
        "history": [
            {k: r[k] for k in ("epoch", "loss_pooled_squared", "loss_paper", "live_subnetworks")}
            for r in decomposition.history
        ],
        **measure(spec, toy, decomposition, seed, lambda name: stages(f"metrics: {name}")),
    }
    if sweep:
        result["sweep"] = run_sweep(spec, toy, fields, seed, inputs, stages)
    if controls:
        # At the run's count, also where the fields say 'auto': controls compare equal sizes.
        same = {**fields, "n_subnetworks": decomposition.n_subnetworks}
        stages("control: random network")
        result["control"] = random_control(spec, toy, same, seed, inputs, result)
        stages("stability: second decomposition seed")
        result["stability"] = stability(toy, same, seed, inputs, decomposition)
    result["seconds"] = {
        "toy": toy_seconds,
        "l3d": l3d_seconds,
        "metrics_and_sweep": time.perf_counter() - start,
    }
    stages("save and figures")
    decomposition.save(out_dir / f"seed{seed}" / "decomposition")

    seed_figures(spec, toy, decomposition, result, out_dir / f"seed{seed}")
    return result


CONTROL_SEED_OFFSET = 50_000
"""The random-network control's weights come from the toy's own initialisation at seed + this."""
STABILITY_SEED_OFFSET = 1
"""The second decomposition of the same toy runs at decomposition seed + this."""


def random_control(
    spec: ExperimentSpec, toy: Toy, fields: dict, seed: int, inputs: torch.Tensor, trained: dict
) -> dict:
    """The same decomposition of an untrained copy of the toy (its architecture at a random
    initialisation), with each headline metric's gap to the trained model's (`trained`: its
    `measure` result). A random network decomposes too, often to a lower loss (its gradients are
    simpler), and a sparse input still touches only its own columns of W_in, so a low loss or a
    high share says little on its own: only the gap to this control is evidence of learned
    structure."""
    model, _, _ = spec.toy.make(seed + CONTROL_SEED_OFFSET)
    control_toy = dataclasses.replace(toy, model=model.eval())
    decomposition, _ = decompose_toy(control_toy, fields, seed, inputs)
    heldout = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(seed + 20_000))
    probes = unit_probe_pool(toy, heldout, seed)
    rec = M.unit_recovery(M.unit_impacts(decomposition, probes, toy.units))
    sel = M.sample_selectivity(decomposition, heldout, toy.units, rec["assignment"], (1.0,))
    control = {
        "loss_pooled_squared": M.heldout_losses(decomposition, heldout, seed + 3)[
            "loss_pooled_squared"
        ],
        "mean_matched_share": sum(rec["matched_share"]) / len(rec["matched_share"]),
        "selectivity_median_ratio_delta1": sel["1.0"]["median_ratio"],
    }
    mine = {
        "loss_pooled_squared": trained["heldout"]["loss_pooled_squared"],
        "mean_matched_share": sum(trained["recovery"]["matched_share"])
        / len(trained["recovery"]["matched_share"]),
        "selectivity_median_ratio_delta1": trained["selectivity_samples"]["1.0"]["median_ratio"],
    }
    share_gap = mine["mean_matched_share"] - control["mean_matched_share"]
    selectivity_gain = mine["selectivity_median_ratio_delta1"] / max(
        control["selectivity_median_ratio_delta1"], 1e-12
    )
    return {
        "control": control,
        "trained": mine,
        "gap_mean_matched_share": share_gap,
        "gain_selectivity": selectivity_gain,
        "small_gaps": [
            name
            for name, small in (
                ("mean_matched_share", share_gap < controls.SMALL_GAP_SHARE),
                (
                    "selectivity_median_ratio_delta1",
                    selectivity_gain < controls.SMALL_GAP_SELECTIVITY,
                ),
            )
            if small
        ],
    }


def stability(
    toy: Toy, fields: dict, seed: int, inputs: torch.Tensor, decomposition: Decomposition
) -> dict:
    """Cross-seed stability: decompose the same toy again from another decomposition seed and
    match the two sets of live V_out directions (Hungarian on |cos|, the peers' MMCS between
    runs). 1.0 means the same subnetworks were found in both."""
    second, _ = decompose_toy(toy, fields, seed + STABILITY_SEED_OFFSET, inputs)

    def live_directions(d: Decomposition) -> torch.Tensor:
        with torch.no_grad():
            flat = d.subnetworks.v_out.materialize_flat()  # (n_v, n_weights)
        return flat[d.p_active > 0]

    found = controls.stability(live_directions(decomposition), live_directions(second))
    return {"second_seed": seed + STABILITY_SEED_OFFSET, **found}


def run_sweep(
    spec: ExperimentSpec,
    toy: Toy,
    fields: dict,
    seed: int,
    inputs: torch.Tensor,
    stages: SeedProgress | None = None,
) -> dict:
    """Held-out pooled squared loss and units recovered as one setting varies (Figs S5/S6,
    S10/S11); `stages` is told each point as it starts (and shows its epoch bar)."""
    assert spec.sweep is not None, "run_sweep needs a spec with a sweep"
    key, values = spec.sweep
    heldout = toy.sample(N_DECOMPOSE, torch.Generator().manual_seed(seed + 20_000))
    probes = unit_probe_pool(toy, heldout, seed)
    points = []
    for value in values:
        swept = {**fields, **spec.sweep_overrides, key: value}
        if stages is not None:
            stages(f"sweep {key}={value}")
        progress = stages is not None and stages.enabled
        decomposition, _ = decompose_toy(toy, swept, seed, inputs, progress)
        losses = M.heldout_losses(decomposition, heldout, seed + 3)
        impacts = M.unit_impacts(decomposition, probes, toy.units)
        rec = M.unit_recovery(impacts) if impacts.shape[1] >= impacts.shape[0] else {}
        points.append(
            {
                key: value,
                "loss_pooled_squared": losses["loss_pooled_squared"],
                "loss_paper": losses["loss_paper"],
                "n_recovered": rec.get("n_recovered"),
            }
        )
    return {"key": key, "overrides": spec.sweep_overrides, "points": points}


def summarize(spec: ExperimentSpec, results: list[dict], settings: Settings) -> dict:
    """Mean and std over seeds of the headline numbers."""

    def stat(get) -> dict:
        values = []
        for r in results:
            try:
                values.append(float(get(r)))
            except (KeyError, TypeError):
                continue
        mean, std = M.mean_std(values)
        return {"mean": mean, "std": std, "values": values}

    summary = {
        "experiment": spec.name,
        "settings": settings,
        "seeds": [r["seed"] for r in results],
        "loss_pooled_squared": stat(lambda r: r["heldout"]["loss_pooled_squared"]),
        "loss_paper": stat(lambda r: r["heldout"]["loss_paper"]),
        "units_recovered": stat(lambda r: r["recovery"]["n_recovered"]),
        **{
            f"units_recovered_at_{t}": stat(lambda r, t=t: r["recovery"]["n_recovered_at"][str(t)])
            for t in M.SHARE_THRESHOLDS[1:]
        },
        "min_matched_share": stat(lambda r: r["recovery"]["min_matched_share"]),
        "n_units": results[0]["recovery"]["n_units"],
        "seeds_all_recovered": sum(r["recovery"]["all_recovered"] for r in results),
        "dead_subnetworks": stat(lambda r: len(r["dead_subnetworks"])),
        "probe_errors_0.1": stat(lambda r: r["one_hot_probe"]["errors"]["0.1"]),
        # sample-wise selectivity; "selectivity" is its key in metrics.json written before the
        # output-wise metric existed
        "selectivity_median_ratio_delta1": stat(
            lambda r: r.get("selectivity_samples", r.get("selectivity"))["1.0"]["median_ratio"]
        ),
        "ablation_ratio_delta0.5": stat(lambda r: r["ablation"]["0.5"]["ratio"]),
        "ablation_per_sample_median_ratio_delta0.5": stat(
            lambda r: r["ablation"]["0.5"]["per_sample"]["median_ratio"]
        ),
        "ablation_per_sample_fraction_active_larger_delta0.5": stat(
            lambda r: r["ablation"]["0.5"]["per_sample"]["fraction_active_larger"]
        ),
        "seconds_l3d": stat(lambda r: r["seconds"]["l3d"]),
        "paper": spec.paper_results,
    }
    controlled = [r for r in results if "control" in r]
    if controlled:
        summary["control"] = {"seed": controlled[0]["seed"], **controlled[0]["control"]}
        summary["stability"] = {
            k: v for k, v in controlled[0]["stability"].items() if k != "matched_cosines"
        }
    if "hand_set" in results[0]:
        summary["hand_set"] = {
            "loss_pooled_squared": stat(lambda r: r["hand_set"]["loss_pooled_squared"]),
            "units_recovered_at_0.9": stat(lambda r: r["hand_set"]["n_recovered_at"]["0.9"]),
            "min_matched_share": stat(lambda r: r["hand_set"]["min_matched_share"]),
            "probe_errors_0.1": stat(lambda r: r["hand_set"]["probe_errors"]["0.1"]),
            **(
                {"pearson_r": stat(lambda r: r["hand_set"]["pearson_r"])}
                if "pearson_r" in results[0]["hand_set"]
                else {}
            ),
        }
    if spec.tms_masks:
        summary["mmcs"] = stat(lambda r: r["mmcs"])
        summary["parameter_units_recovered"] = stat(
            lambda r: r["parameter_recovery"]["n_recovered"]
        )
        summary["min_parameter_share"] = stat(
            lambda r: min(r["parameter_recovery"]["matched_share"])
        )
    if "coefficients" in results[0]:
        summary["pearson_r"] = stat(lambda r: r["coefficients"]["pearson_r"])
        summary["r_squared"] = stat(lambda r: r["coefficients"]["r_squared"])
    if spec.hidden_params:
        summary["selectivity_hidden_only_median_ratio_delta1"] = stat(
            lambda r: r.get("selectivity_samples_hidden_only", r.get("selectivity_hidden_only"))[
                "1.0"
            ]["median_ratio"]
        )
    for key in OUTPUT_SELECTIVITY_KEYS:
        if key in results[0]:
            for samples, delta in OUTPUT_SELECTIVITY_SUMMARY:
                summary[f"{key}_{samples}_median_ratio_delta{delta}"] = stat(
                    lambda r, k=key, s=samples, d=delta: r[k][s][d]["median_ratio"]
                )
    return summary


def run_experiment(
    name: str,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    out_dir: str | Path = "runs/experiments",
    *,
    settings: Settings = "paper",
    quick: bool = False,
    sweep: bool = True,
    progress: bool = True,
    overrides: dict | None = None,
    controls: bool = True,
) -> dict:
    """Run experiment `name` for each seed; write out_dir/metrics.json, figures and summary.md.

    quick: a few epochs (smoke test), no sweep or controls; sweep: run the rank / count sweep
    (first seed); controls: decompose a random-network control and a second decomposition seed
    (first seed);
    overrides: L3DConfig fields replacing the profile's, e.g. {"divergence": "mse_authors"};
    progress: a bar over seeds (with the ETA), one over each seed's stages (SeedProgress) and the
    decomposition's epoch bar.

    Returns {"summary": ..., "seeds": [per-seed metrics]}."""
    spec = get_spec(name)
    if not seeds:
        raise L3DError("no seeds given: pass e.g. seeds=[0, 1, 2]")
    if overrides:
        spec = with_overrides(spec, settings, overrides)
    settings_for(spec, settings, quick)  # a bad profile name fails before any training
    out_dir = writable_folder(out_dir, "experiment output")
    results = []
    seeds_bar = tqdm(list(seeds), desc=name, unit="seed", disable=not progress, dynamic_ncols=True)
    for i, seed in enumerate(seeds_bar):
        # The sweep (6 or 4 more decompositions) runs on the first seed only, to keep the suite
        # within its time budget.
        first = i == 0
        results.append(
            run_seed(
                spec, seed, settings, quick, out_dir, sweep and first, progress, controls and first
            )
        )
    summary = summarize(spec, results, settings)
    summary["overrides"] = dict(overrides or {})
    report = {"summary": summary, "seeds": results}
    write_json(out_dir / "metrics.json", report)

    experiment_figures(spec, report, out_dir)
    write_text(out_dir / "summary.md", summary_markdown(spec, summary, results))
    return report


def control_markdown(summary: dict) -> list[str]:
    """The random-network control and cross-seed stability (first seed) as a Markdown table."""
    c, st = summary["control"], summary["stability"]
    flag = lambda name: " **(small gap)**" if name in c["small_gaps"] else ""  # noqa: E731
    rows = [
        ("pooled squared loss", "loss_pooled_squared", "{:.3f}"),
        ("mean matched impact share", "mean_matched_share", "{:.3f}"),
        ("sample selectivity, median ratio at δ=1", "selectivity_median_ratio_delta1", "{:.1f}"),
    ]
    lines = [
        "",
        f"Random-network control (seed {c['seed']}: the same decomposition of the toy's "
        "architecture at random weights; a low loss alone is no evidence of structure):",
        "",
        "| metric | trained | random network |",
        "|---|---|---|",
    ]
    for what, key, form in rows:
        lines.append(
            f"| {what}{flag(key)} | {form.format(c['trained'][key])} | "
            f"{form.format(c['control'][key])} |"
        )
    lines += [
        "",
        f"Cross-seed stability (seed {c['seed']} decomposed again at seed {st['second_seed']}): "
        f"Hungarian-matched |cos| of the live V_out directions, mean {st['mmcs']:.3f}, "
        f"min {st['min']:.3f}.",
    ]
    return lines


def fmt(stat: dict, digits: int = 3) -> str:
    if stat["mean"] != stat["mean"]:  # NaN
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def hand_set_markdown(summary: dict) -> list[str]:
    """The learned decomposition's purity beside the hand-set solution's."""
    h = summary["hand_set"]
    rows = [
        ("held-out pooled squared loss", "loss_pooled_squared", "loss_pooled_squared", 3),
        ("units at impact share > 0.9", "units_recovered_at_0.9", "units_recovered_at_0.9", 2),
        ("min matched impact share", "min_matched_share", "min_matched_share", 3),
        ("one-hot probe errors (tol 0.1)", "probe_errors_0.1", "probe_errors_0.1", 1),
        ("coefficient recovery Pearson r", "pearson_r", "pearson_r", 3),
    ]
    lines = [
        "",
        "Hand-set solution (each unit's exact gradient direction, at the same ranks, V_in = "
        "V_out): the planted answer's scores. Where the units' gradients are nearly orthogonal "
        "(TMS, ResidMLP) a threshold it misses is out of any decomposition's reach.",
        "",
        "| metric | learned | hand-set |",
        "|---|---|---|",
    ]
    for what, mine, theirs, digits in rows:
        if theirs in h and mine in summary:
            lines.append(f"| {what} | {fmt(summary[mine], digits)} | {fmt(h[theirs], digits)} |")
    return lines


def summary_markdown(spec: ExperimentSpec, summary: dict, results: list[dict]) -> str:
    lines = [
        f"# {spec.name}: {spec.description}",
        "",
        f"Settings: **{summary['settings']}**"
        + (f" with overrides {summary['overrides']}" if summary.get("overrides") else "")
        + f", seeds {summary['seeds']}; decomposed on "
        f"{spec.inputs_for(summary['settings'])} inputs; all metrics on {N_DECOMPOSE} held-out "
        "samples; mean ± std over seeds.",
        "",
        "| metric | ours | paper |",
        "|---|---|---|",
        f"| pooled squared loss | {fmt(summary['loss_pooled_squared'])} | "
        f"{spec.paper_results.get('loss_pooled_squared', '-')} |",
        f"| loss eq. 8 (mean of ratios) | {fmt(summary['loss_paper'])} | - |",
        f"| units with their own subnetwork | {fmt(summary['units_recovered'], 2)} of "
        f"{summary['n_units']} (all in {summary['seeds_all_recovered']}/{len(results)} seeds)"
        " | - |",
        f"| dead subnetworks | {fmt(summary['dead_subnetworks'], 1)} | - |",
        f"| one-hot probe errors (tol 0.1) | {fmt(summary['probe_errors_0.1'], 1)} | - |",
        f"| sample selectivity (unit's samples / others), median ratio at δ=1 | "
        f"{fmt(summary['selectivity_median_ratio_delta1'], 1)} | - |",
        f"| units whose matched subnetwork has impact share > 0.8 / > 0.9 | "
        f"{fmt(summary['units_recovered_at_0.8'], 2)} / {fmt(summary['units_recovered_at_0.9'], 2)}"
        " | - |",
        f"| min matched impact share | {fmt(summary['min_matched_share'])} | - |",
        f"| ablation: active / inactive output change at δ=0.5 (pooled) | "
        f"{fmt(summary['ablation_ratio_delta0.5'], 1)} | - |",
        f"| ablation per sample: top-active / random inactive, median ratio at δ=0.5 "
        f"(share of samples where the active one moves more) | "
        f"{fmt(summary['ablation_per_sample_median_ratio_delta0.5'], 1)} "
        f"({fmt(summary['ablation_per_sample_fraction_active_larger_delta0.5'])}) | - |",
    ]
    if "mmcs" in summary:
        lines.append(f"| MMCS (peer convention) | {fmt(summary['mmcs'])} | - |")
        lines.append(
            f"| min share of norm on the matched feature's parameters | "
            f"{fmt(summary['min_parameter_share'])} | - |"
        )
    if "pearson_r" in summary:
        lines.append(
            f"| coefficient recovery Pearson r (eq. 12) | {fmt(summary['pearson_r'])} | "
            f"{spec.paper_results.get('pearson_r', '-')} |"
        )
        lines.append(f"| coefficient recovery r² | {fmt(summary['r_squared'])} | - |")
    if "selectivity_hidden_only_median_ratio_delta1" in summary:
        lines.append(
            f"| sample selectivity, hidden layers only (Fig. S8), δ=1 | "
            f"{fmt(summary['selectivity_hidden_only_median_ratio_delta1'], 1)} | - |"
        )
    for key, what in OUTPUT_SELECTIVITY_KEYS.items():
        for samples, delta in OUTPUT_SELECTIVITY_SUMMARY:
            name = f"{key}_{samples}_median_ratio_delta{delta}"
            if name in summary:
                lines.append(
                    f"| output selectivity (matched / other outputs), {what}, δ={delta}, "
                    f"{'samples with the unit active' if samples == 'active' else 'all samples'} "
                    f"| {fmt(summary[name], 1)} | - |"
                )
    lines.append(f"| L3D seconds per seed | {fmt(summary['seconds_l3d'], 1)} | - |")
    if "hand_set" in summary:
        lines += hand_set_markdown(summary)
    if "control" in summary:
        lines += control_markdown(summary)
    sweeps = [r["sweep"] for r in results if "sweep" in r]
    if sweeps:
        key = sweeps[0]["key"]
        lines += [
            "",
            f"Loss vs {key} (held-out pooled squared loss, seed {results[0]['seed']}):",
            "",
        ]
        lines += [f"| {key} | loss | units recovered |", "|---|---|---|"]
        for i, point in enumerate(sweeps[0]["points"]):
            losses = [s["points"][i]["loss_pooled_squared"] for s in sweeps]
            rec = [s["points"][i]["n_recovered"] for s in sweeps]
            mean, std = M.mean_std(losses)
            rec_txt = "-" if None in rec else f"{sum(rec) / len(rec):.1f}"
            lines.append(f"| {point[key]} | {mean:.3f} ± {std:.3f} | {rec_txt} |")
    lines += ["", "Figures: see the PNG files in this folder and in seed*/.", ""]
    return "\n".join(lines)
