"""The run spec: a run config file's schema (model source, data source, `l3d:` hyperparameters, run
options), `--set` overrides, and the resolution of its relative paths."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from l3d.config import L3DConfig, describe_validation_error
from l3d.errors import L3DError, yaml_error


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
    shuffle_seed: int | None = Field(
        default=None,
        description="A control (`l3d control`): permute the entries of every parameter tensor, "
        "seeded, after loading: the same architecture and weight statistics without the learned "
        "structure (l3d.controls.shuffle_parameters_).",
    )

    @model_validator(mode="after")
    def _one(self) -> ModelSource:
        _exactly_one(self, ("toy", "hf", "python"), "model")
        return self


# A counterpart set: a tensor name in the data file or 'module:function' (returning a tensor, a
# dict, or a list of such), or a mapping from each input key to a tensor name (dict inputs).
Counterpart = str | dict[str, str]


class PairSource(_Frozen):
    """Contrastive pairs (paper Section 4.2, `l3d.pairs.pair_data`): each input's counterpart,
    whose output at W0 is that input's fixed reference (`l3d.reference: counterpart`). Types are
    strict, as in the `l3d:` section: `symmetric: "yes"` or `1` is an error, not true."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    counterparts: Counterpart | list[Counterpart] = Field(
        description="The counterparts, one per input and shaped like the inputs: a tensor name in "
        "the data file, {input key: tensor name} for dict inputs, 'module:function' returning "
        "them, or a list of such (several counterparts per input: each makes its own pairs)."
    )
    symmetric: bool = Field(
        default=False, description="Also decompose each pair the other way round (x' against x)."
    )
    positions: str | None = Field(
        default=None,
        description="Per-token models: a bool (batch, seq) tensor name in the data file, or "
        "'module:function' returning it, marking the positions compared; the others are no "
        "samples.",
    )

    @model_validator(mode="after")
    def _some(self) -> PairSource:
        if isinstance(self.counterparts, list) and not self.counterparts:
            raise ValueError("counterparts is an empty list: name at least one counterpart set")
        return self

    def names(self) -> list[str]:
        """The data file's tensors that belong to the pairs, not to the inputs: those the
        counterparts and positions name, less the inputs' keys in {input key: tensor name}
        counterparts (a counterpart may keep an input, as {a: a, b: b_changed})."""
        sets = self.counterparts if isinstance(self.counterparts, list) else [self.counterparts]
        names = [n for c in sets for n in ([c] if isinstance(c, str) else c.values())]
        if self.positions is not None:
            names.append(self.positions)
        keys = {k for c in sets if isinstance(c, dict) for k in c}
        return [n for n in names if ":" not in n and n not in keys]

    def resolved(self, resolve: Callable[[str], str]) -> PairSource:
        """These pairs with `resolve` applied to every name (relative 'file.py:fn' paths)."""

        def one(c: Counterpart) -> Counterpart:
            return resolve(c) if isinstance(c, str) else {k: resolve(v) for k, v in c.items()}

        counterparts = self.counterparts
        new = (
            [one(c) for c in counterparts] if isinstance(counterparts, list) else one(counterparts)
        )
        positions = None if self.positions is None else resolve(self.positions)
        return self.model_copy(update={"counterparts": new, "positions": positions})


