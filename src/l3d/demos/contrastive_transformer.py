"""Contrastive pairs on the synthetic multi-task transformer (paper Section 4.2): pairs of prompts
that differ only in the task token, COPY against REVERSE on the same symbols, decomposed at the
first answer token; moving along the found subnetworks should switch the model's answer from one
task's to the other's and leave the other tasks alone.

    python -m l3d.demos.contrastive_transformer --out runs/contrastive-transformer [--seeds 0,1]

Per seed, trains the 2-layer GPT-Neo of `l3d.demos.synthetic_transformer` (same model, data and
training), then:

1. Pairs: [COPY a1..a5 SEP ...] against [REVERSE a1..a5 SEP ...] with a1 != a5, compared at the
   SEP position only (`positions=`), where the next token is a1 for copy and a5 for reverse and
   the two prompts differ in the task token alone (the model is causal: later tokens do not
   matter there). KL, at the query and key weights of both blocks (`PARAMS`). Two settings: one way
   at a time (copy prompts against their reverse counterparts, and the reverse), one subnetwork
   without top-k; and both ways in one unlabelled set (`symmetric=True`), two subnetworks with
   top_k 0.5.
2. Baselines with the same number of directions: the top singular directions of the same pair
   gradients (PCA, `singular_directions`), and random directions of the subnetworks' ranks
   (`Subnetworks.random_like`).
3. Each way (copy -> reverse: copy prompts moved towards their reverse counterparts; reverse ->
   copy), for each method, the direction and step (0 and +-[0.005, 2] x ||W0||, log-spaced) are
   chosen on training data only: those that switch most training pairs (`switch_rates`: the
   answer becomes the other task's) among those that keep KEPT of the other tasks' (induction
   and count) answers on their own training prompts. On held-out data: the switch there; the
   other tasks' answer accuracy (1 at W0) and the mean KL of their answer tokens from W0
   (selectivity: a direction for the task switch should leave them alone); the patching score
   of the best direction (`patching_scores`); and the off-target score on the other way's pairs
   (`off_target_scores`: is the direction a toggle that closes both ways, or one way only?).

Prints the tables and writes summary.md and metrics.json to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l3d.cli import positive_int
from l3d.decomposition import Decomposition
from l3d.demos import synthetic_transformer as st
from l3d.demos.common import Clock, command_line, environment_line, seed_list
from l3d.io import write_json, write_text
from l3d.pairs import (
    decompose_pairs,
    off_target_scores,
    pair_data,
    pair_gradients,
    patching_scores,
    singular_directions,
    switch_rates,
    unit_directions,
    with_positions,
)

ANSWER = 6
"""The SEP position: the next token is the first answer symbol (a1 for copy, a5 for reverse)."""
OTHERS = ("induction", "count")
PARAMS = ["transformer.h.*.attn.attention.[qk]_proj.weight"]
"""The query and key weights of both blocks: where the SEP token decides where to read (the task
marker, the symbols). The value and output weights carry which symbol it is, which differs from
pair to pair. Of the other parameter sets tried (docs/contrastive.md), none switched more."""
L3D: dict[str, Any] = {
    "rank": 4,
    "divergence": "kl",
    "per_token": True,
    "batch_size": 16,
    "lr": 0.01,
    "loss": "paper",
}
"""Shared settings (epochs from --epochs): rank 4 as the synthetic-transformer demo, eq. 8 so that
every pair counts alike."""
ONE_WAY: dict[str, Any] = {"n_subnetworks": 1, "top_k": None}
"""One behaviour (the pairs one way round): one subnetwork, no sparsity."""
BOTH_WAYS: dict[str, Any] = {"n_subnetworks": 2, "top_k": 0.5, "symmetric": True}
"""Both ways in one unlabelled set (`symmetric=True`): two subnetworks, one per pair (top-k)."""
METHODS = ("l3d", "pca", "random")
SWITCHED = 0.5
"""A way counts as switched when most held-out pairs switch."""
KEPT = 0.95
"""The step is chosen among those that keep this share of the other tasks' answers at W0 on
their training prompts: the largest switches come at steps that break every task."""


# Pairs ------------------------------------------------------------------------------------------


def task_pairs(n: int, generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """n COPY prompts [COPY a1..a5 SEP a1..a5] with a1 != a5 (so the two tasks' first answers
    differ), and the same tokens with the REVERSE marker, as {'input_ids', 'attention_mask'}."""
    symbols = torch.randint(0, st.N_SYMBOLS, (4 * n, 5), generator=generator)
    symbols = symbols[symbols[:, 0] != symbols[:, 4]][:n] + st.FIRST_SYMBOL
    sep = torch.full((n, 1), st.SEP)
    ids = torch.cat([torch.full((n, 1), st.MARKERS["copy"]), symbols, sep, symbols], 1)
    swapped = ids.clone()
    swapped[:, 0] = st.MARKERS["reverse"]
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}, {
        "input_ids": swapped,
        "attention_mask": mask,
    }


def answer_positions(inputs: dict[str, Tensor]) -> Tensor:
    """(n, seq) bool: the SEP position only."""
    positions = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    positions[:, ANSWER] = True
    return positions


# Measures ---------------------------------------------------------------------------------------


def step_grid(scale: float) -> Tensor:
    """0 and +-27 log-spaced steps from 0.005 to `scale` (x ||W0||): the switching steps lie
    between 0.1 and 0.4 ||W0||, where a linear grid of 41 steps in [-2, 2] has 4 points."""
    steps = torch.logspace(-2.3, float(torch.log10(torch.tensor(scale))), 27)
    return torch.cat([-steps.flip(0), torch.zeros(1), steps])


def other_prompts(seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """The other tasks' prompts from `st.dataset` (50 per task) and their answer positions."""
    data, tasks, answer = st.dataset(50, seed=seed)
    keep = torch.isin(tasks, torch.tensor([st.TASKS.index(t) for t in OTHERS]))
    return {k: v[keep] for k, v in data.items()}, answer[keep]


