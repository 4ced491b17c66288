"""Contrastive pairs on the digits CNN (paper Section 4.2): pairs of images of two classes, three
class pairs mixed in one unlabelled set, decomposed into one subnetwork per class pair; each
subnetwork's top images, the classes it moves, and how far moving along it turns one class into
the other on held-out pairs.

    python -m l3d.demos.contrastive_digits --out runs/contrastive-digits [--seeds 0,1]

Per seed, trains the mobilenet-style CNN of `l3d.demos.digits_cnn` (same data split and training),
then:

1. Pairs: for each class pair (a, b) in `CLASS_PAIRS`, every training image of class a with a
   random training image of class b; the three sets in one, with no label saying which class
   pair a pair is from. `decompose_pairs` at block 3 (the digits demo's block and ranks), KL, both
   ways (`symmetric=True`), one subnetwork per class pair with top_k 1/3.
2. Baselines with as many directions: the top singular directions of the same pair gradients
   (PCA) and random directions of the subnetworks' ranks (`Subnetworks.random_like`).
3. Held-out pairs from the test split, the same way. Each direction's coefficients on the pairs
   (V_in . g for L3D; the direction itself for PCA and random) rank its top pairs: their class
   pairs give the direction's **purity**, and directions are matched one-to-one to class pairs by
   the Hungarian algorithm on the share of their top pairs. For the matched direction: the
   **patching score** on its class pair's held-out pairs (a -> b), its **off-target** score (the
   share of the other class pairs' divergence removed at that best step, `off_target_scores`,
   averaged over them), the **switch accuracy** (the prediction becomes class b) at the step that
   switches most training pairs, and the classes it moves (`l3d.analysis.top_logits` on its top
   pairs).

Prints the tables and writes summary.md, metrics.json and, per seed, the L3D subnetworks' top
images (grid_seed{S}_subnetwork{K}.png) to --out.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l3d import plots
from l3d.analysis import top_logits
from l3d.cli import positive_int
from l3d.core.subnetworks import total
from l3d.decomposition import Decomposition
from l3d.demos import digits_cnn as dc
from l3d.demos.common import Clock, command_line, environment_line, seed_list
from l3d.experiments.metrics import match_units
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
)
from l3d.vision import ranks_by_fraction

CLASS_PAIRS = ((3, 8), (1, 7), (4, 9))
"""Digits that look alike: the pairs' difference is one class's features against the other's."""
L3D: dict[str, Any] = {
    "n_subnetworks": len(CLASS_PAIRS),
    "top_k": 1 / len(CLASS_PAIRS),
    "divergence": "kl",
    "symmetric": True,
    "batch_size": 32,
    "lr": 0.005,
    "loss": "paper",
    "warm_start_epochs": 5,
}
"""One subnetwork per class pair, about one per pair (top-k, after 5 warm-start epochs as in the
TMS pair demo); eq. 8 so that every pair counts alike; the digits demo's batch and lr."""
METHODS = ("l3d", "pca", "random")


# Pairs ------------------------------------------------------------------------------------------