class DataSource(_Frozen):
    """Where the inputs come from: exactly one of `toy`, `file`, `text`, `python`; optionally their
    counterparts (`pairs`)."""

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
    pairs: PairSource | None = Field(
        default=None,
        description="Contrastive pairs: the inputs' counterparts, whose outputs are the "
        "references (needs l3d.reference: counterpart).",
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
    shard_factors: bool = Field(
        default=False,
        description="Under torchrun, shard V_in, V_out and their optimiser state over the "
        "processes by subnetwork (FSDP2): less memory per process, the same result. Does not "
        "enter the checkpoint's config: a run may resume sharded or not, on any number of "
        "processes.",
    )
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

    @model_validator(mode="after")
    def _pairs_and_reference(self) -> RunSpec:
        counterpart = self.l3d.reference == "counterpart"
        if self.data.pairs is not None and not counterpart:
            given = "" if "reference" in self.l3d.model_fields_set else ", the default"
            raise ValueError(
                "data.pairs makes each input's reference its counterpart's output: set "
                f"l3d.reference: counterpart (got '{self.l3d.reference}'{given})"
            )
        if counterpart and self.data.pairs is None:
            raise ValueError(
                "l3d.reference: counterpart needs data.pairs (the inputs' counterparts, e.g. "
                "pairs: {counterparts: NAME}); see docs/cli.md"
            )
        return self

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
            raise L3DError(describe_validation_error(err, cls, _KEY_SECTIONS)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def resolved(self) -> dict[str, Any]:
        """The sections that decide a run's result (model, data, l3d) as plain JSON data: what a
        checkpoint records, so a resume can refuse a config edited since (`run` options such as
        checkpoint_seconds may change). `data.pairs` and `model.shuffle_seed` only when given:
        checkpoints made before they existed keep their hash."""
        resolved = self.model_dump(mode="json", include={"model", "data", "l3d"})
        if resolved["data"]["pairs"] is None:
            del resolved["data"]["pairs"]
        if resolved["model"]["shuffle_seed"] is None:
            del resolved["model"]["shuffle_seed"]
        return resolved


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSource,
    "data": DataSource,
    "l3d": L3DConfig,
    "run": RunOptions,
}
# Where a misspelt key's close matches are looked up (sub-sections too).
_KEY_SECTIONS: dict[str, type[BaseModel]] = {**_SECTIONS, "pairs": PairSource}


def _exactly_one(source: BaseModel, keys: tuple[str, ...], section: str) -> None:
    given = [k for k in keys if getattr(source, k) is not None]
    if len(given) != 1:
        found = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"'{section}' needs exactly one of {', '.join(keys)} ({found})")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set key=value` overrides (values parsed as YAML). A bare L3DConfig field name such
    as `epochs=5` means `l3d.epochs`."""
    data = copy.deepcopy(data)  # YAML may hold dates, sets or bytes: not a JSON round trip
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise L3DError(f"--set takes key=value, e.g. --set l3d.epochs=5; got {item!r}")
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
                raise L3DError(f"--set {key!r}: {part!r} is not a section in the config")
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
        raise yaml_error(path, err) from None
    if not isinstance(data, dict):
        raise L3DError(f"{path} must be a YAML mapping with sections model, data, l3d")
    return data


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> RunSpec:
    """Read a run config, apply overrides, and make its relative paths absolute (relative to the
    config file), so the resolved spec in the run folder works from anywhere."""
    path = Path(path)
    spec = RunSpec.create(apply_overrides(read_yaml(path), list(overrides)))
    base = path.resolve().parent
    model = spec.model.model_copy(
        update={
            "python": _absolute(spec.model.python, base),
            "hf": _absolute_folder(spec.model.hf, base),
        }
    )
    options = dict(spec.data.options)
    if isinstance(options.get("tokenizer"), str):
        options["tokenizer"] = _absolute_folder(options["tokenizer"], base)
    data = spec.data.model_copy(
        update={
            "options": options,
            "python": _absolute(spec.data.python, base),
            "labels": _absolute(spec.data.labels, base),
            "file": _absolute_file(spec.data.file, base),
            "text": _absolute_file(spec.data.text, base),
            "pairs": None
            if spec.data.pairs is None
            else spec.data.pairs.resolved(lambda name: _absolute(name, base) or name),
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


def _absolute_folder(value: str | None, base: Path) -> str | None:
    """A model or tokenizer folder relative to the config's folder becomes absolute: one that
    exists there, or a path written as one ('./m', '../m', '~/m'). Other names are hub names."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if (base / path).is_dir() or value.startswith(("./", "../", "~")):
        return str((base / path).resolve())
    return value


def _absolute(target: str | None, base: Path) -> str | None:
    """'file.py:fn' relative to the config's folder becomes absolute; module paths stay."""
    if target is None or ":" not in target:
        return target
    module, _, fn = target.rpartition(":")
    if module.endswith(".py") and not Path(module).is_absolute():
        return f"{base / module}:{fn}"
    return target