@torch.no_grad()
def other_answers(
    decomposition: Decomposition, data: dict[str, Tensor], answer: Tensor, v: dict, delta: float
) -> Tensor:
    """The other tasks' predicted tokens at their answer positions at W0 + delta v, (n_answers,)."""
    logits = decomposition.intervene(data, 0, delta, direction=v)[:, :-1]
    return logits.argmax(-1)[answer[:, :-1]]


def other_tasks(
    decomposition: Decomposition, data: dict[str, Tensor], answer: Tensor, v: dict, delta: float
) -> dict[str, float]:
    """The other tasks' answer accuracy at W0 + delta v, and the mean KL(p(W0) || p(W0 + delta v))
    of their answer tokens (`output_change`)."""
    change = decomposition.output_change(with_positions(data, answer), 0, [delta], direction=v)
    predicted = other_answers(decomposition, data, answer, v, delta)
    accuracy = float((predicted == data["input_ids"][:, 1:][answer[:, :-1]]).float().mean())
    return {"accuracy": accuracy, "kl": float(change.mean())}


def measure(
    decomposition: Decomposition,
    directions: list[dict[str, Tensor]],
    train: tuple[dict, dict],
    held_out: tuple[dict, dict],
    others: tuple[tuple[dict[str, Tensor], Tensor], tuple[dict[str, Tensor], Tensor]],
    opposite: tuple[dict, dict],
    deltas: Tensor,
) -> dict[str, Any]:
    """One way of the pairs (inputs moved towards their counterparts). Chosen on training data
    only: the (direction, step) that switches most training pairs among those that keep KEPT of
    the other tasks' answers at W0 on their training prompts (others[0]; step 0 keeps all). On
    held-out data: that direction and step's switch, and the other tasks' accuracy and KL there
    (others[1]); the best patching score; and, at the step that patches this way most, the share
    of the `opposite` way's held-out pair divergence removed (`off_target_scores`)."""
    fit = switch_rates(
        decomposition, *train, deltas, positions=answer_positions(train[0]), directions=directions
    )
    at_w0 = other_answers(decomposition, *others[0], directions[0], 0.0)
    kept = torch.tensor(
        [
            [float((other_answers(decomposition, *others[0], v, float(d)) == at_w0).float().mean())
             for d in deltas]
            for v in directions
        ]
    )  # fmt: skip
    k, step = divmod(int(torch.where(kept >= KEPT, fit, -1.0).argmax()), len(deltas))
    delta = float(deltas[step])
    positions = answer_positions(held_out[0])
    switched = switch_rates(
        decomposition, *held_out, torch.tensor([delta]), positions=positions,
        directions=[directions[k]],
    )  # fmt: skip
    patching = patching_scores(
        decomposition, *held_out, positions=positions, deltas=deltas, directions=directions
    )
    off_target = off_target_scores(
        decomposition,
        pair_data(decomposition.model, *held_out, positions=positions),
        pair_data(decomposition.model, *opposite, positions=answer_positions(opposite[0])),
        deltas=deltas,
        directions=[directions[k]],
    )
    held = other_tasks(decomposition, *others[1], directions[k], delta)
    return {
        "patching": float(patching.max()),
        "off_target": float(off_target[0]),
        "direction": k,
        "delta": delta / decomposition.weight_norm(),
        "switch_train": float(fit[k, step]),
        "others_train": float(kept[k, step]),
        "switch": float(switched[0, 0]),
        "others_accuracy": held["accuracy"],
        "others_kl": held["kl"],
    }


