"""Running a run folder to the end: lock it, build its model and data, continue from the last
checkpoint (if made with the same config), log every epoch, checkpoint on time and on
SIGINT/SIGTERM, save the decomposition; and opening a finished run for analysis.

Under torchrun (`process_group`) or any initialised process group, the processes make one data
parallel run: every rank trains, rank 0 alone locks and writes the folder (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from l3d.config import L3DConfig
from l3d.core.distributed import Group, RankLost
from l3d.core.samples import Dataset
from l3d.core.trainer import StepResult, Trainer
from l3d.decomposition import Decomposition, check_run, load, run
from l3d.errors import L3DError
from l3d.runs.checkpoint import flatten_state, load_checkpoint, save_checkpoint
from l3d.runs.folder import RunDir
from l3d.runs.sources import (
    build_data,
    build_labels,
    build_model,
    check_data,
    record_data,
    resolve_custom,
)
from l3d.runs.spec import RunOptions, RunSpec

# How the step bar labels the trained loss (L3DConfig.loss).
LOSS_LABELS = {"paper": "loss (eq. 8)", "pooled_squared": "pooled loss"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run saved its last whole-epoch state (`epoch`) and stopped.

    A BaseException, as KeyboardInterrupt: code that turns any `Exception` into an error of its
    own (a user function's failure in a check) must not turn a stop into that error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.epoch = 0


class _Stop:
    """SIGINT and SIGTERM while a run executes, turned into `Interrupted`.

    While epochs train, the handler only records the signal and the run raises after the current
    step (or epoch): raised from the handler, the exception could land in a finaliser (`__del__`,
    a weakref callback), where Python prints and drops it, and the run would go on to its last
    epoch. Before the first step (set-up, initialisation) and after the last epoch (the final
    evaluation) no unsaved epoch is lost, so the handler raises at once; a raise dropped there is
    caught by the next check."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.signum: int | None = None
        self.training = False

    def _handler(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        if not self.training:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def after_step(self, on_step: Callable[[StepResult], None]) -> Callable[[StepResult], None]:
        def callback(result: StepResult) -> None:
            self.training = True
            on_step(result)
            self.check()

        return callback

    def after_epoch(
        self, on_epoch: Callable[[Trainer, dict], None]
    ) -> Callable[[Trainer, dict], None]:
        def callback(trainer: Trainer, record: dict) -> None:
            on_epoch(trainer, record)
            self.check()
            self.training = trainer.epoch < self.epochs

        return callback

    def __enter__(self) -> _Stop:
        signals = (signal.SIGINT, signal.SIGTERM)
        self.previous = {s: signal.signal(s, self._handler) for s in signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started: its WORLD_SIZE, 1 without one."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise L3DError(
            f"WORLD_SIZE is '{text}', not a number of processes: launch with torchrun, which "
            "sets it, or unset it to run in one process"
        ) from None


RANK_TIMEOUT = "L3D_RANK_TIMEOUT"
"""Seconds a rank waits in a collective for the others (default: torch's, 30 minutes). A rank
that hangs without dying is noticed only then; the others stop as when a rank dies."""


def rank_timeout() -> timedelta | None:
    """The process-group timeout from the environment (`RANK_TIMEOUT`), None for torch's."""
    text = os.environ.get(RANK_TIMEOUT)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise L3DError(
            f"{RANK_TIMEOUT}={text!r}: give the seconds a rank waits for the others, e.g. "
            f"{RANK_TIMEOUT}=600, or unset it for torch's 30 minutes"
        )
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group() -> Iterator[Group | None]:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group for the block,
    so that its processes make one distributed run: gloo for CPU tensors and, where CUDA exists,
    NCCL for CUDA tensors with one GPU per local rank. An initialised group is used as it is."""
    if dist.is_initialized() or (size := launched_world_size()) <= 1:
        yield Group.current()
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise L3DError(
            f"WORLD_SIZE={size} is set but not {', '.join(missing)}: launch the processes with "
            f"torchrun (torchrun --nproc-per-node {size} -m l3d decompose ...), which sets them "
            "all, or unset WORLD_SIZE to run in one process"
        )
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # what 'cuda' means here
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=rank_timeout())
    try:
        yield Group.current()
    finally:
        dist.destroy_process_group()


class _Tracker:
    """Optional wandb / TensorBoard logging, imported only when asked for (by rank 0 only)."""

    def __init__(self, options: RunOptions, run_dir: RunDir, spec: RunSpec, lead: bool) -> None:
        self.kind = options.tracking if lead else None
        self._writer, self._wandb = None, None
        if self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise L3DError("run.tracking: wandb is not installed: pip install wandb") from None
            self._wandb = wandb
            wandb.init(
                project=options.project,
                name=run_dir.path.name,
                dir=str(run_dir.path),
                config=spec.model_dump(mode="json"),
                resume="allow",
            )
        elif self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise L3DError(
                    "run.tracking: tensorboard is not installed: pip install tensorboard"
                ) from None
            self._writer = SummaryWriter(str(run_dir.tensorboard))

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._writer is not None:
            self._writer.close()


class _StepBar:
    """A second progress bar over the steps of the current epoch ("steps of epoch 3/50"), with its
    ETA and the latest loss labelled by the trained form, for runs whose epochs are long (a
    language model: hundreds of steps per epoch)."""

    def __init__(self, config: L3DConfig, data: Any, enabled: bool, first_epoch: int = 0) -> None:
        self.loss, self.shown, self.epochs = config.loss, 0.0, config.epochs
        self.bar: Any = None  # a tqdm bar from the first step on
        self.label = LOSS_LABELS.get(config.loss, f"loss ({config.loss})")
        self.enabled, self.first_epoch = enabled, first_epoch
        self.total = Dataset(data, config.batch_size).n_batches() if enabled else None

    def _desc(self, epoch: int) -> str:
        return f"steps of epoch {epoch + 1}/{self.epochs}"

    def step(self, result: StepResult) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            # Made at the first step, not before the set-up: its rate and ETA would count the
            # initialisation (a minute on ResidMLP's gradient k-means) as the first step's time.
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total,
                position=1,
                leave=False,
                unit="step",
                desc=self._desc(self.first_epoch),
            )
        self.bar.update(1)
        if time.time() - self.shown > 0.5:  # reading the loss synchronises an accelerator
            loss = getattr(result.losses, self.loss).item()
            self.bar.set_postfix({self.label: f"{loss:.4f}"})
            self.shown = time.time()

    def wrap(self, on_epoch: Callable[[Trainer, dict], None]) -> Callable[[Trainer, dict], None]:
        def callback(trainer: Trainer, record: dict) -> None:
            on_epoch(trainer, record)
            if self.bar is not None and trainer.epoch < self.epochs:  # not past the last
                self.bar.reset()
                self.bar.set_description_str(self._desc(trainer.epoch))
                self.shown = 0.0

        return callback

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


class _EpochLog:
    """The epoch callback: keeps the state after the last whole epoch, appends its metrics line
    (also to the tracker), and checkpoints it every `checkpoint_seconds` and after the last
    epoch. In a distributed run only rank 0 keeps and writes; the others count epochs."""

    def __init__(
        self, run_dir: RunDir, spec: RunSpec, tracker: _Tracker, group: Group | None
    ) -> None:
        self.run_dir, self.tracker, self.config = run_dir, tracker, spec.resolved()
        self.every, self.epochs = spec.run.checkpoint_seconds, spec.l3d.epochs
        self.world_size = 1 if group is None else group.size
        self.lead = group is None or group.lead
        self.snapshot: tuple[dict, dict] | None = None
        self.done: int | None = None
        self.start = self.last_save = time.time()

    def __call__(self, trainer: Trainer, record: dict) -> None:
        # Sharded factors are gathered by every rank together.
        state = trainer.state_dict() if trainer.sharded or self.lead else None
        if not self.lead:
            self.done = trainer.epoch
            return
        assert state is not None
        snapshot = flatten_state(state)
        line = {
            **record,
            "world_size": self.world_size,
            "time": time.time(),
            "elapsed": time.time() - self.start,
        }
        self.run_dir.append_metrics(line)
        # Only now the snapshot a stop saves: a signal before the line is written must not save
        # this epoch's state without its line (the resumed run would lack that epoch's metrics).
        self.snapshot = snapshot
        self.tracker.log(line)
        now = time.time()
        if now - self.last_save >= self.every or trainer.epoch == self.epochs:
            self.save()
            self.last_save = now

    def save(self) -> None:
        if self.snapshot is not None:
            save_checkpoint(
                self.run_dir.checkpoint,
                *self.snapshot,
                config=self.config,
                world_size=self.world_size,
            )

    def epoch(self, default: int) -> int:
        """The epoch of the last snapshot (`default` before the first)."""
        if self.snapshot is not None:
            return self.snapshot[1]["epoch"]
        return default if self.done is None else self.done


def _checkpoint_epoch(run_dir: RunDir) -> int | None:
    """The epoch of the checkpoint rank 0 last committed (its state.json), or None."""
    index = run_dir.checkpoint / "state.json"
    try:
        return int(json.loads(index.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def execute(
    run_dir: RunDir, *, progress: bool | None = None, log: Callable[[str], None] = print
) -> Decomposition:
    """Run (or continue) the decomposition of a run folder to the end and save it.

    Continues from the last checkpoint if there is one, and refuses one made with another config
    (model, data and l3d sections). Holds the folder's lock throughout: another process running
    the same folder is an L3DError naming its pid. On SIGINT/SIGTERM the state after the last
    whole epoch is checkpointed and `Interrupted` is raised. `log` gets progress messages.

    Under an initialised process group every rank calls this: rank 0 locks, logs and writes;
    another rank that stops (killed, failed) stops the run with a `RankLost` after rank 0 has
    saved the last whole epoch's state.
    """
    spec = run_dir.spec()
    group = Group.current()
    lead = group is None or group.lead
    with run_dir.lock():
        # First: a missing wandb fails before work.
        tracker = _Tracker(spec.run, run_dir, spec, lead)
        try:
            return _execute(run_dir, spec, tracker, progress, log if lead else _silent, group)
        finally:
            tracker.close()


def check(spec: RunSpec, log: Callable[[str], None]) -> L3DConfig:
    """What `execute` checks before training, with no run folder and no training: the model and
    data built, the config checked against them, n_subnetworks 'auto' chosen, the memory estimate
    logged and checked against the device (`l3d.decomposition.check_run`). Returns the config the
    run would use."""
    model = build_model(spec.model)
    data = build_data(spec.data, spec.model, model)
    build_labels(spec.data)  # read by the analysis only: refused here, not after the run
    divergence, reference = resolve_custom(spec.l3d)
    config, memory = check_run(model, data, spec.l3d, divergence, reference)
    log(memory)
    return config


def _execute(
    run_dir: RunDir,
    spec: RunSpec,
    tracker: _Tracker,
    progress: bool | None,
    log: Callable[[str], None],
    group: Group | None,
) -> Decomposition:
    lead = group is None or group.lead
    # The checkpoint first: a config edited since is refused before a model is built.
    state = load_checkpoint(run_dir.checkpoint, spec.resolved(), run_dir.config)
    # Rank 0 first: a toy is trained once, and the other ranks read its saved weights.
    with group.lead_first() if group is not None else contextlib.nullcontext():
        model = build_model(spec.model, run_dir)
    if state is not None:
        check_data(
            run_dir,
            spec.data,
            f"restore it to resume, or start over with `l3d decompose CONFIG --out {run_dir.path} "
            "--overwrite`",
        )
    data = build_data(spec.data, spec.model, model)  # with pairs: the counterparts' outputs
    if state is None and lead:
        build_labels(spec.data)  # read by the analysis only: refused here, not after the run
        record_data(run_dir, spec.data)
    divergence, reference = resolve_custom(spec.l3d)
    done = 0 if state is None else state["epoch"]
    if state is not None:
        log(f"resuming {run_dir.path} from epoch {done} of {spec.l3d.epochs}")
    if lead:
        run_dir.truncate_metrics(done)
    on_epoch = _EpochLog(run_dir, spec, tracker, group)
    show = (spec.run.progress if progress is None else progress) and lead
    with _Stop(spec.l3d.epochs) as stop, _StepBar(spec.l3d, data, show, done) as step_bar:
        try:
            decomposition = run(
                model,
                data,
                spec.l3d,
                divergence=divergence,
                reference=reference,
                progress=show,
                callback=stop.after_epoch(step_bar.wrap(on_epoch)),
                trainer_state=state,
                step_callback=stop.after_step(step_bar.step),
                shard_factors=spec.run.shard_factors,
                log=log,
            )
            stop.check()
        except (Interrupted, RankLost) as err:
            # A second Ctrl-C or SIGTERM (torchrun stopping the ranks) must not cut the save short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            on_epoch.save()
            epoch = on_epoch.epoch(done)
            stopped = err
            if isinstance(err, RankLost) and stop.signum is not None:
                # Signalled too, a step after the rank that left: it waited for that rank in the
                # next step's collective. The job was stopped, no rank failed.
                stopped = Interrupted(stop.signum)
            if isinstance(stopped, RankLost):
                # Rank 0 wrote its last snapshot just now; another rank names what is on disk.
                kept = _checkpoint_epoch(run_dir)
                kept_state = (
                    "no checkpoint was written yet (the run starts again)"
                    if kept is None
                    else f"the checkpoint of epoch {kept} is kept"
                )
                raise RankLost(
                    f"{stopped}; {kept_state}: continue with `l3d decompose --resume "
                    f"{run_dir.path}` (on any number of processes)"
                ) from None
            stopped.epoch = epoch
            raise stopped from None
    if lead:
        decomposition.save(run_dir.decomposition)
    return decomposition


def _silent(message: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


@dataclass
class LoadedRun:
    """A finished run, ready for analysis, interventions and reports. `data` is as built for the
    run: with `data.pairs`, `Referenced` (inputs and their counterparts' outputs: pass
    `references=data.references` to `decomposition.coefficients`)."""

    run_dir: RunDir
    spec: RunSpec
    model: nn.Module
    data: Any
    decomposition: Decomposition


def open_run(path: str | Path) -> LoadedRun:
    """A finished run folder of `l3d decompose`, opened in Python: its resolved spec, the model
    (a toy from the folder's saved weights, other models rebuilt from the config), the data and
    the saved decomposition, loaded against that model."""
    run_dir = RunDir(Path(path))
    run_dir.require_finished()
    spec = run_dir.spec()
    model = build_model(spec.model, run_dir)
    check_data(
        run_dir,
        spec.data,
        "restore it (to analyse other inputs, keep it and pass them with --data, or as data to "
        "the Python calls)",
    )
    data = build_data(spec.data, spec.model, model)  # with pairs: references at W0, as in the run
    divergence, reference = resolve_custom(spec.l3d)
    decomposition = load(run_dir.decomposition, model, divergence=divergence, reference=reference)
    return LoadedRun(run_dir, spec, model, data, decomposition)
