"""The README's main job: decompose the toy model of superposition (Section 3.1) and show that each
subnetwork is one feature's circuit, at the project's improved settings beside the paper's.

    python -m l3d.demos.tms --out runs/demo

Trains TMS 5-2 (relu(W^T W x + b), features U[0,1] active with probability 0.05) through the toy
registry, then decomposes it into 5 rank-1 subnetworks twice, from the experiment registry's TMS
profiles (l3d/experiments/profiles/tms.yaml): the improved settings (200 epochs, pooled squared
loss, k = 0.25, lr x0.8 every 20 epochs, resampling), the main result, and the paper's (Appendix
B.4: 1000 epochs, loss eq. 8, k = 0.1). Prints and writes to --out: a table matching subnetworks to
features for both, their held-out losses beside the paper's 0.19 (summary.md), metrics.json,
figures of the improved decomposition, and both decompositions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import cast

import torch

from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.decomposition import Decomposition, run
from l3d.demos.common import command_line
from l3d.experiments import metrics as M
from l3d.experiments.registry import get_spec
from l3d.experiments.runner import with_epochs
from l3d.io import write_json, write_text
from l3d.plots import plot_mlp_subnetworks, plot_p_active, plot_training_curve
from l3d.toys import TMS, feature_parameter_mask
from l3d.toys.registry import get_toy, train_toy_model

RECOVERED_SHARE = 0.9
"""A feature is recovered when its subnetwork holds more than this share of its squared norm on
the feature's own parameters."""
SETTINGS = {"improved": "improved settings", "paper": "paper settings"}
"""The experiment registry's TMS profiles the demo runs (the first is the main result), and how
its tables name them."""
PARAMS = ["W_in", "W_out", "b"]


def decompose_and_measure(
    model: TMS, train_x: torch.Tensor, held_out: torch.Tensor, fields: dict, seed: int, quiet: bool
) -> tuple[Decomposition, dict]:
    """One decomposition from profile `fields`, matched to the features; its losses, P_act and
    dead subnetworks on the held-out samples."""
    start = time.perf_counter()
    config = L3DConfig.create(params=PARAMS, seed=seed, **fields)
    decomposition = run(model, train_x, config, progress=not quiet)
    test = M.heldout_losses(decomposition, held_out, seed)
    # (feature, subnetwork) share of the subnetwork's squared norm on the feature's own parameters
    shares = M.parameter_share(M.dense_directions(decomposition), feature_parameter_mask(model)).T
    recovery = M.recovery(shares, threshold=RECOVERED_SHARE)
    matching = [
        {"feature": j, "subnetwork": k, "norm_share": float(shares[j, k]),
         "p_active": test["p_active"][k]}
        for j, k in enumerate(recovery["assignment"])
    ]  # fmt: skip
    return decomposition, {
        "config": fields,
        "held_out": test,
        "matching": matching,
        "features_recovered": recovery["n_recovered"],
        "dead_subnetworks": test["dead_subnetworks"],
        "seconds": time.perf_counter() - start,
    }


