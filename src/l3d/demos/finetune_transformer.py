"""Finetuning along subnetworks on the synthetic multi-task transformer: remove one task (push its
answer predictions to the uniform distribution, so its answer loss rises towards chance; or with
`--objective suppress` push the right answers' probability to 0) while keeping the other tasks'
accuracy, moving the weights only along the subnetworks selected by impact on that task's samples
over the others' (`--select contrast`) or by the edit objective's gradient per unit of retain
curvature in their core subspaces (`--select objective`), through their scalars alpha or a small
core inside each one's factor subspaces. Compared with LoRA rank 1 and 4, full finetuning of the
same block and random directions, each over the same learning rates, steps and retain weights.

The trade-off curve is the removed task's answer loss against the other tasks' answer accuracy
(relative to the frozen model's) at every evaluated step; the summary takes, per method and seed,
the largest target loss and the lowest target accuracy at retain accuracy >= 0.99 of the frozen
model's, over learning rates, retain weights and steps, and the most retain accuracy kept where
the target loss reached chance and where no target answer is right.

    python -m l3d.demos.finetune_transformer --out runs/finetune-transformer --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3d import plots
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.decomposition import Decomposition
from l3d.demos import synthetic_transformer as st
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
from l3d.finetuning import IGNORE, Edit, contrast_subnetworks, objective_subnetworks
from l3d.io import write_json

RETAIN_FRACTION = 0.99
# What the decomposition covers (`--scope`): attention block 1 with 16 subnetworks, or every
# attention and MLP weight and bias of both layers (99,072 entries, 6x the block) with 32.
SCOPES: dict[str, tuple[list[str], int]] = {
    "block": (st.BLOCK, 16),
    "layers": (
        [
            "transformer.h.*.attn.attention.*_proj.weight",
            "transformer.h.*.attn.attention.out_proj.bias",
            "transformer.h.*.mlp.c_*.weight",
            "transformer.h.*.mlp.c_*.bias",
        ],
        32,
    ),
}


def trained_model(seed: int, steps: int, folder: Path) -> nn.Module:
    """The demo's transformer trained on all four tasks, cached in `folder`."""
    model = st.build_model(seed)
    settings = {"seed": seed, "train_steps": steps}
    return cached_model(folder, model, lambda: st.train(model, steps, seed), settings)


