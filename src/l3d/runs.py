"""Runs driven by config files: the run spec (model source, data source, `l3d:` hyperparameters),
the run folder, its metrics log and atomic safetensors checkpoints, and resuming after a stop.

A run folder holds:
  config.yaml        the resolved run spec (overrides applied, paths absolute)
  model.safetensors  a toy's trained weights, with model.json (other models are rebuilt)
  metrics.jsonl      one JSON line per epoch: step, both losses, lr, live subnetworks, time
  checkpoint/        state.json + state-EPOCH.safetensors: the trainer after a whole epoch
  decomposition/     the final Decomposition.save
  analysis/, interventions/, report/   written by `l3d analyze`, `l3d intervene`, `l3d report`

Checkpoints hold the trainer at an epoch boundary (factors, AdamW state, RNG state, history), so a
resumed run with the same seed ends with the same factors as an uninterrupted one. Nothing is
pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from l3d.config import L3DConfig, describe_validation_error
from l3d.core.divergences import DivergenceFn, ReferenceFn, is_custom
from l3d.core.trainer import StepResult, Trainer
from l3d.decomposition import Decomposition, load, run
from l3d.errors import L3DError
from l3d.io import atomic_write, load_tensors

CHECKPOINT_VERSION = 1


# Run spec ------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSource(_Frozen):
    """Where the model comes from: exactly one of `toy`, `hf`, `python`."""

    toy: str | None = Field(
        default=None,
        description="A trained toy of the paper by experiment name (tms, tms40, tmcs, "
        "higher_rank, squares, resid_mlp); options: seed.",
    )
    hf: str | None = Field(
        default=None, description="A HuggingFace causal LM name or local path (via l3d.hf)."
    )
    python: str | None = Field(
        default=None,
        description="'package.module:function' or 'path/to/file.py:function' returning the model.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the toy, loader or function."
    )

    @model_validator(mode="after")
    def _one(self) -> ModelSource:
        _exactly_one(self, ("toy", "hf", "python"), "model")
        return self


class DataSource(_Frozen):
    """Where the inputs come from: exactly one of `toy`, `file`, `text`, `python`."""

    toy: str | None = Field(
        default=None,
        description="Inputs of a toy experiment by name, e.g. 'tms'; options: n_samples, seed.",
    )
    file: str | None = Field(
        default=None,
        description="A .safetensors file: its tensor `key` (options), or all tensors as a dict.",
    )
    text: str | None = Field(
        default=None,
        description="A UTF-8 text file of documents (one per line unless options.separator), "
        "tokenized by the hf model's tokenizer.",
    )
    python: str | None = Field(
        default=None, description="'module:function' returning a tensor, dict or batches."
    )
    options: dict[str, Any] = Field(default_factory=dict)
    labels: str | None = Field(
        default=None,
        description="One label per input, for the analysis's top-sample purity: a tensor name in "
        "the data file, or 'module:function' returning them.",
    )
    class_names: list[str] | None = Field(
        default=None, description="Names of integer labels and of the model's output classes."
    )

    @model_validator(mode="after")
    def _one(self) -> DataSource:
        _exactly_one(self, ("toy", "file", "text", "python"), "data")
        return self


class RunOptions(_Frozen):
    checkpoint_seconds: float = Field(
        default=60,
        ge=0,
        description="Write a checkpoint after an epoch once this many seconds have passed since "
        "the last one (0: after every epoch); always at the end and on Ctrl-C/SIGTERM.",
    )
    progress: bool = Field(default=True, description="Show a progress bar (--quiet turns it off).")
    tracking: Literal["none", "wandb", "tensorboard"] = Field(
        default="none", description="Also log metrics to Weights & Biases or TensorBoard."
    )
    project: str = Field(default="l3d", description="wandb project name.")


class RunSpec(_Frozen):
    """A whole run: what to decompose, on which data, with which hyperparameters."""

    model: ModelSource
    data: DataSource
    l3d: L3DConfig
    run: RunOptions = Field(default_factory=RunOptions)

    @classmethod
    def create(cls, data: object) -> RunSpec:
        if not isinstance(data, dict):
            raise L3DError(
                f"a run config is a YAML mapping with sections model, data, l3d (and run); "
                f"got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise L3DError(describe_validation_error(err, cls, _SECTIONS)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSource,
    "data": DataSource,
    "l3d": L3DConfig,
    "run": RunOptions,
}


def _exactly_one(source: BaseModel, keys: tuple[str, ...], section: str) -> None:
    given = [k for k in keys if getattr(source, k) is not None]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"'{section}' needs exactly one of {', '.join(keys)} ({found})")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set key=value` overrides (values parsed as YAML). A bare L3DConfig field name such
    as `epochs=5` means `l3d.epochs`."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise L3DError(f"--set takes key=value, e.g. --set l3d.epochs=5; got '{item}'")
        path = key.split(".")
        if path[0] not in _SECTIONS and path[0] in L3DConfig.model_fields:
            path = ["l3d", *path]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise L3DError(f"--set {key}: '{part}' is not a section in the config")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise L3DError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise L3DError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise L3DError(f"{path} must be a YAML mapping with sections model, data, l3d")
    return data


def load_spec(path: str | Path, overrides: list[str] = ()) -> RunSpec:
    """Read a run config, apply overrides, and make its relative paths absolute (relative to the
    config file), so the resolved spec in the run folder works from anywhere."""
    path = Path(path)
    spec = RunSpec.create(apply_overrides(read_yaml(path), list(overrides)))
    base = path.resolve().parent
    model = spec.model.model_copy(update={"python": _absolute(spec.model.python, base)})
    data = spec.data.model_copy(
        update={
            "python": _absolute(spec.data.python, base),
            "labels": _absolute(spec.data.labels, base),
            "file": _absolute_file(spec.data.file, base),
            "text": _absolute_file(spec.data.text, base),
        }
    )
    return spec.model_copy(update={"model": model, "data": data})


def _absolute_file(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise L3DError(f"data file '{value}' does not exist (looked for {path})")
    return str(path)


def _absolute(target: str | None, base: Path) -> str | None:
    """'file.py:fn' relative to the config's folder becomes absolute; module paths stay."""
    if target is None or ":" not in target:
        return target
    module, _, fn = target.rpartition(":")
    if module.endswith(".py") and not Path(module).is_absolute():
        return f"{base / module}:{fn}"
    return target


