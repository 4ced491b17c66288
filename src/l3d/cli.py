"""The `l3d` command: decompose from a config file, resume, run the toy suite, analyse, intervene,
finetune along subnetworks and write an HTML report. User errors print one line and exit with
status 2; a run stopped by Ctrl-C or SIGTERM saves a checkpoint and exits with 128 + the signal
number."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from l3d.errors import L3DError
from l3d.finetuning import OBJECTIVES, TRAIN_MODES

if TYPE_CHECKING:  # imported where used: `l3d --help` stays fast
    from l3d.runs import RunDir

EXIT_USER_ERROR = 2
# Samples whose output change `l3d intervene` prints against all samples' (as the report does).
N_TOP_IMPACT = 10

MAIN_EXAMPLES = """examples:
  l3d decompose examples/tms.yaml --out runs/tms     # Ctrl-C saves; --resume runs/tms continues
  l3d analyze runs/tms
  l3d intervene runs/tms --subnetwork 0 --delta 1 2
  l3d report runs/tms                                # runs/tms/report/index.html
  l3d experiment tms --seeds 0,1,2

Run `l3d COMMAND --help` for a command's options and examples. Exit status: 0 success, 2 a user
error (one line on stderr), 128 + signal number for a run stopped by Ctrl-C or SIGTERM.
"""
DECOMPOSE_EXAMPLES = """examples:
  l3d decompose examples/tms.yaml --out runs/tms
  l3d decompose examples/tms.yaml --out runs/tms --set l3d.epochs=20 --set seed=3
  l3d decompose --resume runs/tms          # continue a stopped run from its last checkpoint
  l3d decompose examples/tms.yaml --check  # will it run, and fit? (memory estimate, no training)
"""
EXPERIMENT_EXAMPLES = """examples:
  l3d experiment --list
  l3d experiment tms --seeds 0,1,2 --out runs/exp-tms
  l3d experiment suite --seeds 0 --quick --out runs/suite
"""
ANALYZE_EXAMPLES = """examples:
  l3d analyze runs/tms
  l3d analyze runs/tms --n-top 20 --n-samples 2000
  l3d analyze runs/tms --out /tmp/tms-analysis    # when the run folder is read-only
"""
INTERVENE_EXAMPLES = """examples:
  l3d intervene runs/tms --subnetwork 0 --delta 0.5 1 2
  l3d intervene runs/tms --subnetwork 0 1 2 --delta -1 1 --n-samples 500
"""
FINETUNE_EXAMPLES = """examples:
  l3d finetune runs/tms --subnetworks 0 3 --data edit.safetensors --out runs/tms/adapter
  l3d finetune runs/tms --subnetworks contrast:2 --data edit.safetensors \\
      --retain keep.safetensors --train factors --steps 200 --out runs/tms/adapter2

A data file is safetensors with 'inputs' (or the model's keyword inputs, e.g. input_ids and
attention_mask) and 'labels' (class or next-token ids, -100 where nothing is scored, or float
targets shaped like the outputs); a retain file needs only the inputs.
"""
CONTROL_EXAMPLES = """examples:
  l3d control runs/tms                     # both controls; then l3d report shows the gaps
  l3d control runs/tms --kinds seed        # only the cross-seed stability
"""
REPORT_EXAMPLES = """examples:
  l3d report runs/tms                      # writes runs/tms/report/index.html
  l3d report runs/tms --out /tmp/tms-report
  l3d report runs/tms --no-analyze         # never runs the model: no examples without an analysis
"""


class _UsageError(Exception):
    """A command line argparse refuses, shown as one line like every user error."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see `{prog} --help`)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse without its multi-line usage dump: an error is one line (main prints it)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of samples, references, top samples)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


