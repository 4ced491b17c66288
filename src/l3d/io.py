"""Files: atomic writes, safetensors and JSON, and the save format of a decomposition.

Nothing is pickled: tensors go to safetensors, everything else to JSON or YAML. Every write goes
to a temporary file beside its target, is flushed to disk and renamed over the target, so a reader
(or a run resumed after a kill) sees the old file or the new one, never half of one.

A saved decomposition is a folder holding config.yaml (the L3DConfig), decomposition.json (format
version, tensor names, shapes, ranks, final evaluation, history) and subnetworks.safetensors (the
V_in and V_out factors as `v_in.*` / `v_out.*`, and `p_active`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair
from l3d.core.subnetworks import Subnetworks
from l3d.errors import L3DError

FORMAT_VERSION = 1
SAVED_FILES = ("config.yaml", "decomposition.json", "subnetworks.safetensors")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run folders are meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1))


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content, or an L3DError naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise L3DError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise L3DError(
            f"{what} {path} is not valid JSON ({err}): restore or re-create it"
        ) from None


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file of CPU copies of `tensors`, written atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata))


def load_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or an L3DError naming the file when it is missing or
    not a valid safetensors file (truncated by a crash, or another format)."""
    path = Path(path)
    if not path.is_file():
        raise L3DError(f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise L3DError(
            f"{what} {path} is not a readable safetensors file ({err}): it may be truncated or "
            "corrupted; restore it, or re-create it"
        ) from None


# The save format of a decomposition ------------------------------------------------------------


@dataclass
class SavedDecomposition:
    """What a decomposition folder holds, read without any model."""

    config: L3DConfig
    meta: dict
    """decomposition.json: names, shapes, ranks, evaluation, history."""
    subnetworks: SubnetworkPair
    p_active: Tensor

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s) for n, s in self.meta["shapes"].items()}


def save_decomposition(
    directory: str | Path,
    config: L3DConfig,
    subnetworks: SubnetworkPair,
    p_active: Tensor,
    evaluation: dict,
    history: list[dict],
) -> Path:
    """Write the three files of a saved decomposition to `directory`, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    v_out = subnetworks.v_out
    save_tensors(
        directory / "subnetworks.safetensors", {**subnetworks.state_dict(), "p_active": p_active}
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "names": v_out.names,
        "shapes": {n: list(s) for n, s in v_out.shapes.items()},
        "ranks": v_out.ranks,
        "evaluation": evaluation,
        "history": history,
    }
    write_json(directory / "decomposition.json", meta)
    write_text(directory / "config.yaml", config.to_yaml())
    return directory


def read_decomposition(directory: str | Path) -> SavedDecomposition:
    """The saved config, metadata, factors and P_act of a decomposition folder."""
    directory = Path(directory)
    files = [directory / f for f in SAVED_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise L3DError(f"{directory} is not a saved decomposition: missing {', '.join(missing)}")
    config = L3DConfig.from_yaml(files[0])
    meta = read_json(files[1], "decomposition metadata")
    if meta.get("format_version") != FORMAT_VERSION:
        raise L3DError(
            f"{directory} has format version {meta.get('format_version')}, "
            f"expected {FORMAT_VERSION}"
        )
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    pair = SubnetworkPair(
        Subnetworks(shapes, config.n_subnetworks, meta["ranks"], config.factorization),
        Subnetworks(shapes, config.n_subnetworks, meta["ranks"], config.factorization),
    )
    tensors = load_tensors(files[2], "subnetwork factors")
    p_active = tensors.pop("p_active")
    pair.load_state_dict(tensors)
    return SavedDecomposition(config, meta, pair, p_active)