# Sources -------------------------------------------------------------------------------------


def import_object(target: str, what: str) -> Callable:
    """The function named by 'package.module:name' or 'path/to/file.py:name'."""
    module_name, sep, name = target.rpartition(":")
    if not sep or not module_name or not name:
        raise L3DError(
            f"{what} '{target}' must look like 'package.module:function' or 'file.py:function'"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise L3DError(f"{what} '{target}': file {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise L3DError(f"{what} '{target}': cannot import {module_name} ({err})") from None
    if not hasattr(module, name):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise L3DError(f"{what} '{target}': {module_name} has no '{name}'{hint}")
    return getattr(module, name)


def _call(fn: Callable, options: dict, what: str) -> Any:
    try:
        return fn(**options)
    except TypeError as err:
        if "argument" in str(err):
            raise L3DError(f"{what}: bad options {options}: {err}") from None
        raise


def _experiment_spec(name: str) -> Any:
    """A toy of the paper's experiment registry (l3d.experiments): tms, tms40, tmcs, ..."""
    try:
        from l3d.experiments.registry import get_spec
    except ImportError as err:
        raise L3DError(f"toy sources need l3d.experiments, which failed to import: {err}") from None
    return get_spec(name)


def _options(options: dict, allowed: dict, what: str) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise L3DError(f"{what}: unknown options {unknown}; valid: {', '.join(allowed)}")
    return {**allowed, **options}


def _hf():
    try:
        return importlib.import_module("l3d.hf")
    except ImportError as err:
        raise L3DError(
            f"hf sources need l3d.hf and transformers ({err}): pip install 'l3d[hf]'"
        ) from None


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of an hf model source (for text data and for showing tokens in analyses)."""
    return _hf().load_tokenizer(name_or_path)


def build_model(source: ModelSource, run_dir: RunDir | None = None) -> nn.Module:
    """The model of a run. A toy is trained by the experiment registry (cached there) and its
    weights are kept in the run folder, so resuming or analysing a run never retrains it."""
    if source.toy is not None:
        spec = _experiment_spec(source.toy)
        options = _options(source.options, {"seed": 0}, f"toy model '{source.toy}'")
        if run_dir is not None and run_dir.model_weights.is_file():
            init_seed = json.loads(run_dir.model_info.read_text())["init_seed"]
            model = spec.make(init_seed)[0]
            model.load_state_dict(load_tensors(run_dir.model_weights, "toy model weights"))
            return model.eval()
        from l3d.experiments.registry import train_toy_model

        toy = train_toy_model(spec, options["seed"])
        if run_dir is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in toy.model.state_dict().items()}
            atomic_write(run_dir.model_weights, lambda p: save_file(state, str(p)))
            info = {"toy": source.toy, "init_seed": toy.info["init_seed"]}
            atomic_write(run_dir.model_info, lambda p: p.write_text(json.dumps(info)))
        return toy.model
    if source.hf is not None:
        return _call(
            lambda **o: _hf().load_causal_lm(source.hf, **o), source.options, f"hf '{source.hf}'"
        )
    model = _call(import_object(source.python, "model"), source.options, source.python)
    if not isinstance(model, nn.Module):
        raise L3DError(
            f"model '{source.python}' returned {type(model).__name__}, not a torch module"
        )
    return model


def build_data(source: DataSource, model_source: ModelSource) -> Any:
    """The inputs of a run: a tensor, a dict of tensors, or a re-iterable of batches."""
    if source.toy is not None:
        spec = _experiment_spec(source.toy)
        options = _options(
            source.options, {"n_samples": 1000, "seed": 1}, f"toy data '{source.toy}'"
        )
        return spec.sample(options["n_samples"], torch.Generator().manual_seed(options["seed"]))
    if source.file is not None:
        tensors = load_tensors(source.file, "data file")
        key = source.options.get("key")
        if key is None:
            return tensors if len(tensors) > 1 else next(iter(tensors.values()))
        if key not in tensors:
            raise L3DError(f"{source.file} has no tensor '{key}'; it has {', '.join(tensors)}")
        return tensors[key]
    if source.text is not None:
        if model_source.hf is None:
            raise L3DError("data 'text' is tokenized by the model's tokenizer: use an hf model")
        options = dict(source.options)
        tokenizer = load_tokenizer(options.pop("tokenizer", model_source.hf))
        return _call(
            lambda **o: _hf().token_dataset(source.text, tokenizer, **o), options, "data 'text'"
        )
    return _call(import_object(source.python, "data"), source.options, source.python)


def build_labels(source: DataSource) -> Any:
    """The labels named by the data source, or None."""
    if source.labels is None:
        return None
    if source.file is not None and ":" not in source.labels:
        tensors = load_tensors(source.file, "data file")
        if source.labels not in tensors:
            raise L3DError(
                f"{source.file} has no labels tensor '{source.labels}'; it has {', '.join(tensors)}"
            )
        return tensors[source.labels].tolist()
    return import_object(source.labels, "labels")()


def resolve_custom(config: L3DConfig) -> tuple[DivergenceFn | None, ReferenceFn | None]:
    """'custom:module:function' divergences and references, imported from the config."""
    out = []
    for name in (config.divergence, config.reference):
        if is_custom(name):
            out.append(import_object(name.split(":", 1)[1], "custom function"))
        else:
            out.append(None)
    return out[0], out[1]


def as_inputs(data: Any) -> Any:
    """The run's data as one tensor or dict of tensors (batches concatenated), for analysis."""
    if isinstance(data, (Tensor, dict)):
        return data
    from l3d.core.samples import _as_inputs

    batches = [_as_inputs(b) for b in data]
    if isinstance(batches[0], Tensor):
        return torch.cat(batches)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# Run folder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def decomposition(self) -> Path:
        return self.path / "decomposition"

    @property
    def model_weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def model_info(self) -> Path:
        return self.path / "model.json"

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    @property
    def interventions(self) -> Path:
        return self.path / "interventions"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def finished(self) -> bool:
        return (self.decomposition / "decomposition.json").is_file()

    def spec(self) -> RunSpec:
        if not self.config.is_file():
            raise L3DError(f"'{self.path}' is not a run folder: it has no config.yaml")
        return RunSpec.create(read_yaml(self.config))

    def metrics_records(self) -> list[dict]:
        """The metric lines; a last line cut short by a kill mid-write is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise L3DError(f"{self.metrics} line {i + 1} is not JSON") from None
        return records


# Checkpoints: Trainer.state_dict() flattened into tensors + JSON ------------------------------


def flatten_state(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a Trainer.state_dict() into CPU tensor copies and a JSON-able remainder."""
    tensors = {f"pair/{k}": v.detach().cpu().clone() for k, v in state["pair"].items()}
    optimizer_state = {}
    for index, slots in state["optimizer"]["state"].items():
        optimizer_state[str(index)] = {}
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{slot}"] = value.detach().cpu().clone()
            else:
                optimizer_state[str(index)][slot] = value
    tensors["generator"] = state["generator"].clone()
    meta = {
        "version": CHECKPOINT_VERSION,
        "epoch": state["epoch"],
        "step": state["step"],
        "history": state["history"],
        "optimizer_state": optimizer_state,
        "param_groups": state["optimizer"]["param_groups"],
    }
    return tensors, json.loads(json.dumps(meta))


def unflatten_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of flatten_state: a dict Trainer.load_state_dict accepts."""
    pair = {k.removeprefix("pair/"): v for k, v in tensors.items() if k.startswith("pair/")}
    slots: dict[int, dict] = {int(i): dict(v) for i, v in meta["optimizer_state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, slot = key.split("/", 2)
            slots.setdefault(int(index), {})[slot] = value
    # JSON turns tuples (AdamW's betas) into lists; torch's optimizers expect the tuples back.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {
        "pair": pair,
        "optimizer": {"state": slots, "param_groups": groups},
        "generator": tensors["generator"],
        "epoch": meta["epoch"],
        "step": meta["step"],
        "history": meta["history"],
    }


def save_checkpoint(directory: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Tensors first, then state.json naming them: state.json is the commit point, so a kill at
    any moment leaves the previous complete checkpoint in force."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta['epoch']:06d}.safetensors"
    atomic_write(directory / name, lambda p: save_file(tensors, str(p)))
    meta = {**meta, "tensors": name}
    atomic_write(directory / "state.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(directory: Path) -> dict | None:
    """The last complete checkpoint as a Trainer state dict, or None if there is none."""
    index = directory / "state.json"
    if not index.is_file():
        return None
    meta = json.loads(index.read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise L3DError(f"{index} has checkpoint version {meta.get('version')}, expected 1")
    return unflatten_state(load_tensors(directory / meta["tensors"], "checkpoint"), meta)


# Running -------------------------------------------------------------------------------------


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
            self._writer = SummaryWriter(str(run_dir.path / "tensorboard"))

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
    """A second progress bar over the steps of the current epoch, with its ETA and the latest loss,
    for runs whose epochs are long (a language model: hundreds of steps per epoch)."""

    def __init__(self, config: L3DConfig, data: Any, enabled: bool) -> None:
        from l3d.core.samples import Dataset

        self.loss, self.bar, self.shown = config.loss, None, 0.0
        if enabled:
            from tqdm.auto import tqdm

            total = Dataset(data, config.batch_size).n_batches()
            self.bar = tqdm(total=total, position=1, leave=False, unit="step", desc="epoch")

    def step(self, result: StepResult) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if time.time() - self.shown > 0.5:  # reading the loss synchronises an accelerator
            self.bar.set_postfix(loss=f"{getattr(result.losses, self.loss).item():.4f}")
            self.shown = time.time()

    def wrap(self, on_epoch: Callable[[Trainer, dict], None]) -> Callable[[Trainer, dict], None]:
        def callback(trainer: Trainer, record: dict) -> None:
            on_epoch(trainer, record)
            if self.bar is not None:
                self.bar.reset()

        return callback

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def create_run(spec: RunSpec, path: str | Path, *, overwrite: bool = False) -> RunDir:
    """A fresh run folder holding the resolved spec."""
    run_dir = RunDir(Path(path))
    # A run that failed before its first epoch (bad data options, a missing file) saved no work:
    # starting over lets the user fix the config and re-run the same command.
    started = (
        (run_dir.metrics.is_file() and run_dir.metrics.stat().st_size > 0)
        or run_dir.checkpoint.exists()
        or run_dir.decomposition.exists()
    )
    overwrite = overwrite or (run_dir.config.exists() and not started)
    if run_dir.config.exists() and not overwrite:
        raise L3DError(
            f"'{run_dir.path}' already holds a run: continue it with "
            f"`l3d decompose --resume {run_dir.path}`, or pass --overwrite to start over"
        )
    if overwrite:
        for file in (run_dir.config, run_dir.metrics, run_dir.model_weights, run_dir.model_info):
            file.unlink(missing_ok=True)
        for folder in (
            run_dir.checkpoint,
            run_dir.decomposition,
            run_dir.analysis,
            run_dir.interventions,
            run_dir.report,
            run_dir.path / "tensorboard",
        ):
            shutil.rmtree(folder, ignore_errors=True)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir.config, lambda p: p.write_text(spec.to_yaml()))
    return run_dir


def execute(
    run_dir: RunDir, *, progress: bool | None = None, log: Callable[[str], None] = print
) -> Decomposition:
    """Run (or continue) the decomposition of a run folder to the end and save it.

    Continues from the last checkpoint if there is one. On SIGINT/SIGTERM the state after the last
    whole epoch is checkpointed and `Interrupted` is raised. `log` gets progress messages.
    """
    spec = run_dir.spec()
    tracker = _Tracker(spec.run, run_dir, spec)  # first: a missing wandb fails before any work
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
    model = build_model(spec.model, run_dir)
    data = build_data(spec.data, spec.model)
    divergence, reference = resolve_custom(spec.l3d)
    state = load_checkpoint(run_dir.checkpoint)
    done = 0 if state is None else state["epoch"]
    if state is not None:
        log(f"resuming {run_dir.path} from epoch {done} of {spec.l3d.epochs}")
    _truncate_metrics(run_dir, done)
    snapshot: list[tuple[dict, dict]] = []  # the state after the last whole epoch
    start = last_save = time.time()

    def on_epoch(trainer: Trainer, record: dict) -> None:
        nonlocal last_save
        snapshot[:] = [flatten_state(trainer.state_dict())]
        line = {**record, "time": time.time(), "elapsed": time.time() - start}
        with run_dir.metrics.open("a") as f:
            f.write(json.dumps(line) + "\n")
        tracker.log(line)
        now = time.time()
        if now - last_save >= spec.run.checkpoint_seconds or trainer.epoch == spec.l3d.epochs:
            save_checkpoint(run_dir.checkpoint, *snapshot[0])
            last_save = now

    show = spec.run.progress if progress is None else progress
    with _stop_on_signals(), _StepBar(spec.l3d, data, show) as step_bar:
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
            if snapshot:
                save_checkpoint(run_dir.checkpoint, *snapshot[0])
            stop.epoch = snapshot[0][1]["epoch"] if snapshot else done
            raise
    decomposition.save(run_dir.decomposition)
    return decomposition


def _truncate_metrics(run_dir: RunDir, epochs_done: int) -> None:
    """Drop metric lines of epochs after the checkpoint: they are run again on resume."""
    records = [r for r in run_dir.metrics_records() if r["epoch"] < epochs_done]
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(run_dir.metrics, lambda p: p.write_text(text))


@dataclass
class LoadedRun:
    """A finished run, ready for analysis, interventions and reports."""

    run_dir: RunDir
    spec: RunSpec
    model: nn.Module
    data: Any
    decomposition: Decomposition


def open_run(path: str | Path) -> LoadedRun:
    run_dir = RunDir(Path(path))
    if not run_dir.path.is_dir():
        raise L3DError(f"run folder '{path}' does not exist")
    spec = run_dir.spec()
    if not run_dir.finished:
        raise L3DError(
            f"'{path}' has no finished decomposition yet: run `l3d decompose --resume {path}`"
        )
    model = build_model(spec.model, run_dir)
    divergence, reference = resolve_custom(spec.l3d)
    decomposition = load(run_dir.decomposition, model, divergence=divergence, reference=reference)
    return LoadedRun(run_dir, spec, model, build_data(spec.data, spec.model), decomposition)