# One seed ---------------------------------------------------------------------------------------


def baselines(
    d: Decomposition, train: tuple[dict, dict], symmetric: bool, seed: int
) -> dict[str, list[dict[str, Tensor]]]:
    """The subnetworks, the top singular directions of the same pair gradients (PCA) and random
    directions of the subnetworks' ranks, as many of each."""
    n_v, positions = d.n_subnetworks, answer_positions(train[0])
    gradients = pair_gradients(d, *train, symmetric=symmetric, positions=positions)
    return {
        "l3d": [d.v_out(k) for k in range(n_v)],
        "pca": unit_directions(singular_directions(gradients, n_v)),
        "random": unit_directions(d.subnetworks.v_out.random_like(seed + 1).materialize()),
    }


def run_seed(seed: int, *, train_steps: int, epochs: int, n_pairs: int, scale: float) -> dict:
    """Trains the transformer for `seed`, decomposes its pairs one way at a time and both ways
    at once, and measures every method."""
    start = time.perf_counter()
    model: nn.Module = st.build_model(seed)
    st.train(model, train_steps, seed)
    accuracy = st.task_accuracy(model, *st.dataset(50, seed=seed + 1))
    generator = torch.Generator().manual_seed(7000 + seed)
    copy, reverse = task_pairs(n_pairs, generator)
    held_copy, held_reverse = task_pairs(n_pairs, generator)
    # Training prompts for the choice of step, held-out ones (the accuracy check's) to report.
    others = (other_prompts(5000 + seed), other_prompts(seed + 1))
    ways = {
        "copy->reverse": ((copy, reverse), (held_copy, held_reverse)),
        "reverse->copy": ((reverse, copy), (held_reverse, held_copy)),
    }

    def decompose(train: tuple[dict, dict], setting: dict[str, Any]) -> Decomposition:
        return decompose_pairs(
            model, train[0], train[1], params=PARAMS, epochs=epochs, seed=seed, progress=False,
            positions=answer_positions(train[0]), **L3D, **setting,
        )  # fmt: skip

    result: dict[str, Any] = {"seed": seed, "answer_accuracy": accuracy}
    both = decompose((copy, reverse), BOTH_WAYS)
    both_directions = baselines(both, (copy, reverse), True, seed)
    for way, (train, held_out) in ways.items():
        one = decompose(train, ONE_WAY)
        directions = {"one way": baselines(one, train, False, seed), "both ways": both_directions}
        for setting, d in (("one way", one), ("both ways", both)):
            deltas = step_grid(scale) * d.weight_norm()
            result.setdefault(setting, {"loss_paper": {}})["loss_paper"][way] = (
                d.evaluation.loss_paper
            )
            opposite = (held_out[1], held_out[0])
            result[setting][way] = {
                m: measure(d, directions[setting][m], train, held_out, others, opposite, deltas)
                for m in METHODS
            }
    result["seconds"] = time.perf_counter() - start
    return result