def decomposition_for(
    model: nn.Module,
    data: dict[str, Tensor],
    seed: int,
    epochs: int,
    folder: Path,
    scope: str = "block",
    n_subnetworks: int | None = None,
) -> Decomposition:
    """The synthetic-transformer demo's decomposition of the tensors of `scope` (SCOPES;
    per-token KL) into n_subnetworks (None: the scope's), cached in `folder`."""
    params, default_count = SCOPES[scope]
    n_subnetworks = n_subnetworks or default_count
    config = L3DConfig.create(
        params=params,
        n_subnetworks=n_subnetworks,
        rank=4,
        top_k=0.1,
        divergence="kl",
        per_token=True,
        batch_size=16,
        lr=0.005,
        epochs=epochs,
        warm_start_epochs=min(2, epochs // 5),
        seed=seed,
    )
    return cached_decomposition(folder, model, data, config)


def next_token_labels(data: dict[str, Tensor], answer: Tensor) -> Tensor:
    """(n, seq) the next token at answer positions, IGNORE elsewhere."""
    labels = torch.full_like(data["input_ids"], IGNORE)
    labels[:, :-1] = torch.where(answer[:, :-1], data["input_ids"][:, 1:], IGNORE)
    return labels


def evaluation(data: dict[str, Tensor], tasks: Tensor, answer: Tensor, forget: int, frozen: dict):
    """Answer loss and accuracy of the forgotten task and mean answer accuracy of the others
    (relative to the frozen model's) on held-out sequences."""
    labels = next_token_labels(data, answer)
    target_rows = (tasks == forget)[:, None] & (labels != IGNORE)
    retain_rows = [(tasks == t)[:, None] & (labels != IGNORE) for t in range(len(st.TASKS))]

    def measure(logits: Tensor) -> dict[str, float]:
        ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        correct = (logits.argmax(-1) == labels).float()
        others = [float(correct[rows].mean()) for t, rows in enumerate(retain_rows) if t != forget]
        return {
            "target_loss": float(ce[target_rows].mean()),
            "target_accuracy": float(correct[target_rows].mean()),
            "retain_accuracy": sum(others) / len(others),
        }

    def evaluate(edit: Edit) -> dict[str, float]:
        result = measure(edit.forward(data))
        result["retain_ratio"] = result["retain_accuracy"] / frozen["retain_accuracy"]
        return result

    return measure, evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0", help="model, data and decomposition seeds")
    parser.add_argument("--forget", default="count", choices=st.TASKS, help="the task to remove")
    parser.add_argument(
        "--objective",
        default="forget",
        choices=("forget", "suppress"),
        help="push the task's answers to the uniform distribution (loss to chance), or push their "
        "probability to 0 (unlikelihood: answers no longer predicted)",
    )
    parser.add_argument(
        "--n-subnetworks", type=positive_int, default=3, help="subnetworks to move along"
    )
    parser.add_argument(
        "--select",
        default="contrast",
        choices=("contrast", "objective"),
        help="subnetworks by impact contrast, or by the forget objective's gradient per retain "
        "curvature in their core subspaces (objective_subnetworks)",
    )
    parser.add_argument(
        "--scope",
        default="block",
        choices=tuple(SCOPES),
        help="decompose attention block 1 (16 subnetworks) or every attention and MLP tensor of "
        "both layers (32); LoRA and full finetuning cover the same tensors",
    )
    parser.add_argument(
        "--decomposition-subnetworks",
        type=positive_int,
        help="subnetworks of the decomposition (default: the scope's)",
    )
    parser.add_argument(
        "--train-steps", type=positive_int, default=3000, help="transformer training"
    )
    parser.add_argument("--epochs", type=positive_int, default=40, help="L3D epochs")
    parser.add_argument("--n-per-task", type=positive_int, default=100, help="sequences per task")
    parser.add_argument("--steps", type=positive_int, default=100, help="finetuning steps")
    parser.add_argument(
        "--n-target",
        type=int,
        help="target-task sequences to finetune on (default: all of the finetuning set's, about "
        "n_per_task / 2); fewer asks how far an edit learnt from a few examples carries to the "
        "held-out ones",
    )
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
    methods = parse_methods(args.methods, parser)
    grid = parse_grid(args, parser)
    if args.train_steps < 20:  # the one-cycle schedule warms up over 10 % of them
        parser.error(f"--train-steps {args.train_steps}: use at least 20")
    if args.decomposition_subnetworks is not None and args.decomposition_subnetworks < 1:
        parser.error(f"--decomposition-subnetworks {args.decomposition_subnetworks}: use 1 or more")
    if args.n_target is not None and args.n_target < 1:
        parser.error(f"--n-target {args.n_target}: use 1 or more")
    torch.set_num_threads(args.threads)
    forget = st.TASKS.index(args.forget)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    runs: list[dict] = []
    for seed in grid.seeds:
        folder = args.out / f"seed{seed}"
        start = time.perf_counter()
        model = trained_model(seed, args.train_steps, folder)
        data, _, _ = st.dataset(args.n_per_task, seed=seed + 1)
        n_v = args.decomposition_subnetworks
        cache = decomposition_folder(folder, args.scope, "block", n_v)
        decomposition = decomposition_for(model, data, seed, args.epochs, cache, args.scope, n_v)
        prepare_seconds = time.perf_counter() - start
        # Finetuning data: fresh sequences; evaluation: other fresh ones.
        tune, tune_tasks, tune_answer = st.dataset(args.n_per_task // 2, seed=seed + 2)
        is_target = tune_tasks == forget
        # The first n_target of the task's sequences (the data are drawn at random).
        keep = slice(None, args.n_target)
        target = {k: v[is_target][keep] for k, v in tune.items()}
        target_answer = tune_answer[is_target][keep]
        retain = {k: v[~is_target] for k, v in tune.items()}
        labels = next_token_labels(target, target_answer)
        if args.select == "objective":
            # The edit objective's gradient per unit of retain KL curvature, per core subspace.
            chosen = objective_subnetworks(
                decomposition,
                (target, labels),
                retain,
                args.n_subnetworks,
                objective=args.objective,
            )
        else:
            # By impact on the target task's answer tokens over the other tasks' ones.
            chosen = contrast_subnetworks(
                decomposition,
                target,
                retain,
                args.n_subnetworks,
                target_samples=target_answer[target["attention_mask"].bool()],
                retain_samples=tune_answer[~is_target][retain["attention_mask"].bool()],
            )
        held, held_tasks, held_answer = st.dataset(args.n_per_task, seed=seed + 3)
        measure, _ = evaluation(held, held_tasks, held_answer, forget, {})
        with torch.no_grad():
            frozen = measure(model(**held).logits)
        _, evaluate = evaluation(held, held_tasks, held_answer, forget, frozen)
        results["seeds"][seed] = {
            "subnetworks": chosen,
            "frozen": frozen,
            "chance_loss": math.log(st.VOCAB),
            "prepare_seconds": prepare_seconds,
            "target_sequences": len(target_answer),
            "target_answers": int((labels != IGNORE).sum()),  # the tokens the edit acts on
            "p_active": decomposition.p_active.tolist(),
        }
        print(f"seed {seed}: frozen {frozen}; subnetworks {chosen}")
        runs += sweep(
            methods,
            grid,
            decomposition,
            (target, labels),
            seed=seed,
            steps=args.steps,
            subnetworks=chosen,
            objective=args.objective,
            evaluate=evaluate,
            retain=retain,
            batch_size=args.batch_size,
            describe=lambda end, run: (
                f"target loss {end['target_loss']:.3f} acc {end['target_accuracy']:.3f}"
                f"  retain ratio {end['retain_ratio']:.4f}  ({run['seconds']:.0f} s)"
            ),
        )
    results["runs"] = runs
    results["summary"] = summarize(runs, methods, math.log(st.VOCAB))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    # Suppressing drives the answers' probability to 0, so its loss has no ceiling: show what the
    # objective is for, the answers still right.
    y, ylabel = (
        ("target_accuracy", f"answer accuracy of '{args.forget}'")
        if args.objective == "suppress"
        else ("target_loss", f"answer loss of '{args.forget}' (chance {math.log(st.VOCAB):.2f})")
    )
    figure = plots.finetune_tradeoff_figure(
        runs,
        x="retain_ratio",
        y=y,
        labels={m: LABELS[m] for m in methods},
        xlabel="other tasks' answer accuracy / frozen model's",
        ylabel=ylabel,
        ylog=False,
    )
    plots.save(figure, args.out / "tradeoff.png")
    for row in results["summary"]:
        print(row["line"])
    return results


def summarize(runs: list[dict], methods: list[str], chance: float) -> list[dict]:
    """Per method and seed, the trade-off read four ways over checkpoints (learning rates,
    retain weights and steps): `best`, the largest target loss among those keeping >=
    RETAIN_FRACTION of the frozen model's retain accuracy; `lowest_accuracy`, the lowest target
    accuracy among the same; `at_chance`, the largest retain accuracy among those whose target
    loss reached `chance` (the task removed), None if none did; `all_wrong`, the largest retain
    accuracy among those leaving no target answer right (the suppress objective's end), None if
    none did."""
    rows = []

    def kept(point: dict) -> bool:
        return point["retain_ratio"] >= RETAIN_FRACTION

    for seed in sorted({r["seed"] for r in runs}):
        for method in methods:
            best = best_under(runs, method, seed, "target_loss", kept)
            lowest = best_under(runs, method, seed, "target_accuracy", kept, lowest=True)
            at_chance = best_under(
                runs, method, seed, "retain_ratio", lambda p: p["target_loss"] >= chance
            )
            all_wrong = best_under(
                runs, method, seed, "retain_ratio", lambda p: p["target_accuracy"] == 0
            )
            n = next(r["n_trainable"] for r in runs if r["method"] == method)
            found = (
                f"target loss {best['target_loss']:.3f} (acc {best['target_accuracy']:.3f}, "
                f"retain {best['retain_ratio']:.4f}, lr {best['lr']:g}, "
                f"retain weight {best['retain_weight']:g}, step {best['step']}); lowest acc "
                f"{lowest['target_accuracy']:.3f} (lr {lowest['lr']:g}, "
                f"retain weight {lowest['retain_weight']:g}, step {lowest['step']})"
                if best and lowest
                else "no checkpoint keeps the retain accuracy"
            )
            removed = (
                f"at chance: retain {at_chance['retain_ratio']:.4f} "
                f"(acc {at_chance['target_accuracy']:.3f})"
                if at_chance
                else "never reaches chance"
            )
            removed += (
                f"; no answer right: retain {all_wrong['retain_ratio']:.4f}"
                if all_wrong
                else "; some answer always right"
            )
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "n_trainable": n,
                    "best": best,
                    "lowest_accuracy": lowest,
                    "at_chance": at_chance,
                    "all_wrong": all_wrong,
                    "line": f"seed {seed} {LABELS[method]:18s} params {n:6d}  {found}; {removed}",
                }
            )
    return rows


if __name__ == "__main__":
    command_line(main)
