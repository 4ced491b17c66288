"""Finetuning along subnetworks on the digits CNN: make the model read one digit as another
(relabel class a as b) through the subnetworks selected by impact on class a's images over the
others', with a retain term (KL to the frozen model) on the other eight classes. Measured on
held-out images of a (the share now predicted as b), of b (still b?) and of the other eight
(accuracy), against LoRA rank 1 and 4 (peft; on the block's 1x1 convolutions: peft's LoRA
refuses the depthwise convolution, and BatchNorm scales have no LoRA), full finetuning of the
block and random directions.

    python -m l3d.demos.finetune_digits --out runs/finetune-digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from l3d import plots
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.decomposition import Decomposition
from l3d.demos import digits_cnn as dc
from l3d.demos.common import command_line
from l3d.demos.finetune_common import (
    LABELS,
    METHODS,
    best_under,
    cached_decomposition,
    cached_model,
    decomposition_folder,
    parse_grid,
    parse_methods,
    sweep,
)
from l3d.finetuning import Edit, contrast_subnetworks
from l3d.io import write_json
from l3d.vision import ranks_by_fraction


def trained_model(seed: int, x: Tensor, y: Tensor, epochs: int, folder: Path) -> nn.Module:
    """The digits CNN of the digits demo, trained (or read from `folder`)."""
    torch.manual_seed(seed)
    model = dc.DigitsNet()
    settings = {"seed": seed, "train_epochs": epochs, "n_train": len(x)}
    return cached_model(folder, model, lambda: dc.train(model, x, y, epochs, seed), settings)


# What the decomposition covers (`--scope`): block features.3 with 20 subnetworks, or every
# parameter of the network (20,226 entries, 3.3x the block) with 40.
SCOPES: dict[str, tuple[str, int]] = {"block": (dc.BLOCK, 20), "model": ("*", 40)}


def decomposition_for(
    model: nn.Module, x: Tensor, seed: int, epochs: int, folder: Path, scope: str = "block"
):
    """The digits demo's decomposition of the tensors of `scope` (SCOPES; KL over classes),
    cached."""
    params, n_subnetworks = SCOPES[scope]
    config = L3DConfig.create(
        params=[params],
        n_subnetworks=n_subnetworks,
        rank=ranks_by_fraction(model, [params], 0.1),
        top_k=0.1,
        divergence="kl",
        batch_size=32,
        lr=0.005,
        epochs=epochs,
        warm_start_epochs=min(5, epochs // 5),
        seed=seed,
    )
    return cached_decomposition(folder, model, x, config)


def evaluation(x: Tensor, y: Tensor, source: int, goal: int):
    """Share of held-out `source` images predicted as `goal`, accuracy on `goal` images, and
    accuracy on the other eight classes (also relative to the frozen model's)."""
    others = (y != source) & (y != goal)

    def measure(logits: Tensor) -> dict[str, float]:
        predicted = logits.argmax(1)
        return {
            "source_as_goal": float((predicted[y == source] == goal).float().mean()),
            "goal_accuracy": float((predicted[y == goal] == goal).float().mean()),
            "retain_accuracy": float((predicted[others] == y[others]).float().mean()),
        }

    return measure


def relative(measure, x: Tensor, frozen_retain: float):
    """`measure` of an edit's outputs on x, with the retain accuracy relative to the frozen's."""

    def evaluate(edit: Edit) -> dict[str, float]:
        result = measure(edit.forward(x))
        result["retain_ratio"] = result["retain_accuracy"] / frozen_retain
        return result

    return evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--source", type=int, default=3, help="the digit to relabel")
    parser.add_argument("--goal", type=int, default=8, help="the digit to read it as")
    parser.add_argument("--n-subnetworks", type=positive_int, default=3)
    parser.add_argument(
        "--scope",
        default="block",
        choices=tuple(SCOPES),
        help="decompose block features.3 (20 subnetworks) or the whole network (40); LoRA and "
        "full finetuning cover the same tensors",
    )
    parser.add_argument("--train-epochs", type=positive_int, default=15)
    parser.add_argument("--epochs", type=positive_int, default=30, help="L3D epochs")
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--lrs", default="0.01,0.03,0.1")
    parser.add_argument("--alpha-lrs", default="0.03,0.1,0.3", help="lrs of alpha-only adapters")
    parser.add_argument(
        "--retain-weight", default="1", help="retain weights, comma-separated: each is a run"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=128, help="rows per finetuning step"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods, parser)
    grid = parse_grid(args, parser)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    runs: list[dict] = []
    for seed in grid.seeds:
        folder = args.out / f"seed{seed}"
        x_train, y_train, x_test, y_test = dc.digits(seed)
        model = trained_model(seed, x_train, y_train, args.train_epochs, folder)
        decomposition: Decomposition = decomposition_for(
            model, x_test, seed, args.epochs,
            decomposition_folder(folder, args.scope, "block"), args.scope,
        )  # fmt: skip
        # Edit from training images (never seen by the decomposition), measured on the test ones.
        is_source = y_train == args.source
        target = x_train[is_source]
        labels = torch.full((len(target),), args.goal)
        retain = x_train[(y_train != args.source) & (y_train != args.goal)]
        chosen = contrast_subnetworks(decomposition, target, retain[:200], args.n_subnetworks)
        measure = evaluation(x_test, y_test, args.source, args.goal)
        with torch.no_grad():
            frozen = measure(model(x_test))
        evaluate = relative(measure, x_test, frozen["retain_accuracy"])

        results["seeds"][seed] = {"subnetworks": chosen, "frozen": frozen}
        print(f"seed {seed}: frozen {frozen}; subnetworks {chosen}")
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
            retain=retain,
            batch_size=args.batch_size,
            describe=lambda end, run: (
                f"{args.source} read as {args.goal}: {end['source_as_goal']:.3f}"
                f"  {args.goal} kept: {end['goal_accuracy']:.3f}"
                f"  other eight: {end['retain_ratio']:.4f} of frozen"
            ),
        )
    results["runs"] = runs
    results["summary"] = summarize(runs, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    figure = plots.finetune_tradeoff_figure(
        runs,
        x="retain_ratio",
        y="source_as_goal",
        labels={m: LABELS[m] for m in methods},
        xlabel="accuracy on the other eight digits / frozen model's",
        ylabel=f"share of {args.source}s read as {args.goal}",
        ylog=False,
    )
    plots.save(figure, args.out / "tradeoff.png")
    for row in results["summary"]:
        print(row["line"])
    return results


def summarize(runs: list[dict], methods: list[str]) -> list[dict]:
    """Per method and seed: the largest share of source images read as the goal among
    checkpoints keeping >= 0.99 of the frozen accuracy on the other eight classes."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        for method in methods:
            best = best_under(
                runs, method, seed, "source_as_goal", lambda p: p["retain_ratio"] >= 0.99
            )
            n = next(r["n_trainable"] for r in runs if r["method"] == method)
            found = (
                f"{best['source_as_goal']:.3f} read as goal "
                f"(goal kept {best['goal_accuracy']:.3f}, others {best['retain_ratio']:.4f}, "
                f"lr {best['lr']:g}, retain weight {best['retain_weight']:g}, step {best['step']})"
                if best
                else "no checkpoint keeps the other eight"
            )
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "n_trainable": n,
                    "best": best,
                    "line": f"seed {seed} {LABELS[method]:18s} params {n:6d}  {found}",
                }
            )
    return rows


if __name__ == "__main__":
    command_line(main)
