"""Checkpoints: a Trainer.state_dict() flattened into safetensors (factors, AdamW moments, the RNG
state) and JSON (epoch, step, history, optimizer settings), written atomically.

A checkpoint holds the trainer at an epoch boundary, so a resumed run with the same seed ends with
the same factors as an uninterrupted one. It also records the resolved config it was made with
(`config`, and its sha256 `config_hash`), so a resume refuses a config edited since, and the number
of processes that made it (`world_size`): the state is that of every rank, so a run resumes with
any number. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch import Tensor

from l3d.errors import L3DError
from l3d.io import load_tensors, read_json, save_tensors, write_json

CHECKPOINT_VERSION = 1


class _Index(BaseModel):
    """What state.json must hold (a hand edit is checked here, not met as a TypeError later)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: StrictInt
    epoch: StrictInt = Field(ge=0)
    step: StrictInt = Field(ge=0)
    history: list[dict[str, Any]]
    optimizer_state: dict[StrictStr, dict[str, Any]]
    param_groups: list[dict[str, Any]] = Field(min_length=1)
    tensors: StrictStr = Field(pattern=r"^state-\d+\.safetensors$")
    config_hash: StrictStr | None = None
    config: dict[str, Any] | None = None
    world_size: StrictInt | None = Field(default=None, ge=1)


def config_hash(config: dict) -> str:
    """The sha256 of a resolved config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every leaf that differs between two resolved configs."""
    before, after = _leaves(old), _leaves(new)
    missing = "(absent)"
    return [
        f"{key}: {_show(before.get(key, missing))} -> {_show(after.get(key, missing))}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, missing) != after.get(key, missing)
    ]


def setting_changes(recorded: dict, now: dict) -> list[str]:
    """`config_changes` of a finished run's config against the one its checkpoint recorded,
    less the model and data sections' text (paths and names, which change when a project moves:
    the data's identity is checked by its fingerprint, data.json, and the weights' by theirs)."""
    before, after = _leaves(recorded), _leaves(now)

    def moved(key: str) -> bool:
        texts = all(isinstance(v, str | None) for v in (before.get(key), after.get(key)))
        return key.split(".")[0] in ("model", "data") and texts

    changed = {k for k in before.keys() | after.keys() if not moved(k)}
    return config_changes(
        {k: v for k, v in before.items() if k in changed},
        {k: v for k, v in after.items() if k in changed},
    )


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def flatten_state(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split a Trainer.state_dict() into CPU tensor copies and a JSON-able remainder."""
    tensors = {f"pair/{k}": v.detach().cpu().clone() for k, v in state["pair"].items()}
    optimizer_state: dict[str, dict[str, Any]] = {}  # non-tensor slots (AdamW's step)
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


def save_checkpoint(
    directory: Path,
    tensors: dict[str, Tensor],
    meta: dict,
    config: dict | None = None,
    world_size: int = 1,
) -> None:
    """Tensors first, then state.json naming them: state.json is the commit point, so a kill at
    any moment leaves the previous complete checkpoint in force. `config`: the run's resolved
    config (RunSpec.resolved()), recorded with its hash; `world_size`: the run's processes."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta['epoch']:06d}.safetensors"
    save_tensors(directory / name, tensors)
    if config is not None:
        meta = {**meta, "config_hash": config_hash(config), "config": config}
    write_json(directory / "state.json", {**meta, "tensors": name, "world_size": world_size})
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(
    directory: Path, config: dict | None = None, config_file: Path | None = None
) -> dict | None:
    """The last complete checkpoint as a Trainer state dict, or None if there is none.

    config: the resolved config the run is resumed with; one that differs from the checkpoint's
    is an L3DError listing the changed keys (`config_file` names the file to restore).
    """
    index = directory / "state.json"
    if not index.is_file():
        return None
    meta = read_json(index, "checkpoint index")
    if not isinstance(meta, dict):
        raise L3DError(f"checkpoint index {index} must be a JSON object; {_FIX.format(directory)}")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise L3DError(
            f"{index} has checkpoint version {meta.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    try:
        checked = _Index.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise L3DError(
            f"checkpoint index {index}: key '{key}': {first['msg']}; {_FIX.format(directory)}"
        ) from None
    if len(checked.history) != checked.epoch:
        raise L3DError(
            f"checkpoint index {index}: history has {len(checked.history)} records for epoch "
            f"{checked.epoch}; {_FIX.format(directory)}"
        )
    _check_optimizer(checked, index, directory)
    if config is not None and checked.config_hash not in (None, config_hash(config)):
        changes = config_changes(checked.config or {}, config) or ["(the recorded config)"]
        where = config_file or index
        raise L3DError(
            f"{where} changed since the checkpoint at epoch {checked.epoch} "
            f"({'; '.join(changes)}): restore it to resume, or start over with "
            f"`l3d decompose CONFIG --out {directory.parent} --overwrite`"
        )
    tensors = load_tensors(directory / checked.tensors, "checkpoint")
    try:
        return unflatten_state(tensors, meta)
    except (KeyError, ValueError) as err:
        raise L3DError(
            f"checkpoint index {index} does not match {checked.tensors} ({err!r}); "
            f"{_FIX.format(directory)}"
        ) from None


_FIX = "it was edited or damaged: restore it, or delete {} to start the run over"


def _check_optimizer(index: _Index, path: Path, directory: Path) -> None:
    """AdamW's settings as Trainer.state_dict() writes them: numbers, flags, parameter indices."""
    for key in index.optimizer_state:
        if not key.isdigit():
            raise L3DError(
                f"checkpoint index {path}: optimizer_state key '{key}' is not a parameter index; "
                f"{_FIX.format(directory)}"
            )
    for i, group in enumerate(index.param_groups):
        for key, value in group.items():
            numbers = value if isinstance(value, list) else [value]
            if key == "params":
                ok = all(type(v) is int for v in numbers)
            elif key in ("lr", "eps", "weight_decay", "initial_lr"):
                ok = type(value) in (int, float)
            else:
                ok = all(v is None or isinstance(v, (bool, int, float)) for v in numbers)
            if not ok:
                raise L3DError(
                    f"checkpoint index {path}: param_groups[{i}].{key} is {value!r}, not a "
                    f"number; {_FIX.format(directory)}"
                )
