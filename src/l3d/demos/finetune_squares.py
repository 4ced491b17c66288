"""Finetuning along subnetworks on the X -> X^2 toy (Section 3.4): change one output, y_j = 2 x_j^2,
through the subnetwork matched to input j, and measure how much the other outputs move, against
LoRA rank 1 and 4, full finetuning and random directions (same data, steps and optimiser).

The target rows are the inputs where x_j is active; the edit is learned from them alone (no retain
term), so what keeps the other outputs still is only where each method can move the weights.

    python -m l3d.demos.finetune_squares --out runs/finetune-squares
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from l3d import plots
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.decomposition import Decomposition
from l3d.demos.common import command_line
from l3d.demos.finetune_common import (
    LABELS,
    METHODS,
    cached_decomposition,
    parse_grid,
    parse_methods,
    sweep,
)
from l3d.finetuning import Edit, top_subnetworks
from l3d.io import write_json
from l3d.toys.registry import Toy, get_toy, train_toy_model

N_SAMPLES = 1000


def decomposition_for(toy: Toy, seed: int, epochs: int, folder: Path) -> Decomposition:
    """L3D on all of the toy's parameters with the improved squares profile (10 subnetworks,
    weights rank 2, biases rank 1, top_k 0.15), saved in `folder` and reused from there."""
    tenth = max(1, epochs // 10)
    config = L3DConfig.create(
        params=[n for n, _ in toy.model.named_parameters()],
        n_subnetworks=10,
        rank={"*.weight": 2, "*.bias": 1},
        top_k=0.15,
        loss="pooled_squared",
        epochs=epochs,
        batch_size=32,
        lr=0.01,
        lr_decay=0.8,
        lr_decay_every=tenth,
        lr_decay_unit="epoch",
        resample_every=tenth,
        resample_until=epochs // 2,
        seed=seed,
    )
    inputs = toy.sample(N_SAMPLES, torch.Generator().manual_seed(seed + 10_000))
    return cached_decomposition(folder, toy.model, inputs, config)


def evaluation(model: torch.nn.Module, x: Tensor, output: int):
    """Measures of an edit on held-out inputs x: the target cells are output `output` where
    x_output is active. target_error: their mean squared error to 2 x^2, relative to the frozen
    model's; off_target: the mean squared change of every other cell (other outputs, and this
    output where x_output is 0)."""
    with torch.no_grad():
        base = model(x)
    wanted = 2 * x[:, output].pow(2)
    cells = torch.zeros_like(base, dtype=torch.bool)
    cells[:, output] = x[:, output] != 0
    frozen_error = float((base[:, output] - wanted)[cells[:, output]].pow(2).mean())

    def evaluate(edit: Edit) -> dict[str, float]:
        out = edit.forward(x)
        error = (out[:, output] - wanted)[cells[:, output]].pow(2).mean()
        return {
            "target_error": float(error) / frozen_error,
            "off_target": float((out - base)[~cells].pow(2).mean()),
        }

    return evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--toy", default="squares", help="squares (paper) or squares_wide")
    parser.add_argument("--seeds", default="0", help="toy and decomposition seeds, e.g. 0,1,2")
    parser.add_argument("--output", type=int, default=0, help="the output j to change")
    parser.add_argument(
        "--n-subnetworks", type=positive_int, default=1, help="subnetworks to move along"
    )
    parser.add_argument("--epochs", type=positive_int, default=100, help="L3D epochs")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--alpha-lrs", default="0.03,0.1,0.3", help="lrs of alpha-only adapters")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated; must include l3d_scalars (its fit is the summary's threshold)",
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods, parser, ("l3d_scalars",))
    grid = parse_grid(args, parser)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    runs: list[dict] = []
    for seed in grid.seeds:
        toy = train_toy_model(get_toy(args.toy), seed)
        decomposition = decomposition_for(
            toy, seed, args.epochs, args.out / f"seed{seed}" / "decomposition"
        )
        x = toy.sample(N_SAMPLES, torch.Generator().manual_seed(seed + 40_000))
        target = x[x[:, args.output] != 0]
        with torch.no_grad():
            labels = toy.model(target)
        labels[:, args.output] = 2 * target[:, args.output].pow(2)
        chosen = top_subnetworks(decomposition, target, args.n_subnetworks)
        heldout = toy.sample(4 * N_SAMPLES, torch.Generator().manual_seed(seed + 50_000))
        evaluate = evaluation(toy.model, heldout, args.output)
        results["seeds"][seed] = {"subnetworks": chosen, "n_target_rows": len(target)}
        runs += sweep(
            methods,
            grid,
            decomposition,
            (target, labels),
            seed=seed,
            steps=args.steps,
            subnetworks=chosen,
            objective="labels",
            evaluate=evaluate,
            describe=lambda end, run: (
                f"target error {end['target_error']:.3f}  off-target {end['off_target']:.2e}"
            ),
        )
    results["runs"] = runs
    results["summary"] = summarize(runs, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plots.save(
        plots.finetune_tradeoff_figure(
            runs,
            x="target_error",
            y="off_target",
            labels={m: LABELS[m] for m in methods},
            xlabel="target error (relative to the frozen model)",
            ylabel="mean squared change of the other outputs",
        ),
        args.out / "tradeoff.png",
    )
    for row in results["summary"]:
        print(row["line"])
    return results


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """Per seed and method, the smallest off-target change among checkpoints (over learning rates
    and steps) that fit the target at least as well as a threshold: the best target error that
    L3D scalars reach (the few-parameter adapter's fit), and 0.1 of the frozen model's error."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        points = {
            method: [
                {**p, "lr": r["lr"], "n_trainable": r["n_trainable"]}
                for r in runs
                if r["method"] == method and r["seed"] == seed
                for p in r["curve"]
            ]
            for method in methods
        }
        scalars_fit = min(p["target_error"] for p in points["l3d_scalars"])
        for method in methods:
            row: dict = {"seed": seed, "method": method}
            row["n_trainable"] = points[method][0]["n_trainable"]
            row["best_target_error"] = min(p["target_error"] for p in points[method])
            parts = []
            for name, fit in (("at_scalars_fit", scalars_fit), ("at_0.1", 0.1)):
                fitting = [p for p in points[method] if p["target_error"] <= fit + 1e-9]
                best = min(fitting, key=lambda p: p["off_target"]) if fitting else None
                row[f"off_target_{name}"] = best["off_target"] if best else None
                parts.append(f"{best['off_target']:.2e}" if best else "   never  ")
            row["scalars_fit"] = scalars_fit
            row["line"] = (
                f"seed {seed} {LABELS[method]:18s} params {row['n_trainable']:5d}  off-target at "
                f"target error <= {scalars_fit:.3f}: {parts[0]}, <= 0.1: {parts[1]}; best target "
                f"error {row['best_target_error']:.3f}"
            )
            rows.append(row)
    return rows


if __name__ == "__main__":
    command_line(main)