def tables(results: dict[str, dict], paper_loss: float) -> list[str]:
    """The per-feature matching of both settings, then the headline numbers beside the paper's."""
    names = list(results)
    head = " | ".join(f"{SETTINGS[s]}: subnetwork | norm share | P_act" for s in names)
    lines = [f"| feature | {head} |", "|---|" + "---|---|---|" * len(names)]
    for j in range(len(results[names[0]]["matching"])):
        cells = []
        for s in names:
            r = results[s]["matching"][j]
            cells.append(f"{r['subnetwork']} | {r['norm_share']:.3f} | {r['p_active']:.3f}")
        lines.append(f"| {j} | {' | '.join(cells)} |")

    def row(what: str, paper: str, cell) -> str:
        return f"| {what} | {' | '.join(cell(results[s]) for s in names)} | {paper} |"

    lines += [
        "",
        f"| | {' | '.join(SETTINGS[s] for s in names)} | the paper |",
        "|---|" + "---|" * (len(names) + 1),
        row(
            f"features recovered (norm share > {RECOVERED_SHARE})",
            "-",
            lambda r: f"{r['features_recovered']} of {len(r['matching'])}",
        ),
        row(
            "smallest norm share on the matched feature's parameters",
            "-",
            lambda r: f"{min(m['norm_share'] for m in r['matching']):.3f}",
        ),
        row(
            "held-out pooled squared loss Σ‖g−ĝ‖²/Σ‖g‖²",
            f"{paper_loss}",
            lambda r: f"{r['held_out']['loss_pooled_squared']:.3f}",
        ),
        row(
            "held-out loss eq. 8, mean ‖g−ĝ‖/‖g‖",
            "-",
            lambda r: f"{r['held_out']['loss_paper']:.3f}",
        ),
        row("dead subnetworks", "-", lambda r: str(len(r["dead_subnetworks"]))),
        row("epochs, seconds", "-", lambda r: f"{r['config']['epochs']}, {r['seconds']:.0f} s"),
    ]
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs of both decompositions, their schedules scaled to fit (default: each "
        "profile's, 200 improved and 1000 paper)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # The toy's own data and training seed is seed + 1; cached in out/toy.
    toy = train_toy_model(get_toy("tms"), args.seed + 1, cache=out / "toy")
    model, toy_seed = cast(TMS, toy.model), toy.info["init_seed"]  # the "tms" toy is a TMS
    g = torch.Generator().manual_seed(1000 + args.seed)
    train_x = toy.sample(1000, g)
    held_out = toy.sample(1000, g)
    spec = get_spec("tms")
    profiles = {"improved": spec.improved, "paper": spec.paper}
    paper_loss = spec.paper_results["loss_pooled_squared"]

    results, decompositions = {}, {}
    for settings, fields in profiles.items():
        if args.epochs is not None:
            fields = with_epochs(fields, args.epochs)
        print(
            f"TMS 5-2 (toy seed {toy_seed}): decomposing into 5 rank-1 subnetworks at the "
            f"{SETTINGS[settings]} ({fields['epochs']} epochs) ..."
        )
        decompositions[settings], results[settings] = decompose_and_measure(
            model, train_x, held_out, fields, args.seed, args.quiet
        )
    main_result = results["improved"]
    summary = [
        "# L3D on the toy model of superposition (5 features, 2 hidden)",
        "",
        f"Held-out samples: 1000. Recovered: the feature's subnetwork holds more than "
        f"{RECOVERED_SHARE} of its squared norm on the feature's own parameters.",
        "",
        *tables(results, paper_loss),
        "",
        f"Improved settings: {main_result['features_recovered']} of 5 features recovered, "
        f"held-out pooled squared loss {main_result['held_out']['loss_pooled_squared']:.3f} "
        f"(paper settings {results['paper']['held_out']['loss_pooled_squared']:.3f}; the paper "
        f"reports {paper_loss}).",
    ]
    print("\n".join(summary[2:]))

    best = decompositions["improved"]
    titles = [
        f"subnetwork {r['subnetwork']} → feature {r['feature']}" for r in main_result["matching"]
    ]
    plot_training_curve(best.history, out / "training_curve.png", "L3D on TMS 5-2 (improved)")
    plot_mlp_subnetworks(
        [best.v_out(r["subnetwork"]) for r in main_result["matching"]],
        [("W_in", None), ("W_out", "b")], out / "subnetworks.png", titles=titles,
    )  # fmt: skip
    plot_p_active(torch.tensor(main_result["held_out"]["p_active"]), out / "p_active.png")
    best.save(out / "decomposition")
    decompositions["paper"].save(out / "paper_settings" / "decomposition")
    metrics = {
        "toy_seed": toy_seed,
        "seed": args.seed,
        **main_result,
        "paper_settings": results["paper"],
        "paper_reports": spec.paper_results,
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "summary.md", "\n".join(summary) + "\n")
    print(f"Wrote {out}/: summary.md, metrics.json, subnetworks.png, training_curve.png, "
          f"p_active.png, decomposition/, paper_settings/decomposition/ "
          f"({metrics['seconds']:.0f} s)")  # fmt: skip
    return metrics


if __name__ == "__main__":
    command_line(main)
