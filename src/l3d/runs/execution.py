"""Running a run folder to the end: lock it, build its model and data, continue from the last
checkpoint (if made with the same config), log every epoch, checkpoint on time and on
SIGINT/SIGTERM, save the decomposition; and opening a finished run for analysis."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from l3d.config import L3DConfig
from l3d.core.samples import Dataset
from l3d.core.trainer import StepResult, Trainer
from l3d.decomposition import Decomposition, load, run
from l3d.errors import L3DError
from l3d.runs.checkpoint import flatten_state, load_checkpoint, save_checkpoint
from l3d.runs.folder import RunDir
from l3d.runs.sources import build_data, build_model, resolve_custom
from l3d.runs.spec import RunOptions, RunSpec, yaml_error

# How the step bar labels the trained loss (L3DConfig.loss).
LOSS_LABELS = {"paper": "loss (eq. 8)", "pooled_squared": "pooled loss"}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved its last whole-epoch state (`epoch`) and stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.epoch = 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Tracker:
    """Optional wandb / TensorBoard logging, imported only when asked for."""

    def __init__(self, options: RunOptions, run_dir: RunDir, spec: RunSpec) -> None:
        self.kind, self._writer, self._wandb = options.tracking, None, None
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
        self.loss, self.bar, self.shown, self.epochs = config.loss, None, 0.0, config.epochs
        self.label = LOSS_LABELS.get(config.loss, f"loss ({config.loss})")
        if enabled:
            from tqdm.auto import tqdm

            total = Dataset(data, config.batch_size).n_batches()
            self.bar = tqdm(
                total=total, position=1, leave=False, unit="step", desc=self._desc(first_epoch)
            )

    def _desc(self, epoch: int) -> str:
        return f"steps of epoch {epoch + 1}/{self.epochs}"

    def step(self, result: StepResult) -> None:
        if self.bar is None:
            return
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
    epoch."""

    def __init__(self, run_dir: RunDir, spec: RunSpec, tracker: _Tracker) -> None:
        self.run_dir, self.tracker, self.config = run_dir, tracker, spec.resolved()
        self.every, self.epochs = spec.run.checkpoint_seconds, spec.l3d.epochs
        self.snapshot: tuple[dict, dict] | None = None
        self.start = self.last_save = time.time()

    def __call__(self, trainer: Trainer, record: dict) -> None:
        snapshot = flatten_state(trainer.state_dict())
        line = {**record, "time": time.time(), "elapsed": time.time() - self.start}
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
            save_checkpoint(self.run_dir.checkpoint, *self.snapshot, config=self.config)

    def epoch(self, default: int) -> int:
        """The epoch of the last snapshot (`default` before the first)."""
        return default if self.snapshot is None else self.snapshot[1]["epoch"]


def execute(
    run_dir: RunDir, *, progress: bool | None = None, log: Callable[[str], None] = print
) -> Decomposition:
    """Run (or continue) the decomposition of a run folder to the end and save it.

    Continues from the last checkpoint if there is one, and refuses one made with another config
    (model, data and l3d sections). Holds the folder's lock throughout: another process running
    the same folder is an L3DError naming its pid. On SIGINT/SIGTERM the state after the last
    whole epoch is checkpointed and `Interrupted` is raised. `log` gets progress messages.
    """
    spec = run_dir.spec()
    with run_dir.lock():
        tracker = _Tracker(spec.run, run_dir, spec)  # first: a missing wandb fails before work
        try:
            return _execute(run_dir, spec, tracker, progress, log)
        finally:
            tracker.close()


def _execute(
    run_dir: RunDir,
    spec: RunSpec,
    tracker: _Tracker,
    progress: bool | None,
    log: Callable[[str], None],
) -> Decomposition:
    # The checkpoint first: a config edited since is refused before a model is built.
    state = load_checkpoint(run_dir.checkpoint, spec.resolved(), run_dir.config)
    model = build_model(spec.model, run_dir)
    data = build_data(spec.data, spec.model, model)  # with pairs: the counterparts' outputs
    divergence, reference = resolve_custom(spec.l3d)
    done = 0 if state is None else state["epoch"]
    if state is not None:
        log(f"resuming {run_dir.path} from epoch {done} of {spec.l3d.epochs}")
    run_dir.truncate_metrics(done)
    on_epoch = _EpochLog(run_dir, spec, tracker)
    show = spec.run.progress if progress is None else progress
    with _stop_on_signals(), _StepBar(spec.l3d, data, show, done) as step_bar:
        try:
            decomposition = run(
                model,
                data,
                spec.l3d,
                divergence=divergence,
                reference=reference,
                progress=show,
                callback=step_bar.wrap(on_epoch),
                trainer_state=state,
                step_callback=step_bar.step,
            )
        except Interrupted as stop:
            # A second Ctrl-C or SIGTERM must not cut the save short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            on_epoch.save()
            stop.epoch = on_epoch.epoch(done)
            raise
    decomposition.save(run_dir.decomposition)
    return decomposition


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
    data = build_data(spec.data, spec.model, model)  # with pairs: references at W0, as in the run
    divergence, reference = resolve_custom(spec.l3d)
    try:
        decomposition = load(
            run_dir.decomposition, model, divergence=divergence, reference=reference
        )
    except yaml.YAMLError as err:  # a hand-edited decomposition/config.yaml
        raise yaml_error(run_dir.decomposition / "config.yaml", err) from None
    return LoadedRun(run_dir, spec, model, data, decomposition)
