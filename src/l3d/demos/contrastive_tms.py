"""Contrastive pairs on the toy model of superposition (paper Section 4.2): decompose the gradients
of the divergence between curated pairs of inputs and check that each feature's circuit comes out.

    python -m l3d.demos.contrastive_tms --out runs/contrastive [--seeds 0,1,2]

Per seed, trains TMS 5-2 through the toy registry (toy seed = seed + 1, as the TMS demo), then:

1. Single-feature pairs: for each feature j, inputs from the toy's sparse distribution in which j
   is active, against the same inputs with j zeroed. `decompose_pairs` into 1 and into 2 rank-1
   subnetworks with top_k=None, beside the top singular direction of the normalised per-pair
   gradients (PCA).
2. Mixed pairs: one unlabelled set in which each pair zeroes one random active feature. Five rank-1
   subnetworks with batch top-k (the main setting), beside the top 5 singular directions (PCA), 5
   random rank-1 directions, and ablations: top-k off, and rank 2 (W_in and W_out unconstrained)
   with top-k off and on.
3. Patching scores on held-out mixed pairs restricted to each feature's pairs: the fraction of the
   pairs' output difference that moving W0 along the matched direction closes (`patching_scores`,
   the same grid of steps for L3D, PCA and random directions), and its off-target score: the mean
   over the other features' pairs of the share of their divergence removed at that best step
   (`off_target_scores`).

Share: the fraction of a direction's squared norm on a feature's own parameters (column j of W_in,
row j of W_out, b_j). Directions are matched to features one-to-one by the Hungarian algorithm on
the shares. Prints the tables and writes summary.md and metrics.json to --out (the trained toys are
cached in --out/toy).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l3d.cli import positive_int
from l3d.decomposition import Decomposition
from l3d.demos.common import Clock, command_line, environment_line, seed_list
from l3d.experiments import metrics as M
from l3d.io import write_json, write_text
from l3d.pairs import (
    decompose_pairs,
    off_target_scores,
    pair_data,
    pair_gradients,
    patching_scores,
    singular_directions,
    unit_directions,
)
from l3d.toys import TMS, feature_parameter_mask
from l3d.toys.registry import Toy, get_toy, train_toy_model

PARAMS = ["W_in", "W_out", "b"]
N_FEATURES = 5
RECOVERED_SHARE = 0.9
"""A feature is recovered when its matched direction holds at least this share of its squared norm
on the feature's own parameters."""
DIVERGENCE = "mse"
L3D: dict[str, Any] = {"rank": 1, "loss": "paper", "lr": 0.01, "batch_size": 32}
"""Settings shared by every decomposition here (epochs come from --epochs). The loss is eq. 8, the
mean relative error per pair, so that every pair counts alike."""
SINGLE: dict[str, Any] = {"top_k": None}
"""Single-feature pairs: no sparsity, a plain rank-n_v reconstruction."""
MIXED: dict[str, Any] = {"top_k": 0.2, "warm_start_epochs": 5}
"""Mixed pairs: batch top-k keeping about one subnetwork per pair (k = 1/5), after 5 epochs at
top_k 0.999 (warm start)."""
NO_TOP_K: dict[str, Any] = {"top_k": None, "warm_start_epochs": 0}
ABLATIONS: dict[str, dict[str, Any]] = {
    "no warm start": {"warm_start_epochs": 0},
    "pooled squared loss": {"loss": "pooled_squared"},
    "top-k off": NO_TOP_K,
    "rank 2, top-k off": {"rank": 2, **NO_TOP_K},
    "rank 2": {"rank": 2},
}
"""Mixed-pair variants of the main setting (the changes to it). Rank 2 is the full rank of W_in
(2x5) and W_out (5x2): no low-rank constraint is left to tell the features apart."""
SWEEP_TOP_K: list[float | None] = [None, 0.1, 0.15, 0.2, 0.3, 0.4]
SWEEP_RANKS = [1, 2]
METHODS = ("l3d", "pca", "random")
"""The directions compared: L3D's subnetworks, the top singular directions, random ones."""


# Pairs ------------------------------------------------------------------------------------------


def draw(toy: Toy, n: int, generator: torch.Generator, keep: Callable[[Tensor], Tensor]) -> Tensor:
    """n inputs from the toy's distribution for which keep(inputs) (a row mask) holds."""
    parts, found = [], 0
    while found < n:
        x = toy.sample(20 * n, generator)
        x = x[keep(x)]
        parts.append(x)
        found += len(x)
    return torch.cat(parts)[:n]