def _parser() -> argparse.ArgumentParser:
    from l3d import __version__

    parser = _Parser(
        prog="l3d",
        description="Local Loss Landscape Decomposition: find sparsely active subnetworks in "
        "parameter space (Chrisman, Bushnaq, Sharkey 2025).",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"l3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "decompose",
        help="decompose a model from a YAML run config, or resume a run",
        description="Decompose a model from a YAML run config (sections model, data, l3d, run) "
        "into a run folder: config.yaml, metrics.jsonl, checkpoint/, decomposition/.",
        epilog=DECOMPOSE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("config", nargs="?", help="run config YAML (see examples/*.yaml)")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. l3d.epochs=20 (a bare l3d field name works too)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the config against its model and data and print the memory estimate "
        "(n_subnetworks: auto chosen), then stop: no run folder, no training",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")

    p = sub.add_parser(
        "experiment",
        help="run a toy experiment of the paper (or all of them)",
        description="Run one of the paper's toy experiments, or `suite` for all of them, over "
        "seeds with the settings of its profile (l3d/experiments/profiles/*.yaml); writes "
        "metrics.json, figures and summary.md.",
        epilog=EXPERIMENT_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("name", nargs="?", help="experiment name, or 'suite' for all of them")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--out", help="output folder (default: runs/experiments/<name>)")
    p.add_argument(
        "--settings",
        choices=["paper", "improved"],
        help="the paper's hyperparameters (Appendix B.4; default for one experiment) or the "
        "improved profile (default for the suite)",
    )
    p.add_argument("--quick", action="store_true", help="a few epochs: a smoke test")
    p.add_argument("--no-sweep", action="store_true", help="skip the rank / subnetwork-count sweep")
    p.add_argument(
        "--no-controls",
        action="store_true",
        help="skip the random-network control and the second decomposition seed (cross-seed "
        "stability) run on the first seed",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace one setting of the profile (an L3DConfig field), e.g. --set "
        "divergence=mse_authors --set top_k=0.2; repeatable; not for the suite",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    p = sub.add_parser(
        "analyze",
        help="per-subnetwork P_act, impact, top samples, top logits",
        description="Analyse a finished run: writes RUN_DIR/analysis/analysis.json (+ Markdown, "
        "PNG) with each subnetwork's P_act, top samples by impact and top logits, and prints "
        "the headline numbers.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="analysis folder (default: RUN_DIR/analysis, read by the report)")
    p.add_argument("--n-top", type=positive_int, default=10, help="top samples per subnetwork")
    p.add_argument(
        "--n-references", type=positive_int, default=10, help="references averaged in impact"
    )
    p.add_argument(
        "--n-samples",
        type=positive_int,
        help="analyse only the first N samples (sequences, in a per-token run)",
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        help="analyse these inputs instead of the run's: a data file with the run's tensor names "
        "(e.g. held-out inputs, or held-out pairs for a pair run's patching scores)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")

    p = sub.add_parser(
        "intervene",
        help="move the weights along subnetworks and measure the output change",
        description="For each subnetwork K and step D, compute D(f(x, W0 + D v_K), f(x, W0)) "
        "per sample (eq. 9) and each sample's impact; writes "
        "RUN_DIR/interventions/subnetwork_K.json and .png and prints, per step, the mean change "
        "on the subnetwork's top-impact samples and on all samples.",
        epilog=INTERVENE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--subnetwork", type=int, nargs="+", required=True, metavar="K")
    p.add_argument("--delta", type=float, nargs="+", required=True, metavar="D")
    p.add_argument(
        "--n-samples", type=positive_int, default=1000, help="samples to measure (first N)"
    )
    p.add_argument(
        "--n-references", type=positive_int, default=10, help="references averaged in impact"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")

    p = sub.add_parser(
        "control",
        help="decompose controls of a run: a shuffled-weights network and another seed",
        description="Is the decomposition evidence of learned structure? Runs the same config on "
        "the model with every parameter tensor's entries shuffled (kind 'shuffled') and with the "
        "next decomposition seed (kind 'seed'), as run folders RUN_DIR/controls/KIND (resumable), "
        "analyses them, and writes RUN_DIR/controls/controls.json and controls.md: each headline "
        "metric beside the shuffled control's, gaps too small to count flagged, and the "
        "cross-seed stability (Hungarian-matched |cos| of live subnetworks). l3d report shows it.",
        epilog=CONTROL_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=CONTROL_KINDS,
        default=list(CONTROL_KINDS),
        help="which controls to run (default: both)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")

    p = sub.add_parser(
        "report",
        help="write a static HTML dashboard of a run",
        description="Write a self-contained static HTML dashboard (no network): an index with "
        "losses, P_act, co-activation and a sortable, searchable row per subnetwork, and a page "
        "per subnetwork (impact histogram, top and quantile examples, outputs it moves, "
        "interventions, related subnetworks, V_out heatmaps). Runs `l3d analyze` first when the "
        "run has no analysis yet.",
        epilog=REPORT_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument(
        "--no-analyze",
        action="store_true",
        help="do not run the analysis when RUN_DIR/analysis is missing (no examples then)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no messages")

    p = sub.add_parser(
        "finetune",
        help="edit the model along chosen subnetworks (an adapter W0 + sum_k alpha_k v_k)",
        description="Finetune along subnetworks (paper Section 4.2, Appendix B.2): learn alpha "
        "(and with --train factors the subnetworks' factors) so that W = W0 + sum_k alpha_k v_k "
        "fits the data; writes the adapter (adapter.json + adapter.safetensors) to --out and "
        "prints how far it moved each tensor.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--subnetworks", nargs="+", required=True, metavar="K",
        help="indices, or top:N (largest impact on --data) or contrast:N (on --data over --retain)",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="safetensors file of inputs and labels")
    p.add_argument("--out", required=True, help="adapter folder")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--retain", help="safetensors file of inputs whose outputs to keep")
    p.add_argument(
        "--retain-weight", type=float, help="weight of the retain term (default: 1; needs --retain)"
    )
    p.add_argument("--objective", choices=OBJECTIVES, default="labels")
    p.add_argument(
        "--train",
        choices=TRAIN_MODES,
        default="scalars",
        help="alpha only; alpha and the subnetworks' factors; a core in each subnetwork's "
        "subspaces; alpha and a core in the first subnetwork's (default: scalars)",
    )
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=positive_int, help="rows per step (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    return parser


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


@contextlib.contextmanager
def _quiet_libraries(args: argparse.Namespace, spec: Any) -> Iterator[None]:
    """With -q, silence transformers (its "Loading weights" bar, hub download bars, warnings)
    while a run with a HuggingFace model works; restored afterwards."""
    uses_hf = spec.model.hf is not None or spec.data.text is not None
    if not getattr(args, "quiet", False) or not uses_hf:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the hf source says how to install it
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _decompose(args: argparse.Namespace) -> int:
    from l3d.runs.execution import process_group

    # Under torchrun: one distributed run of all its processes; rank 0 speaks for it.
    with process_group() as group:
        if group is not None and not group.lead:
            args.quiet = True
        return _decompose_folder(args)


def _decompose_folder(args: argparse.Namespace) -> int:
    from l3d import runs

    if args.resume:
        if args.config or args.overrides or args.out or args.check:
            raise L3DError(
                "--resume RUN_DIR continues a run as configured: drop CONFIG/--set/--out/--check"
            )
        run_dir = runs.RunDir(Path(args.resume))
        spec = run_dir.spec()  # a clear error if this is not a run folder
        if run_dir.finished:
            _say(args, f"{run_dir.path} is already finished: {run_dir.decomposition}")
            return 0
        runs.writable_folder(run_dir.path, "run")
    else:
        if not args.config:
            raise L3DError("give a run config (l3d decompose CONFIG.yaml) or --resume RUN_DIR")
        spec = runs.load_spec(args.config, args.overrides)
        if args.check:
            with _quiet_libraries(args, spec):
                config = runs.check(spec, lambda m: _say(args, m))
            _say(args, f"{args.config}: ready to run ({config.n_v} subnetworks)")
            return 0
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        run_dir = runs.RunDir(runs.writable_folder(out, "run"))
    # The lock from before the folder is (re)made to the end: a second process on the same folder
    # gets one line naming this one's pid, and cannot clear or mix this run's files.
    with run_dir.lock(), _quiet_libraries(args, spec):
        if not args.resume:
            run_dir = runs.create_run(spec, run_dir.path, overwrite=args.overwrite)
            _say(args, f"run folder: {run_dir.path}")
        return _run(args, run_dir)


def _stopped(command: str, stop: Any, run_dir: Any, again: str, what: str = "") -> int:
    """The one line of a run stopped by Ctrl-C or SIGTERM (`runs.Interrupted`), naming the
    command that continues it from its checkpoint; the exit status 128 + the signal. Under
    torchrun rank 0 says it (the one that saved the checkpoint), not every rank."""
    from l3d.core.distributed import Group

    group = Group.current()
    if group is None or group.lead:
        epochs = run_dir.spec().l3d.epochs
        print(
            f"l3d {command}: stopped by {stop} with {stop.epoch} of {epochs} epochs{what} "
            f"done; checkpoint saved. Continue with: {again}",
            file=sys.stderr,
        )
    return 128 + stop.signum


def _run(args: argparse.Namespace, run_dir: Any) -> int:
    from l3d import runs

    try:
        decomposition = runs.execute(
            run_dir, progress=False if args.quiet else None, log=lambda m: _say(args, m)
        )
    except runs.Interrupted as stop:
        return _stopped("decompose", stop, run_dir, f"l3d decompose --resume {run_dir.path}")
    ev = decomposition.evaluation
    _say(
        args,
        f"done: loss (paper) {ev.loss_paper:.4g}, loss (pooled squared) "
        f"{ev.loss_pooled_squared:.4g}, dead subnetworks {len(decomposition.dead_subnetworks)}"
        f"/{decomposition.n_subnetworks}; saved to {run_dir.decomposition}",
    )
    return 0


def _experiment(args: argparse.Namespace) -> int:
    try:
        from l3d import experiments
    except ImportError as err:
        raise L3DError(
            f"the toy experiment suite (l3d.experiments) is unavailable: {err}"
        ) from None
    if args.list:
        for name, spec in experiments.EXPERIMENTS.items():
            print(f"{name:12s} {spec.description}")
        return 0
    if not args.name:
        raise L3DError(f"name an experiment ({', '.join(experiments.EXPERIMENTS)}) or 'suite'")
    summary = experiments.run_named(
        args.name,
        args.seeds,
        args.out,
        settings=args.settings,
        quick=args.quick,
        sweep=not args.no_sweep,
        progress=not args.quiet,
        set_options=args.set,
        controls=not args.no_controls,
    )
    if not args.quiet and summary.is_file():
        print(summary.read_text())
    _say(args, f"results in {summary.parent}")
    return 0


def _inputs(run, n_samples: int | None):
    from l3d.core.samples import as_inputs, take

    inputs = as_inputs(run.data)
    return inputs if n_samples is None else take(inputs, slice(0, n_samples))


def _analysed(run, n_samples: int | None):
    """The run's inputs, the first n_samples; a pair run's as pairs (`Referenced`: each input with
    its counterpart's output, the reference it was decomposed with, paper Section 4.2)."""
    from l3d.core.samples import Referenced, take

    if not isinstance(run.data, Referenced):
        return _inputs(run, n_samples)
    rows = slice(0, n_samples)
    return Referenced(take(run.data.inputs, rows), run.data.references[rows])


def _analyze(args: argparse.Namespace) -> int:
    from l3d.runs.execution import process_group

    # Under torchrun the processes split the impact pass; rank 0 writes the analysis.
    with process_group() as group:
        if group is not None and not group.lead:
            args.quiet = True
        return _analyze_folder(args)


def _analyze_folder(args: argparse.Namespace) -> int:
    from l3d import runs

    try:
        from l3d.analysis import AnalysisOptions, write_analysis
    except ImportError as err:
        raise L3DError(f"analysis (l3d.analysis) is not available: {err}") from None
    run_dir = runs.RunDir(Path(args.run_dir))
    run_dir.require_finished()
    out_path = Path(args.out) if args.out else run_dir.analysis
    with runs.output_folder(out_path, "analysis") as out, _quiet_libraries(args, run_dir.spec()):
        run = runs.open_run(run_dir.path)
        tokenizer = None
        if run.spec.model.hf is not None:
            try:
                tokenizer = runs.load_tokenizer(
                    run.spec.data.options.get("tokenizer", run.spec.model.hf)
                )
            except L3DError as err:
                if run.spec.data.text is not None:  # the text needs it; token ids do not
                    raise
                _say(args, f"no tokenizer ({err}): tokens are shown as ids")
        source = run.spec.data
        if args.data is not None:
            source = runs.with_data_file(source, args.data)
            run = dataclasses.replace(run, data=runs.build_data(source, run.spec.model, run.model))
        labels = runs.build_labels(source)
        if labels is not None and args.n_samples is not None:
            labels = labels[: args.n_samples]
        result = write_analysis(
            run.decomposition,
            _analysed(run, args.n_samples),
            out,
            tokenizer=tokenizer,
            labels=labels,
            class_names=run.spec.data.class_names,
            options=AnalysisOptions(
                n_top=args.n_top,
                n_references=args.n_references,
                progress=not args.quiet,
                data=None if args.data is None else str(Path(args.data).resolve()),
            ),
        )
    if result is None:  # a rank other than 0: its share of the impacts is done
        return 0
    _say(args, _analysis_headline(result["summary"]))
    _say(args, f"analysis in {out}")
    return 0


def _analyze_with_defaults(run_dir: str | Path, quiet: bool, out: Path | None = None) -> None:
    """`l3d analyze RUN_DIR [--out OUT]`, parsed like the command line so it gets that command's
    defaults."""
    outs = [] if out is None else ["--out", str(out)]
    _analyze(_parser().parse_args(["analyze", str(run_dir), *outs, *(["-q"] * quiet)]))


def _analysis_headline(summary: dict) -> str:
    """The numbers to read first: samples, dead subnetworks, selectivity, purity if labelled."""
    median = summary.get("median_intervention_selectivity")
    below = summary.get("n_intervention_below_noise") or 0
    selectivity = "none measurable (below noise)" if median is None else _fmt(median)
    if below and median is not None:
        selectivity += f" ({below} below noise, not counted)"
    parts = [
        f"analysed {summary['n_samples']} samples: dead subnetworks "
        f"{summary['n_dead']}/{summary['n_subnetworks']}",
        f"median intervention selectivity {selectivity}",
    ]
    if summary.get("best_patching_score") is not None:
        parts.append(f"best patching score {_fmt(summary['best_patching_score'])}")
    if "purity" in summary:
        random = summary.get("purity_random_directions")
        baseline = f" (random directions {_fmt(random)})" if random is not None else ""
        parts.append(f"top-{summary['n_top']} sample purity {_fmt(summary['purity'])}{baseline}")
    return ", ".join(parts)


def _intervene(args: argparse.Namespace) -> int:
    from l3d import io, plots, runs
    from l3d.analysis import pair_impacts
    from l3d.analysis.writing import InterventionResult
    from l3d.core.samples import Referenced, check_samples
    from l3d.core.subnetworks import subnetwork_index

    run_dir = runs.RunDir(Path(args.run_dir))
    run_dir.require_finished()
    with (
        runs.output_folder(run_dir.interventions, "interventions") as folder,
        _quiet_libraries(args, run_dir.spec()),
    ):
        run = runs.open_run(run_dir.path)
        for k in args.subnetwork:
            subnetwork_index(k, run.decomposition.n_subnetworks, "--subnetwork")
        for option, values in (("--subnetwork", args.subnetwork), ("--delta", args.delta)):
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise L3DError(f"{option} {twice:g} is given twice: give each once")
        d, inputs = run.decomposition, _analysed(run, args.n_samples)
        if isinstance(inputs, Referenced):  # a pair run: each input's reference is given
            impact = pair_impacts(d, inputs, [d.subnetworks.v_in])[0]
            inputs = inputs.inputs
        else:
            impact = d.impact(inputs, n_references=args.n_references).cpu()
        check_samples(impact.shape[0])
        label = run.decomposition.divergence.change_label
        for k in args.subnetwork:
            change, floor = run.decomposition.output_change_and_floor(inputs, k, args.delta)
            result = InterventionResult(
                subnetwork=k,
                divergence=run.decomposition.config.divergence,
                deltas=args.delta,
                impact=impact[:, k].tolist(),
                change=change.tolist(),
                noise_floor=floor,
            ).model_dump()
            path = folder / f"subnetwork_{k}.json"
            io.write_json(path, result)
            figure = plots.intervention_figure(result)
            io.write_bytes(folder / f"subnetwork_{k}.png", plots.png(figure))
            _say(args, f"subnetwork {k} ({label}; {path}):")
            for line in _intervention_headline(impact[:, k], change, args.delta, floor):
                _say(args, f"  {line}")
    return 0


def _intervention_headline(
    impact: Any, change: Any, deltas: list[float], floor: float
) -> list[str]:
    """Per step: the mean output change on the subnetwork's top-impact samples against all (no
    ratio when the change on all samples is within round-off: `noise_floor`)."""
    top = impact.argsort(descending=True, stable=True)[:N_TOP_IMPACT]
    lines = []
    for delta, row in zip(deltas, change):
        on_top, on_all = float(row[top].mean()), float(row.mean())
        ratio = f" ({on_top / on_all:.3g}×)" if on_all > floor else " (below noise)"
        lines.append(
            f"δ = {delta:g}: {on_top:.3g} on its {len(top)} top-impact samples, "
            f"{on_all:.3g} on all {len(row)}{ratio}"
        )
    return lines


# The controls' run folders' specs: the parent's with a shuffled model, or the next seed.
CONTROL_KINDS = ("shuffled", "seed")


def _control_spec(spec: Any, kind: str, n_subnetworks: int) -> Any:
    """`n_subnetworks`: the parent run's, also where its config says 'auto', so that the
    controls are compared at the same count."""
    from l3d.controls import SHUFFLE_SEED_OFFSET

    spec = spec.model_copy(update={"l3d": spec.l3d.replace(n_subnetworks=n_subnetworks)})
    if kind == "shuffled":
        model = spec.model.model_copy(update={"shuffle_seed": spec.l3d.seed + SHUFFLE_SEED_OFFSET})
        return spec.model_copy(update={"model": model})
    return spec.model_copy(update={"l3d": spec.l3d.replace(seed=spec.l3d.seed + 1)})


def _control(args: argparse.Namespace) -> int:
    from l3d import io, runs

    run_dir = runs.RunDir(Path(args.run_dir))
    run_dir.require_finished()
    if run_dir.spec().model.shuffle_seed is not None:
        raise L3DError(f"'{run_dir.path}' is itself a shuffled control: run it on the original run")
    n_v = io.read_decomposition(run_dir.decomposition).config.n_v
    with runs.output_folder(run_dir.controls, "controls") as folder:
        return _run_controls(args, run_dir, folder, n_v)


def _run_controls(args: argparse.Namespace, run_dir: RunDir, folder: Path, n_v: int) -> int:
    """`l3d control`'s decompositions and comparison, written into `folder`."""
    import shutil

    from l3d import controls, io, runs

    found: dict[str, Any] = {}
    for kind in CONTROL_KINDS:
        child = runs.RunDir(folder / kind)
        expected = _control_spec(run_dir.spec(), kind, n_v)
        if kind not in args.kinds:  # another kind's finished result stays in the comparison
            if child.finished and child.spec() == expected:
                found[kind] = child
            continue
        child = runs.RunDir(runs.writable_folder(child.path, "control run"))
        with child.lock():
            if child.config.is_file() and child.spec() != expected:
                # Made for an earlier run in this folder (or edited since): not this run's control.
                _say(args, f"control '{kind}' in {child.path} is of another run: decomposing again")
                runs.create_run(expected, child.path, overwrite=True)
            if not child.config.is_file():
                runs.create_run(expected, child.path)
            # A toy's trained weights: the control starts from the very same model.
            for file in (run_dir.model_weights, run_dir.model_info):
                if file.is_file() and not (child.path / file.name).is_file():
                    shutil.copyfile(file, child.path / file.name)
            if not child.finished:
                _say(args, f"control '{kind}': decomposing into {child.path}")
                try:
                    with _quiet_libraries(args, child.spec()):
                        runs.execute(
                            child,
                            progress=False if args.quiet else None,
                            log=lambda m: _say(args, m),
                        )
                except runs.Interrupted as stop:
                    kinds = (
                        ""
                        if args.kinds == list(CONTROL_KINDS)
                        else " --kinds " + " ".join(args.kinds)
                    )
                    again = f"l3d control {run_dir.path}{kinds}"
                    return _stopped("control", stop, child, again, f" of the '{kind}' control")
        found[kind] = child
    # Every side analysed the same way (the defaults, on the run's own data): a run analysed with
    # other options gets a default analysis of its own, beside the controls.
    summaries: dict[str, dict[str, Any]] = {}
    for kind, child in found.items():
        summary = _default_analysis(child.path, child.analysis, n_v, args.quiet)
        assert summary is not None  # analysed if it was not
        summaries[kind] = summary
    count = next((s["n_samples"] for s in summaries.values()), None)
    made = (run_dir.analysis / "analysis.json").is_file()
    own = _default_analysis(
        run_dir.path, run_dir.analysis, n_v, args.quiet, count, reanalyse=not made
    )
    if own is None:
        own = _default_analysis(run_dir.path, folder / "analysis", n_v, args.quiet, count)
    assert own is not None
    mine = controls.headline(own)
    result: dict[str, Any] = {"run": mine}
    if "shuffled" in found:
        shuffled = str(found["shuffled"].path)
        result["shuffled"] = controls.shuffled_entry(mine, summaries["shuffled"], shuffled)
    if "seed" in found:
        with _quiet_libraries(args, run_dir.spec()):
            first = runs.open_run(run_dir.path).decomposition
            second = runs.open_run(found["seed"].path).decomposition
        result["seed"] = controls.seed_entry(first, second, str(found["seed"].path))
    io.write_json(folder / "controls.json", result)
    io.write_text(folder / "controls.md", controls.markdown(result))
    if not args.quiet:
        print(controls.markdown(result))
    _say(args, f"controls in {folder} (shown by l3d report)")
    return 0


def _default_analysis(
    run_dir: Path,
    out: Path,
    n_v: int,
    quiet: bool,
    n_samples: int | None = None,
    reanalyse: bool = True,
) -> dict[str, Any] | None:
    """The summary of the analysis in `out` if `l3d analyze` made it with its defaults (all of
    the run's own samples: `n_samples` of them where given); otherwise, with `reanalyse`, that
    of a default analysis written there now (None without: the user's own analysis is kept)."""
    from l3d.analysis.writing import read_analysis

    defaults = _parser().parse_args(["analyze", str(run_dir)])
    path = out / "analysis.json"
    if path.is_file():
        summary = read_analysis(path, n_v, "delete it (`l3d control` analyses again)")["summary"]
        references = 1 if summary["pairs"] else defaults.n_references  # pairs: their own
        made_so = (
            summary.get("data") is None
            and summary["n_top"] == defaults.n_top
            and summary["n_references"] == references
            and n_samples in (None, summary["n_samples"])
        )
        if made_so:
            return summary
    if not reanalyse:
        return None
    if not quiet:
        print(f"analysing {run_dir} (l3d analyze) into {out}", file=sys.stderr)
    _analyze_with_defaults(run_dir, quiet, out)
    return read_analysis(path, n_v, "delete it (`l3d control` analyses again)")["summary"]


def _report(args: argparse.Namespace) -> int:
    from l3d import runs
    from l3d.report import headline, write_report

    run_dir = runs.RunDir(Path(args.run_dir))
    # Examples, histograms and logits come from the analysis: make it unless told not to (a
    # folder holding only a decomposition, without config.yaml, has no data to analyse).
    analysed = (run_dir.analysis / "analysis.json").is_file()
    if run_dir.finished and run_dir.config.is_file() and not analysed:
        if args.no_analyze:
            hint = f"run `l3d analyze {args.run_dir}`"
            _say(args, f"no analysis: the report has no examples ({hint})")
        else:
            _say(args, f"no analysis yet: running `l3d analyze {args.run_dir}` first")
            _analyze_with_defaults(args.run_dir, args.quiet)
    path = write_report(args.run_dir, args.out)
    _say(args, headline(args.run_dir))
    _say(args, f"report: {path}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from l3d import runs

    if not args.out:  # Path("") is the current folder
        raise L3DError("--out is empty: give the adapter folder, e.g. --out RUN_DIR/adapter")
    if args.retain_weight is not None and args.retain is None:
        raise L3DError(
            f"--retain-weight {args.retain_weight} weighs the retain data: give --retain (inputs "
            "whose outputs to keep), or leave --retain-weight out"
        )
    run_dir = runs.RunDir(Path(args.run_dir))
    run_dir.require_finished()
    with runs.output_folder(Path(args.out), "adapter") as out:
        return _finetune_into(args, run_dir, out)


def _finetune_into(args: argparse.Namespace, run_dir: Any, out: Path) -> int:
    from l3d import runs
    from l3d.finetuning import finetune, read_data, read_inputs, select_subnetworks

    if (out / "adapter.json").exists() and not args.overwrite:
        raise L3DError(
            f"'{out}' already holds an adapter: choose another --out, or pass --overwrite to "
            "replace it"
        )
    with _quiet_libraries(args, run_dir.spec()):
        decomposition = runs.open_run(run_dir.path).decomposition
        data = read_data(args.data)
        retain = None if args.retain is None else read_inputs(args.retain, "retain data")
        chosen = select_subnetworks(decomposition, args.subnetworks, data.inputs, retain)
        adapter = finetune(
            decomposition,
            data,
            subnetworks=chosen,
            objective=args.objective,
            train=args.train,
            steps=args.steps,
            lr=args.lr,
            retain=retain,
            **({} if args.retain_weight is None else {"retain_weight": args.retain_weight}),
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.quiet,
        )
        adapter.save(out)
    first, last = adapter.history[0], adapter.history[-1]
    alphas = ", ".join(f"{k}: {float(a):.3g}" for k, a in zip(chosen, adapter.alpha.tolist()))
    if not args.quiet:
        print(f"subnetworks (alpha): {alphas}; trained numbers: {adapter.n_trainable}")
        for key in ("objective", "retain_distance"):
            if key in last:
                steps = f"{_fmt(first[key])} at step 1 -> {_fmt(last[key])} at step {last['step']}"
                print(f"{key}: {steps}")
        print(f"{'tensor':40s} {'||W0||':>10s} {'||dW||':>10s} {'ratio':>10s}")
        for name, moved in adapter.delta_norms().items():
            w0 = float(decomposition.target.w0[name].norm())
            ratio = f"{moved / w0:10.3g}" if w0 > 0 else f"{'-':>10s}"  # a tensor at 0 (a bias)
            print(f"{name:40s} {w0:10.4g} {moved:10.4g} {ratio}")
    _say(args, f"adapter saved to {out}")
    return 0


COMMANDS = {
    "control": _control,
    "finetune": _finetune,
    "decompose": _decompose,
    "experiment": _experiment,
    "analyze": _analyze,
    "intervene": _intervene,
    "report": _report,
}


# File-system failures that are the user's to fix (a folder made read-only or full mid-run):
# one line naming the file, like every user error, never a traceback.
_FILE_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST,
}  # fmt: skip


# Commands that make one distributed job of torchrun's processes.
DISTRIBUTED = ("decompose", "analyze")


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """l3d's own warnings as one line each, like its errors (Python's format adds the file, the
    line and the source line of the warn call); other libraries' as they come."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if f"{os.sep}l3d{os.sep}" in str(filename):
                print(f"l3d {command}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        from l3d.runs.execution import launched_world_size

        if args.command not in DISTRIBUTED and launched_world_size() > 1:
            # Its processes would each do all the work and write the same files.
            raise L3DError(
                f"`l3d {args.command}` runs in one process: launch it without torchrun (only "
                "`l3d decompose` and `l3d analyze` are distributed; see docs/distributed.md)"
            )
        with _one_line_warnings(args.command):
            return COMMANDS[args.command](args)
    except L3DError as err:
        print(f"l3d {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        if err.errno not in _FILE_ERRNOS or not err.filename:
            raise
        print(
            f"l3d {args.command}: error: cannot access '{err.filename}' ({err.strerror}): make "
            "its folder writable (or free space) and run the command again",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"l3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
