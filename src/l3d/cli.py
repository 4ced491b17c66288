"""The `l3d` command: decompose from a config file, resume, run the toy suite, analyse, intervene
and write an HTML report. User errors print one line and exit with status 2; a run stopped by
Ctrl-C or SIGTERM saves a checkpoint and exits with 128 + the signal number."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l3d.errors import L3DError

EXIT_USER_ERROR = 2

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
"""
EXPERIMENT_EXAMPLES = """examples:
  l3d experiment --list
  l3d experiment tms --seeds 0,1,2 --out runs/exp-tms
  l3d experiment suite --seeds 0 --quick --out runs/suite
"""
ANALYZE_EXAMPLES = """examples:
  l3d analyze runs/tms
  l3d analyze runs/tms --n-top 20 --n-samples 2000
"""
INTERVENE_EXAMPLES = """examples:
  l3d intervene runs/tms --subnetwork 0 --delta 0.5 1 2
  l3d intervene runs/tms --subnetwork 0 1 2 --delta -1 1 --n-samples 500
"""
REPORT_EXAMPLES = """examples:
  l3d report runs/tms                      # writes runs/tms/report/index.html
  l3d report runs/tms --out /tmp/tms-report
"""


def _parser() -> argparse.ArgumentParser:
    from l3d import __version__

    parser = argparse.ArgumentParser(
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
        "PNG) with each subnetwork's P_act, top samples by impact and top logits.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--n-top", type=int, default=10, help="top samples per subnetwork")
    p.add_argument("--n-references", type=int, default=10, help="references averaged in impact")
    p.add_argument("--n-samples", type=int, help="analyse only the first N samples")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser(
        "intervene",
        help="move the weights along subnetworks and measure the output change",
        description="For each subnetwork K and step D, compute D(f(x, W0 + D v_K), f(x, W0)) "
        "per sample (eq. 9) and each sample's impact; writes "
        "RUN_DIR/interventions/subnetwork_K.json and .png.",
        epilog=INTERVENE_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--subnetwork", type=int, nargs="+", required=True, metavar="K")
    p.add_argument("--delta", type=float, nargs="+", required=True, metavar="D")
    p.add_argument("--n-samples", type=int, default=1000, help="samples to measure (first N)")
    p.add_argument("--n-references", type=int, default=10, help="references averaged in impact")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser(
        "report",
        help="write a static HTML report of a run",
        description="Write a self-contained static HTML report (no network): loss curves, P_act, "
        "dead subnetworks, config, and a section per subnetwork with V_out heatmaps, top samples, "
        "top logits and intervention plots.",
        epilog=REPORT_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("-q", "--quiet", action="store_true")
    return parser


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _decompose(args: argparse.Namespace) -> int:
    from l3d import runs

    if args.resume:
        if args.config or args.overrides or args.out:
            raise L3DError(
                "--resume RUN_DIR continues a run as configured: drop CONFIG/--set/--out"
            )
        run_dir = runs.RunDir(Path(args.resume))
        run_dir.spec()  # a clear error if this is not a run folder
        if run_dir.finished:
            _say(args, f"{run_dir.path} is already finished: {run_dir.decomposition}")
            return 0
    else:
        if not args.config:
            raise L3DError("give a run config (l3d decompose CONFIG.yaml) or --resume RUN_DIR")
        spec = runs.load_spec(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        run_dir = runs.create_run(spec, out, overwrite=args.overwrite)
        _say(args, f"run folder: {run_dir.path}")
    try:
        decomposition = runs.execute(
            run_dir, progress=False if args.quiet else None, log=lambda m: _say(args, m)
        )
    except runs.Interrupted as stop:
        epochs = runs.RunDir(run_dir.path).spec().l3d.epochs
        print(
            f"l3d decompose: stopped by {stop} with {stop.epoch} of {epochs} epochs done; "
            f"checkpoint saved. Continue with: l3d decompose --resume {run_dir.path}",
            file=sys.stderr,
        )
        return 128 + stop.signum
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
    )
    if not args.quiet and summary.is_file():
        print(summary.read_text())
    _say(args, f"results in {summary.parent}")
    return 0


def _inputs(run, n_samples: int | None):
    from l3d.core.samples import as_inputs, take

    inputs = as_inputs(run.data)
    return inputs if n_samples is None else take(inputs, slice(0, n_samples))


def _analyze(args: argparse.Namespace) -> int:
    from l3d import runs

    try:
        from l3d.analysis import AnalysisOptions, write_analysis
    except ImportError as err:
        raise L3DError(f"analysis (l3d.analysis) is not available: {err}") from None
    run = runs.open_run(args.run_dir)
    tokenizer = None
    if run.spec.model.hf is not None:
        tokenizer = runs.load_tokenizer(run.spec.data.options.get("tokenizer", run.spec.model.hf))
    labels = runs.build_labels(run.spec.data)
    if labels is not None and args.n_samples is not None:
        labels = labels[: args.n_samples]
    write_analysis(
        run.decomposition,
        _inputs(run, args.n_samples),
        run.run_dir.analysis,
        tokenizer=tokenizer,
        labels=labels,
        class_names=run.spec.data.class_names,
        options=AnalysisOptions(
            n_top=args.n_top, n_references=args.n_references, progress=not args.quiet
        ),
    )
    _say(args, f"analysis in {run.run_dir.analysis}")
    return 0


def _intervene(args: argparse.Namespace) -> int:
    from l3d import io, plots, runs

    run = runs.open_run(args.run_dir)
    n_v = run.decomposition.n_subnetworks
    bad = [k for k in args.subnetwork if not 0 <= k < n_v]
    if bad:
        raise L3DError(f"--subnetwork {bad} out of range: this run has subnetworks 0..{n_v - 1}")
    inputs = _inputs(run, args.n_samples)
    impact = run.decomposition.impact(inputs, n_references=args.n_references).cpu()
    folder = run.run_dir.interventions
    folder.mkdir(parents=True, exist_ok=True)
    for k in args.subnetwork:
        change = run.decomposition.output_change(inputs, k, args.delta)
        result = {
            "subnetwork": k,
            "divergence": run.decomposition.config.divergence,
            "deltas": args.delta,
            "impact": impact[:, k].tolist(),
            "change": change.tolist(),
        }
        io.write_json(folder / f"subnetwork_{k}.json", result)
        io.write_bytes(folder / f"subnetwork_{k}.png", plots.png(plots.intervention_figure(result)))
        _say(args, f"subnetwork {k}: {folder / f'subnetwork_{k}.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from l3d.report import write_report

    path = write_report(args.run_dir, args.out)
    _say(args, f"report: {path}")
    return 0


COMMANDS = {
    "decompose": _decompose,
    "experiment": _experiment,
    "analyze": _analyze,
    "intervene": _intervene,
    "report": _report,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except L3DError as err:
        print(f"l3d {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"l3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