def class_pairs(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """For each class pair (a, b), every image of class a with a random image of class b: inputs,
    counterparts and the class pair's index per pair (never given to L3D)."""
    inputs, counterparts, which = [], [], []
    for p, (a, b) in enumerate(CLASS_PAIRS):
        own, other = x[y == a], x[y == b]
        inputs.append(own)
        counterparts.append(other[torch.randint(0, len(other), (len(own),), generator=generator)])
        which.append(torch.full((len(own),), p))
    return torch.cat(inputs), torch.cat(counterparts), torch.cat(which)


# Measures ---------------------------------------------------------------------------------------


def top_pairs(coefficients: Tensor, n_top: int) -> Tensor:
    """(n_directions, n_top) pairs of largest |coefficient| per direction."""
    return coefficients.abs().topk(min(n_top, len(coefficients)), dim=0).indices.T


def measure(
    d: Decomposition,
    directions: list[dict[str, Tensor]],
    reading: list[dict[str, Tensor]],
    train: tuple[Tensor, Tensor, Tensor],
    held_out: tuple[Tensor, Tensor, Tensor],
    deltas: Tensor,
    n_top: int,
) -> dict[str, Any]:
    """Purity of each direction's top held-out pairs, its class pair (Hungarian on the shares of
    top pairs), and for the matched direction its patching score on its class pair's pairs, its
    off-target score (`off_target_scores`: the share of the other class pairs' divergence removed
    at the step that closes most of its own, averaged over them), switch accuracy and the classes
    it moves. reading: the directions whose inner product with a pair gradient is the coefficient
    (V_in for L3D)."""
    x, counterparts, which = held_out
    gradients = pair_gradients(d, x, counterparts)
    coefficients = torch.stack(
        [
            total(
                torch.einsum("nw,w->n", gradients[p].flatten(1), v[p].flatten()) for p in gradients
            )
            for v in reading
        ],
        1,
    )  # (n_pairs, n_directions)
    top = top_pairs(coefficients, n_top)
    n_pairs = len(CLASS_PAIRS)
    shares = torch.stack(
        [torch.bincount(which[row], minlength=n_pairs).float() / len(row) for row in top]
    )  # (n_directions, class pairs)
    assignment = match_units(shares.T)
    own_pairs = [which == p for p in range(n_pairs)]
    pairs = [pair_data(d.model, x[m], counterparts[m]) for m in own_pairs]
    result: dict[str, Any] = {
        "purity": shares.max(1).values.tolist(),
        "assignment": assignment,
        "share": [float(shares[k, p]) for p, k in enumerate(assignment)],
        "patching": [], "off_target": [], "switch": [], "delta": [], "top_classes": [],
        "pushes_up": [], "pushes_down": [],
    }  # fmt: skip
    for p, k in enumerate(assignment):
        v = [directions[k]]
        result["patching"].append(
            float(patching_scores(d, pairs[p], deltas=deltas, directions=v)[0])
        )
        others = [
            float(off_target_scores(d, pairs[p], pairs[q], deltas=deltas, directions=v)[0])
            for q in range(n_pairs)
            if q != p
        ]
        result["off_target"].append(sum(others) / len(others))
        m = train[2] == p
        fit = switch_rates(d, train[0][m], train[1][m], deltas, directions=[directions[k]])[0]
        delta = deltas[int(fit.argmax())]
        m = own_pairs[p]
        switched = switch_rates(d, x[m], counterparts[m], delta[None], directions=[directions[k]])
        result["switch"].append(float(switched[0, 0]))
        result["delta"].append(float(delta) / d.weight_norm())
        a_to_b = [
            f"{CLASS_PAIRS[int(which[i])][0]}->{CLASS_PAIRS[int(which[i])][1]}" for i in top[k]
        ]
        result["top_classes"].append(Counter(a_to_b).most_common())
        logits = top_logits(d, x, 0, top[k], n_logits=3, direction=directions[k])
        result["pushes_up"].append(logits["positive"][0].tolist())
        result["pushes_down"].append(logits["negative"][0].tolist())
    result["top_pairs"] = top.tolist()
    return result


# One seed ---------------------------------------------------------------------------------------


def run_seed(
    seed: int, out: Path, *, train_epochs: int, epochs: int, scale: float, n_top: int
) -> dict:
    """Trains the CNN for `seed`, decomposes its class pairs, measures every method."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = dc.digits(seed)
    model = dc.DigitsNet()
    dc.train(model, x_train, y_train, train_epochs, seed)
    generator = torch.Generator().manual_seed(9000 + seed)
    train = class_pairs(x_train, y_train, generator)
    held_out = class_pairs(x_test, y_test, generator)
    rank = ranks_by_fraction(model, [dc.BLOCK], 0.1)
    d = decompose_pairs(
        model, train[0], train[1], params=[dc.BLOCK], rank=rank, epochs=epochs, seed=seed,
        progress=False, **L3D,
    )  # fmt: skip
    n_v = d.n_subnetworks
    gradients = pair_gradients(d, train[0], train[1], symmetric=True)
    pca = unit_directions(singular_directions(gradients, n_v))
    rand = unit_directions(d.subnetworks.v_out.random_like(seed + 1).materialize())
    l3d = [d.v_out(k) for k in range(n_v)]
    deltas = torch.linspace(-scale, scale, 41) * d.weight_norm()
    methods = {
        "l3d": measure(d, l3d, [d.v_in(k) for k in range(n_v)], train, held_out, deltas, n_top),
        "pca": measure(d, pca, pca, train, held_out, deltas, n_top),
        "random": measure(d, rand, rand, train, held_out, deltas, n_top),
    }
    x, which = held_out[0], held_out[2]
    for k, row in enumerate(methods["l3d"]["top_pairs"]):
        plots.plot_image_grid(
            [x[i] for i in row],
            [f"{CLASS_PAIRS[int(which[i])][0]}->{CLASS_PAIRS[int(which[i])][1]}" for i in row],
            out / f"grid_seed{seed}_subnetwork{k}.png",
            f"seed {seed}, subnetwork {k}: top held-out pairs (image a of a->b)",
        )
    return {
        "seed": seed,
        "test_accuracy": dc.accuracy(model, x_test, y_test),
        "loss_paper": d.evaluation.loss_paper,
        "p_active": d.p_active.tolist(),
        "pairs": {"train": len(train[0]), "held_out": len(x)},
        **methods,
        "seconds": time.perf_counter() - start,
    }


# Tables -----------------------------------------------------------------------------------------


def table(results: list[dict]) -> list[str]:
    lines = [
        "| seed | class pair | method | direction | top-pair share | patching own | off-target | "
        "switch | step / ‖W0‖ | pushes up | pushes down |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for p, (a, b) in enumerate(CLASS_PAIRS):
            for m in METHODS:
                e = r[m]
                lines.append(
                    f"| {r['seed']} | {a}->{b} | {m} | {e['assignment'][p]} | {e['share'][p]:.2f} "
                    f"| {e['patching'][p]:.3f} | {e['off_target'][p]:.3f} | {e['switch'][p]:.3f} "
                    f"| {e['delta'][p]:+.2f} | {e['pushes_up'][p]} | {e['pushes_down'][p]} |"
                )
    return lines


def targets(results: list[dict]) -> dict[str, bool]:
    """The demo's claims, every seed: L3D's matched subnetworks close more of their own class
    pair's output difference than random directions do (summed over class pairs), their top
    pairs are purer than PCA's and random directions', and they switch more predictions than
    random directions."""
    return {
        "patching_beats_random": all(
            sum(r["l3d"]["patching"]) > sum(r["random"]["patching"]) for r in results
        ),
        "purity_beats_baselines": all(
            sum(r["l3d"]["share"]) > max(sum(r["pca"]["share"]), sum(r["random"]["share"]))
            for r in results
        ),
        "switch_beats_random": all(
            sum(r["l3d"]["switch"]) > sum(r["random"]["switch"]) for r in results
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument(
        "--train-epochs", type=positive_int, default=15, help="CNN training epochs (default 15)"
    )
    parser.add_argument("--epochs", type=positive_int, default=30, help="L3D epochs (default 30)")
    parser.add_argument(
        "--scale", type=float, default=0.5, help="steps: 41 in [-s, s] x ||W0|| (default 0.5)"
    )
    parser.add_argument("--n-top", type=positive_int, default=20, help="top pairs per direction")
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
        print(f"seed {seed}: training the CNN ({args.train_epochs} epochs), decomposing ...")
        results.append(
            run_seed(
                seed, out, train_epochs=args.train_epochs, epochs=args.epochs, scale=args.scale,
                n_top=args.n_top,
            )
        )  # fmt: skip
    met = targets(results)
    environment = clock.environment()
    summary = [
        "# Contrastive pairs on the digits CNN",
        "",
        f"Class pairs {list(CLASS_PAIRS)} in one unlabelled set, both ways; block {dc.BLOCK}; "
        f"L3D {L3D}, {args.epochs} epochs; steps in [-{args.scale:g}, {args.scale:g}] x ||W0||; "
        f"top {args.n_top} held-out pairs per direction.",
        "",
        *table(results),
        "",
        *(
            f"Seed {r['seed']}: test accuracy {r['test_accuracy']:.3f}, loss (paper) "
            f"{r['loss_paper']:.3f}, P_act {[round(p, 3) for p in r['p_active']]}, "
            f"{r['pairs']['train']} pairs, {r['pairs']['held_out']} held out, {r['seconds']:.0f} s."
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
            "class_pairs": CLASS_PAIRS, "block": dc.BLOCK, "l3d": L3D, "epochs": args.epochs,
            "train_epochs": args.train_epochs, "scale": args.scale, "n_top": args.n_top,
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