# Tables -----------------------------------------------------------------------------------------

WAYS = ("copy->reverse", "reverse->copy")
SETTINGS = ("one way", "both ways")


def table(results: list[dict]) -> list[str]:
    lines = [
        "| seed | setting | way | method | patching | off-target (other way) | "
        "switch (held-out) | switch (train) | other tasks' answers kept (train prompts) | "
        "other tasks' accuracy (held-out) | other tasks' KL | direction, step / ‖W0‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for setting in SETTINGS:
            for way in WAYS:
                for m in METHODS:
                    e = r[setting][way][m]
                    lines.append(
                        f"| {r['seed']} | {setting} | {way} | {m} | {e['patching']:.3f} | "
                        f"{e['off_target']:+.3f} | {e['switch']:.3f} | {e['switch_train']:.3f} | "
                        f"{e['others_train']:.3f} | {e['others_accuracy']:.3f} | "
                        f"{e['others_kl']:.3g} | {e['direction']}, {e['delta']:+.3f} |"
                    )
    return lines


def targets(results: list[dict]) -> dict[str, bool]:
    """The demo's claims, every seed, way and setting: L3D's subnetworks close more of the pairs'
    output difference and switch more answers than random directions of the same ranks, the
    other tasks keep at least 0.9 of their held-out answers at L3D's step, and (the tracker's
    goal) L3D switches most held-out pairs (SWITCHED) both ways round; and whether L3D beats
    PCA's switch anywhere."""
    cells = [r[s][w] for r in results for s in SETTINGS for w in WAYS]
    return {
        "patching_beats_random": all(c["l3d"]["patching"] > c["random"]["patching"] for c in cells),
        "switch_beats_random": all(c["l3d"]["switch"] > c["random"]["switch"] for c in cells),
        "other_tasks_kept": all(c["l3d"]["others_accuracy"] >= 0.9 for c in cells),
        "switch_both_ways": all(c["l3d"]["switch"] >= SWITCHED for c in cells),
        "switch_beats_pca_somewhere": any(c["l3d"]["switch"] > c["pca"]["switch"] for c in cells),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument(
        "--train-steps",
        type=positive_int,
        default=3000,
        help="transformer training steps (default 3000)",
    )
    parser.add_argument("--epochs", type=positive_int, default=30, help="L3D epochs (default 30)")
    parser.add_argument(
        "--pairs", type=positive_int, default=300, help="pairs, as many held out (default 300)"
    )
    parser.add_argument(
        "--scale", type=float, default=2.0, help="largest step, x ||W0|| (default 2)"
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
        print(f"seed {seed}: training the transformer ({args.train_steps} steps), decomposing ...")
        results.append(
            run_seed(
                seed, train_steps=args.train_steps, epochs=args.epochs, n_pairs=args.pairs,
                scale=args.scale,
            )
        )  # fmt: skip
    met = targets(results)
    environment = clock.environment()
    summary = [
        "# Contrastive pairs on the synthetic multi-task transformer",
        "",
        f"COPY against REVERSE prompts on the same symbols, compared at the SEP token; {PARAMS}; "
        f"L3D {L3D}, {args.epochs} epochs; one way: {ONE_WAY}, both ways: {BOTH_WAYS}. "
        f"{args.pairs} pairs and as many held out; steps 0 and +-[0.005, {args.scale:g}] x ||W0|| "
        f"(log-spaced), chosen on training data keeping {KEPT} of the other tasks' answers.",
        "",
        *table(results),
        "",
        "Answer accuracy at W0 per seed: "
        + "; ".join(
            f"seed {r['seed']}: "
            + ", ".join(f"{t} {v:.3f}" for t, v in r["answer_accuracy"].items())
            for r in results
        ),
        "",
        "Targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + ".",
        "",
        environment_line(environment),
    ]
    print("\n".join(summary))
    metrics = {
        "seeds": seeds,
        "settings": {
            "params": PARAMS, "l3d": L3D, "one_way": ONE_WAY, "both_ways": BOTH_WAYS,
            "epochs": args.epochs, "pairs": args.pairs, "scale": args.scale,
            "train_steps": args.train_steps,
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