def single_feature_pairs(
    toy: Toy, feature: int, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """n inputs in which `feature` is active, and the same inputs with it zeroed."""
    x = draw(toy, n, generator, lambda x: x[:, feature] > 0)
    counterparts = x.clone()
    counterparts[:, feature] = 0
    return x, counterparts


def mixed_pairs(toy: Toy, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """n inputs with at least one active feature, the same inputs with one of their active
    features (drawn uniformly) zeroed, and which feature that was (n,) (never given to L3D)."""
    x = draw(toy, n, generator, lambda x: (x > 0).any(1))
    zeroed = torch.multinomial((x > 0).float(), 1, generator=generator).squeeze(1)
    counterparts = x.clone()
    counterparts[torch.arange(n), zeroed] = 0
    return x, counterparts, zeroed


# Baselines --------------------------------------------------------------------------------------


def random_directions(
    shapes: dict[str, tuple[int, ...]], n: int, rank: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """n random directions of the subnetworks' form: each matrix a sum of `rank` random outer
    products, each vector random; unit global norm each. {param: (n, *shape)}."""
    parts = {}
    for p, shape in shapes.items():
        if len(shape) == 2:
            a = torch.randn(n, rank, shape[0], generator=generator)
            b = torch.randn(n, rank, shape[1], generator=generator)
            parts[p] = torch.einsum("nri,nrj->nij", a, b)
        else:
            parts[p] = torch.randn(n, *shape, generator=generator)
    norms = torch.stack([t.flatten(1).pow(2).sum(1) for t in parts.values()]).sum(0).sqrt()
    return {p: t / norms.view(-1, *[1] * (t.dim() - 1)) for p, t in parts.items()}


def match(directions: dict[str, Tensor], masks: dict[str, Tensor]) -> dict:
    """Directions matched one-to-one to features by their share on the feature's own parameters:
    {'assignment': direction of each feature, 'share': its share}."""
    shares = M.parameter_share(directions, masks).T  # (features, directions)
    recovery = M.recovery(shares, threshold=RECOVERED_SHARE)
    return {"assignment": recovery["assignment"], "share": recovery["matched_share"]}


# One seed ---------------------------------------------------------------------------------------


def l3d_pairs(
    model: nn.Module, x: Tensor, counterparts: Tensor, n_subnetworks: int, seed: int, fields: dict
) -> Decomposition:
    return decompose_pairs(
        model, x, counterparts, params=PARAMS, n_subnetworks=n_subnetworks, divergence=DIVERGENCE,
        seed=seed, progress=False, **fields,
    )  # fmt: skip


def patching(
    decomposition: Decomposition,
    directions: list[dict[str, Tensor]],
    held_out: tuple[Tensor, Tensor, Tensor],
    assignment: list[int],
    deltas: Tensor,
) -> dict:
    """Each matched direction's patching score on its own feature's held-out pairs, and its mean
    off-target score on the other features' pairs (`off_target_scores`: the share of their
    divergence removed at the step that closes most of its own feature's)."""
    x, counterparts, zeroed = held_out
    model = decomposition.model
    pairs = [pair_data(model, x[zeroed == j], counterparts[zeroed == j]) for j in range(N_FEATURES)]
    own, off = [], []
    for j, k in enumerate(assignment):
        v = [directions[k]]
        own.append(float(patching_scores(decomposition, pairs[j], deltas=deltas, directions=v)[0]))
        others = [
            float(
                off_target_scores(decomposition, pairs[j], pairs[i], deltas=deltas, directions=v)[0]
            )
            for i in range(N_FEATURES)
            if i != j
        ]
        off.append(sum(others) / len(others))
    return {"own": own, "off_target": off}


def run_seed(
    seed: int,
    out: Path,
    *,
    epochs: int,
    n_single: int,
    n_mixed: int,
    patch_scale: float,
    sweep: bool,
) -> dict:
    """Trains the toy for `seed`, then the three parts of the demo (module docstring)."""
    start = time.perf_counter()
    toy = train_toy_model(get_toy("tms"), seed + 1, cache=out / "toy")
    model = toy.model
    assert isinstance(model, TMS)
    masks = feature_parameter_mask(model)
    generator = torch.Generator().manual_seed(5000 + seed)
    fields = {**L3D, "epochs": epochs}

    # 1. one pair set per feature
    single: dict[str, list[float]] = {"l3d_1": [], "l3d_2": [], "l3d_2_other": [], "pca": []}
    for j in range(N_FEATURES):
        x, counterparts = single_feature_pairs(toy, j, n_single, generator)
        for n_v in (1, 2):
            d = l3d_pairs(model, x, counterparts, n_v, seed, {**fields, **SINGLE})
            shares = M.parameter_share(M.dense_directions(d), masks)[:, j].tolist()
            single[f"l3d_{n_v}"].append(max(shares))
            if n_v == 2:
                single["l3d_2_other"].append(min(shares))
        pca = singular_directions(pair_gradients(d, x, counterparts), 1)
        single["pca"].append(float(M.parameter_share(pca, masks)[0, j]))

    # 2. one unlabelled set of mixed pairs
    x, counterparts, zeroed = mixed_pairs(toy, n_mixed, generator)
    held_out = mixed_pairs(toy, n_mixed, generator)
    main = l3d_pairs(model, x, counterparts, N_FEATURES, seed, {**fields, **MIXED})
    pca = singular_directions(pair_gradients(main, x, counterparts), N_FEATURES)
    rand = random_directions(main.shapes, N_FEATURES, L3D["rank"], generator)
    found = {
        "l3d": match(M.dense_directions(main), masks),
        "pca": match(pca, masks),
        "random": match(rand, masks),
    }
    evaluation = main.evaluate(pair_data(model, held_out[0], held_out[1]), seed=seed)
    found["l3d"].update(
        held_out_loss_pooled_squared=evaluation.loss_pooled_squared,
        held_out_p_active=evaluation.p_active.tolist(),
    )
    ablations = {}
    for name, change in ABLATIONS.items():
        d = l3d_pairs(model, x, counterparts, N_FEATURES, seed, {**fields, **MIXED, **change})
        ablations[name] = match(M.dense_directions(d), masks)["share"]
    sweep_result = {}
    if sweep:
        for rank in SWEEP_RANKS:
            for top_k in SWEEP_TOP_K:
                change = {"rank": rank, **(NO_TOP_K if top_k is None else {"top_k": top_k})}
                d = l3d_pairs(
                    model, x, counterparts, N_FEATURES, seed, {**fields, **MIXED, **change}
                )
                sweep_result[f"rank {rank}, top_k {top_k}"] = min(
                    match(M.dense_directions(d), masks)["share"]
                )

    # 3. patching scores on held-out pairs, one feature's pairs at a time
    deltas = torch.linspace(-patch_scale, patch_scale, 81) * main.weight_norm()

    l3d = [main.v_out(k) for k in range(N_FEATURES)]
    patch = {
        name: patching(main, directions, held_out, found[name]["assignment"], deltas)
        for name, directions in (
            ("l3d", l3d), ("pca", unit_directions(pca)), ("random", unit_directions(rand))
        )
    }  # fmt: skip
    return {
        "seed": seed,
        "toy_seed": toy.info["init_seed"],
        "single_feature": single,
        "mixed": {
            **found,
            "pairs_per_feature": torch.bincount(zeroed, minlength=N_FEATURES).tolist(),
            "ablations": ablations,
            **({"sweep_min_share": sweep_result} if sweep else {}),
        },
        "patching": patch,
        "seconds": time.perf_counter() - start,
    }


# Tables -----------------------------------------------------------------------------------------


def _row(*cells: object) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def seed_table(r: dict) -> list[str]:
    """Every feature's shares and patching scores for one seed."""
    s, m, p = r["single_feature"], r["mixed"], r["patching"]
    lines = [
        f"### Seed {r['seed']} (toy init seed {r['toy_seed']}, {r['seconds']:.0f} s)",
        "",
        "| feature | single: L3D n_v=1 | L3D n_v=2 (best, other) | PCA top-1 | mixed: L3D "
        "(subnetwork) | PCA | random | patching own / off-target: L3D | PCA | random |",
        "|---|" + "---|" * 9,
    ]
    for j in range(N_FEATURES):
        patched = [f"{p[a]['own'][j]:.3f} / {p[a]['off_target'][j]:.3f}" for a in METHODS]
        lines.append(
            _row(
                j, s["l3d_1"][j], f"{s['l3d_2'][j]:.3f}, {s['l3d_2_other'][j]:.3f}", s["pca"][j],
                f"{m['l3d']['share'][j]:.3f} ({m['l3d']['assignment'][j]})", m["pca"]["share"][j],
                m["random"]["share"][j], *patched,
            )
        )  # fmt: skip
    return lines


def overview(results: list[dict]) -> list[str]:
    """Per seed: the smallest share over the 5 features for each method and ablation, then the
    patching scores' worst cases (smallest own, largest off-target)."""
    ablations = list(results[0]["mixed"]["ablations"])
    head = ["seed", "single: L3D n_v=1", "L3D n_v=2", "PCA", "mixed: L3D", "PCA", "random",
            *ablations]  # fmt: skip
    lines = [
        "Smallest share over the 5 features (mixed-pair ablations: changes to the main setting):",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---|" * (len(head) - 1),
    ]
    for r in results:
        s, m = r["single_feature"], r["mixed"]
        lines.append(
            _row(
                r["seed"], min(s["l3d_1"]), min(s["l3d_2"]), min(s["pca"]),
                min(m["l3d"]["share"]), min(m["pca"]["share"]), min(m["random"]["share"]),
                *(min(m["ablations"][a]) for a in ablations),
            )
        )  # fmt: skip
    lines += [
        "",
        "Patching scores on held-out mixed pairs, each matched direction on its own feature's "
        "pairs (smallest over the features), and its off-target score on the other features' "
        "pairs at that best step (largest mean):",
        "",
        "| seed | L3D own | L3D off-target | PCA own | PCA off-target | random own | "
        "random off-target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["patching"]
        cells = [c for a in METHODS for c in (min(p[a]["own"]), max(p[a]["off_target"]))]
        lines.append(_row(r["seed"], *cells))
    if "sweep_min_share" in results[0]["mixed"]:
        lines += [
            "",
            "Sweep on the mixed pairs (smallest share over the features; warm start whenever "
            "top-k is on):",
            "",
            "| setting | " + " | ".join(f"seed {r['seed']}" for r in results) + " |",
            "|---|" + "---|" * len(results),
        ]
        for name in results[0]["mixed"]["sweep_min_share"]:
            lines.append(_row(name, *(r["mixed"]["sweep_min_share"][name] for r in results)))
    return lines


def targets(results: list[dict]) -> dict[str, bool]:
    """The demo's claims: every feature recovered from its single-feature pairs (1 and 2
    subnetworks) and from the mixed pairs, and the mixed-pair L3D shares above PCA's."""

    def every(values: list[float]) -> bool:
        return all(v >= RECOVERED_SHARE for v in values)

    return {
        "single_feature_recovered": all(
            every(r["single_feature"]["l3d_1"]) and every(r["single_feature"]["l3d_2"])
            for r in results
        ),
        "mixed_recovered": all(every(r["mixed"]["l3d"]["share"]) for r in results),
        "mixed_beats_pca": all(
            min(r["mixed"]["l3d"]["share"]) > max(r["mixed"]["pca"]["share"]) for r in results
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=positive_int, default=50, help="L3D epochs (default 50)")
    parser.add_argument(
        "--single-pairs", type=positive_int, default=500, help="pairs per feature (default 500)"
    )
    parser.add_argument(
        "--mixed-pairs",
        type=positive_int,
        default=1000,
        help="mixed pairs, as many held out (default 1000)",
    )
    parser.add_argument(
        "--patch-scale",
        type=float,
        default=2.0,
        help="patching steps: 81 in [-s, s] x ||W0|| (default 2, patching_scores' own grid)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help=f"also decompose the mixed pairs at top_k {SWEEP_TOP_K} x rank {SWEEP_RANKS}",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (default 1)"
    )
    args = parser.parse_args(argv)
    seeds = seed_list(args.seeds)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()

    results = []
    for seed in seeds:
        print(f"seed {seed}: training TMS 5-2 (or reading it from {out}/toy), decomposing ...")
        results.append(
            run_seed(
                seed, out, epochs=args.epochs, n_single=args.single_pairs,
                n_mixed=args.mixed_pairs, patch_scale=args.patch_scale, sweep=args.sweep,
            )
        )  # fmt: skip
    met = targets(results)
    environment = clock.environment()
    summary = [
        "# Contrastive pairs on TMS 5-2",
        "",
        f"Share: the fraction of a direction's squared norm on the matched feature's own "
        f"parameters; recovered at >= {RECOVERED_SHARE}. L3D: {L3D}, {args.epochs} epochs; "
        f"single-feature pairs {SINGLE}, mixed pairs {MIXED}. {args.single_pairs} pairs per "
        f"feature, {args.mixed_pairs} mixed pairs and as many held out for patching (steps in "
        f"[-{args.patch_scale:g}, {args.patch_scale:g}] x ||W0||).",
        "",
        *overview(results),
        "",
        *[line for r in results for line in [*seed_table(r), ""]],
        "Targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + ".",
        "",
        environment_line(environment),
    ]
    print("\n".join(summary))
    metrics = {
        "seeds": seeds,
        "settings": {
            "l3d": L3D, "single": SINGLE, "mixed": MIXED, "ablations": ABLATIONS,
            "epochs": args.epochs, "divergence": DIVERGENCE, "single_pairs": args.single_pairs,
            "mixed_pairs": args.mixed_pairs, "patch_scale": args.patch_scale,
        },
        "results": results,
        "targets": met,
        "environment": environment,
    }  # fmt: skip
    write_json(out / "metrics.json", metrics)
    write_text(out / "summary.md", "\n".join(summary) + "\n")
    print(f"Wrote {out}/summary.md and {out}/metrics.json")
    return metrics


if __name__ == "__main__":
    command_line(main)
