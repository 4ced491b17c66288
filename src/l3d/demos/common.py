"""What every demo does after training its model: decompose, save, analyse, summarise."""

from __future__ import annotations

import copy
import os
import sys
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l3d import controls
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.core.samples import Inputs
from l3d.decomposition import Decomposition, run
from l3d.errors import L3DError

ANALYSIS_SUMMARY = (
    "loss_paper",
    "loss_pooled_squared",
    "n_dead",
    "purity",
    "purity_random_directions",
    "majority_label_fraction",
)
"""The analysis summary's fields that each demo's summary.json repeats."""


class Clock:
    """Wall time and machine load of a demo run, for its summary: a figure is only worth quoting
    with the threads and the load it was measured at."""

    def __init__(self) -> None:
        self.start, self.load_before = time.perf_counter(), os.getloadavg()

    def environment(self) -> dict[str, Any]:
        """Threads, CPUs, 1/5/15-minute load averages before and now, seconds since the start."""
        return {
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_before": list(self.load_before),
            "loadavg_after": list(os.getloadavg()),
            "seconds": time.perf_counter() - self.start,
        }


def environment_line(environment: dict[str, Any]) -> str:
    """`Clock.environment()` as the sentence a demo's summary.md ends with."""
    return (
        f"{environment['seconds']:.0f} s on {environment['threads']} torch thread(s), "
        f"{environment['cpus']} CPUs, load average (1 min) {environment['loadavg_before'][0]:.2f} "
        f"before, {environment['loadavg_after'][0]:.2f} after."
    )


def command_line(main: Callable[[list[str] | None], object]) -> None:
    """Run a demo's `main` from the command line as `l3d` runs its commands: an L3DError is one
    line on stderr and exit status 2, never a traceback."""
    try:
        main(None)
    except L3DError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def seed_list(text: str) -> list[int]:
    """Seeds from '0,1,2' (a bad list is a one-line error)."""
    from l3d.experiments.runner import parse_seeds  # the experiments' own parsing and message

    return parse_seeds(text)


def demo_arguments(
    doc: str, *, epochs: int, n_subnetworks: int, extra: Callable[[ArgumentParser], None]
) -> Callable[[list[str] | None], Namespace]:
    """The command-line options every model demo shares (output folder, seed, L3D epochs and
    subnetworks, analysis sizes, CPU threads), plus the demo's own (`extra`); parsing also applies
    --threads."""

    def parse(argv: list[str] | None) -> Namespace:
        parser = ArgumentParser(description=doc.splitlines()[0])
        parser.add_argument("--out", type=Path, required=True, help="output folder")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--epochs", type=positive_int, default=epochs, help="L3D epochs")
        parser.add_argument("--n-subnetworks", type=positive_int, default=n_subnetworks)
        parser.add_argument("--n-top", type=positive_int, default=20)
        parser.add_argument("--n-references", type=positive_int, default=10)
        parser.add_argument(
            "--threads",
            type=positive_int,
            default=None,
            help="torch CPU threads (1 on busy machines)",
        )
        parser.add_argument(
            "--no-controls",
            action="store_true",
            help="skip the controls (shuffled weights, next seed), which triple the L3D time",
        )
        extra(parser)
        args = parser.parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        return args

    return parse


def decompose_and_analyze(
    model: nn.Module,
    data: Inputs,
    config: L3DConfig,
    out: Path,
    *,
    n_top: int,
    n_references: int,
    tokenizer: Any = None,
    labels: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    with_controls: bool = False,
) -> tuple[Decomposition, dict, dict]:
    """Decompose, save to out/decomposition, analyse into out/analysis (l3d.analysis, seeded by
    the config); returns the decomposition, the analysis and the summary fields the demos share
    (parameter count, seconds, losses, purity). with_controls: also the controls of `l3d control`
    (l3d.controls), the same decomposition of the model with shuffled weights (analysed into
    out/controls/shuffled) and at the next seed, as the summary's "controls"."""
    from l3d.analysis import AnalysisOptions, write_analysis  # plotting: only when a demo runs

    start = time.perf_counter()
    decomposition = run(model, data, config)
    l3d_seconds = time.perf_counter() - start
    decomposition.save(out / "decomposition")
    start = time.perf_counter()
    options = AnalysisOptions(n_top=n_top, n_references=n_references, seed=config.seed)
    analysis = write_analysis(
        decomposition,
        data,
        out / "analysis",
        tokenizer=tokenizer,
        labels=labels,
        class_names=class_names,
        options=options,
    )
    assert analysis is not None  # demos run in one process
    fields = {
        "n_parameters": sum(w.numel() for w in decomposition.target.w0.values()),
        "l3d_seconds": l3d_seconds,
        "seconds_per_step": l3d_seconds / max(decomposition.history[-1]["step"], 1),
        "analysis_seconds": time.perf_counter() - start,
        **{k: analysis["summary"][k] for k in ANALYSIS_SUMMARY},
    }
    if with_controls:
        start = time.perf_counter()
        shuffled = copy.deepcopy(model)
        controls.shuffle_parameters_(shuffled, config.seed + controls.SHUFFLE_SEED_OFFSET)
        folder = out / "controls" / "shuffled"
        control = write_analysis(
            run(shuffled, data, config), data, folder, tokenizer=tokenizer, labels=labels,
            class_names=class_names, options=options,
        )  # fmt: skip
        assert control is not None
        mine = controls.headline(analysis["summary"])
        second = run(model, data, config.replace(seed=config.seed + 1))
        fields["controls"] = {
            "run": mine,
            "shuffled": controls.shuffled_entry(mine, control["summary"], str(folder)),
            "seed": controls.seed_entry(decomposition, second, None),
        }
        fields["controls_seconds"] = time.perf_counter() - start
    return decomposition, analysis, fields
