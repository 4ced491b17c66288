"""Checkpoints: a Trainer.state_dict() flattened into safetensors (factors, AdamW moments, the RNG
state) and JSON (epoch, step, history, optimizer settings), written atomically.

A checkpoint holds the trainer at an epoch boundary, so a resumed run with the same seed ends with
the same factors as an uninterrupted one. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from l3d.errors import L3DError
from l3d.io import load_tensors, save_tensors, write_json

CHECKPOINT_VERSION = 1


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


def save_checkpoint(directory: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Tensors first, then state.json naming them: state.json is the commit point, so a kill at
    any moment leaves the previous complete checkpoint in force."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta['epoch']:06d}.safetensors"
    save_tensors(directory / name, tensors)
    write_json(directory / "state.json", {**meta, "tensors": name})
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
        raise L3DError(
            f"{index} has checkpoint version {meta.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    return unflatten_state(load_tensors(directory / meta["tensors"], "checkpoint"), meta)
