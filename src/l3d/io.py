"""Files: atomic writes, safetensors and JSON, and the save format of a decomposition.

Nothing is pickled: tensors go to safetensors, everything else to JSON or YAML. Every write goes
to a temporary file beside its target, is flushed to disk and renamed over the target, so a reader
(or a run resumed after a kill) sees the old file or the new one, never half of one.

A saved decomposition is a folder holding config.yaml (the L3DConfig), decomposition.json (format
version, tensor names, shapes, ranks, a fingerprint of the decomposed weights W0, final
evaluation, history) and subnetworks.safetensors (the V_in and V_out factors as `v_in.*` /
`v_out.*`, and `p_active`). Reading one checks every file against the others, so a hand edit or a
truncated file is one L3DError naming the file, never a traceback from deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair
from l3d.core.samples import check_finite
from l3d.core.subnetworks import Subnetworks
from l3d.errors import L3DError

Schema = TypeVar("Schema", bound=BaseModel)

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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks; remembered for the process while the
    file keeps its size, inode and modification time (a command that opens a run several times
    reads a multi-GB data file once). Like git's racy-clean rule, a file modified within the
    last RECENT_NS is read each time: a rewrite inside the clock's granularity keeps its mtime."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    started = time.time_ns()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if started - stat.st_mtime_ns > RECENT_NS:
        _HASHES[key] = digest.hexdigest()
    return digest.hexdigest()


RECENT_NS = 2_000_000_000
_HASHES: dict[tuple[str, int, int, int], str] = {}


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


def validated(data: Any, schema: type[Schema], path: Path, fix: str) -> Schema:
    """`data` read from the JSON file `path`, checked by a pydantic schema: an edited or foreign
    file fails in one line naming the file, the field and `fix`, not deep inside its reader."""
    if not isinstance(data, dict):
        raise L3DError(f"{path}: expected a JSON object, got {type(data).__name__}: {fix}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise L3DError(f"{path}: '{field}': {first['msg'].lower()}: {fix}") from None


def save_tensors(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file of CPU copies of `tensors`, written atomically."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata))


def names_metadata(names: list[str]) -> dict[str, str]:
    """safetensors metadata recording the order of the tensors whose parts a file stores by
    position (factors, adapter directions), for `check_names_order`."""
    return {"names": json.dumps(names)}


def check_names_order(tensor_file: Path, description: Path, names: list[str], fix: str) -> None:
    """Refuse a description whose 'names' list is in another order than the tensor file stores
    their parts in: same-shaped tensors would swap silently. Files saved before the order was
    recorded pass. The file must be readable (`load_tensors` has read it)."""
    with safe_open(str(tensor_file), "pt") as f:
        saved = (f.metadata() or {}).get("names")
    if saved is not None and saved != json.dumps(names):
        raise L3DError(
            f"{description} lists names {names}, but {tensor_file} holds their tensors in the "
            f"order {saved}: restore the files or {fix}"
        )


def load_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or an L3DError naming the file when it is missing or
    not a valid safetensors file (truncated by a crash, or another format); a folder or a device
    in its place is named as such, not as missing."""
    path = Path(path)
    if path.is_dir():
        raise L3DError(f"{what} '{path}' is a folder, not a file: give a safetensors file")
    if path.exists() and not path.is_file():
        raise L3DError(
            f"{what} '{path}' is not a regular file (a device, pipe or socket): give a "
            "safetensors file"
        )
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


def fingerprint(tensors: dict[str, Tensor]) -> dict[str, dict[str, float | str]]:
    """Per tensor: the float64 sum and sum of squares and the sha256 of the bytes of its float32
    CPU copy. Cheap, and exact: any changed entry changes the hash (the sums say how much)."""
    result: dict[str, dict[str, float | str]] = {}
    for name, t in tensors.items():
        w = t.detach().to("cpu", torch.float32).contiguous()
        w64 = w.double()
        result[name] = {
            "sum": float(w64.sum()),
            "sum_sq": float(w64.pow(2).sum()),
            "sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
        }
    return result


def changed_since(saved: dict[str, dict], tensors: dict[str, Tensor]) -> list[str]:
    """The tensors whose values differ from their saved `fingerprint` (or have none). The hash
    decides: the sums of a reduction may differ in the last bit across thread counts."""
    now = fingerprint(tensors)
    return [n for n in tensors if (saved.get(n) or {}).get("sha256") != now[n]["sha256"]]


def frozen_fingerprint(model: nn.Module, decomposed: Iterable[str]) -> dict[str, str]:
    """The sha256 of every other parameter and every saved buffer of the model (dtype, shape
    and bytes): the decomposition is of the whole function, so BatchNorm statistics or a head
    that differ make its coefficients and interventions another model's. Buffers left out of
    the state dict (rotary frequencies, causal masks) are derived at construction, and may
    differ in the last bit between devices."""
    skip = set(decomposed)
    saved = set(model.state_dict())
    buffers = [(n, b) for n, b in model.named_buffers() if n in saved]
    tensors = [*model.named_parameters(), *buffers]
    result = {}
    for name, t in tensors:
        if name in skip:
            continue
        data = t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        digest = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode() + data)
        result[name] = digest.hexdigest()
    return result


@dataclass
class SavedDecomposition:
    """What a decomposition folder holds, read without any model."""

    config: L3DConfig
    meta: dict
    """decomposition.json: names, shapes, ranks, W0 fingerprint, evaluation, history."""
    subnetworks: SubnetworkPair
    p_active: Tensor

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s) for n, s in self.meta["shapes"].items()}

    @property
    def fingerprint(self) -> dict[str, dict] | None:
        """The fingerprint of W0 when saved (None in files written before fingerprints)."""
        return self.meta.get("w0_fingerprint")

    @property
    def frozen_fingerprint(self) -> dict[str, str] | None:
        """`frozen_fingerprint` of the model when saved (None in files written before it)."""
        return self.meta.get("frozen_fingerprint")


def save_decomposition(
    directory: str | Path,
    config: L3DConfig,
    subnetworks: SubnetworkPair,
    p_active: Tensor,
    evaluation: dict,
    history: list[dict],
    w0_fingerprint: dict[str, dict] | None = None,
    frozen: dict[str, str] | None = None,
) -> Path:
    """Write the three files of a saved decomposition to `directory`, each atomically; a target
    that is a file or not writable is an L3DError naming it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise L3DError(
            f"cannot save the decomposition to {directory}: it is a file, not a folder; "
            "choose a new or existing folder"
        )
    v_out = subnetworks.v_out
    meta = {
        "format_version": FORMAT_VERSION,
        "names": v_out.names,
        "shapes": {n: list(s) for n, s in v_out.shapes.items()},
        "ranks": v_out.ranks,
        "w0_fingerprint": w0_fingerprint,
        "evaluation": evaluation,
        "history": history,
    }
    if w0_fingerprint is None:
        del meta["w0_fingerprint"]
    if frozen is not None:
        meta["frozen_fingerprint"] = frozen
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors(
            directory / "subnetworks.safetensors",
            {**subnetworks.state_dict(), "p_active": p_active},
            metadata=names_metadata(v_out.names),
        )
        write_json(directory / "decomposition.json", meta)
        write_text(directory / "config.yaml", config.to_yaml())
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        raise L3DError(
            f"cannot save the decomposition to {directory}: {reason}{where}; choose a writable "
            "folder"
        ) from None
    return directory


def read_decomposition(directory: str | Path) -> SavedDecomposition:
    """The saved config, metadata, factors and P_act of a decomposition folder, each file checked
    against the others."""
    directory = Path(directory)
    if not directory.is_dir():
        raise L3DError(f"saved decomposition {directory} does not exist (or is not a folder)")
    files = [directory / f for f in SAVED_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        inner = directory / "decomposition"
        if (inner / "decomposition.json").is_file() or (directory / "metrics.jsonl").is_file():
            raise L3DError(
                f"{directory} is not a saved decomposition: this is a run folder: load {inner} "
                f"(or use l3d.runs.open_run('{directory}'), which also rebuilds model and data)"
            )
        raise L3DError(f"{directory} is not a saved decomposition: missing {', '.join(missing)}")
    config = read_saved_config(files[0])
    meta = _read_meta(files[1])
    # In the order of 'names' (a list): the factors are stored by position, and tools that
    # rewrite JSON may sort the keys of 'shapes'.
    shapes = {n: tuple(meta["shapes"][n]) for n in meta["names"]}
    tensors = load_tensors(files[2], "subnetwork factors")
    check_names_order(files[2], files[1], meta["names"], "re-create the decomposition")
    p_active = tensors.pop("p_active", None)
    # Before allocating factors for config.yaml's count (an edited 10^9 was killed for memory).
    counts = {int(t.shape[0]) for k, t in tensors.items() if k.endswith("modes.0") and t.dim()}
    if counts and counts != {config.n_v}:
        raise L3DError(
            f"{files[0]} says n_subnetworks {config.n_v} but {files[2]} holds "
            f"{', '.join(map(str, sorted(counts)))}: restore the files or re-create the "
            "decomposition"
        )
    try:
        pair = SubnetworkPair(
            Subnetworks(shapes, config.n_v, meta["ranks"], config.factorization),
            Subnetworks(shapes, config.n_v, meta["ranks"], config.factorization),
        )
    except (ValueError, TypeError, RuntimeError) as err:
        raise L3DError(
            f"{files[1]} and {files[0]} do not describe valid subnetworks ({err}): restore them "
            "or re-create the decomposition"
        ) from None
    _check_factors(pair.state_dict(), tensors, files, config)
    # Training refuses a non-finite loss, so NaN here is damage; it would spread to every output.
    for name, t in {**tensors, "p_active": p_active}.items():
        if t is not None:
            check_finite(
                t, f"{files[2]} ({name})", "restore the file or re-create the decomposition"
            )
    if p_active is not None and (
        p_active.dtype != torch.float32 or not bool(((p_active >= 0) & (p_active <= 1)).all())
    ):
        raise L3DError(
            f"{files[2]} holds p_active that are not float32 fractions in [0, 1]: restore the "
            "files or re-create the decomposition"
        )
    if p_active is None or tuple(p_active.shape) != (config.n_v,):
        found = "no p_active" if p_active is None else f"p_active of shape {tuple(p_active.shape)}"
        raise L3DError(
            f"{files[2]} has {found}, expected {config.n_v} values "
            f"(n_subnetworks in {files[0]}): restore the files or re-create the decomposition"
        )
    pair.load_state_dict(tensors)
    # Training keeps every decoder direction at unit norm: a zero one is damage, and would make
    # its interventions move nothing.
    zero = (pair.v_out.sq_norms() <= 1e-24).nonzero().flatten().tolist()
    if zero:
        raise L3DError(
            f"{files[2]} holds zero decoder directions (V_out of subnetworks "
            f"{', '.join(map(str, zero))}): restore the file or re-create the decomposition"
        )
    return SavedDecomposition(config, meta, pair, p_active)


def read_saved_config(path: Path) -> L3DConfig:
    """A saved decomposition's config.yaml as an L3DConfig; YAML or validation problems name
    the file."""
    try:
        return L3DConfig.from_yaml(path)
    except L3DError as err:
        said = str(err)  # YAML problems name the file already
        said = said if said.startswith(str(path)) else f"{path}: {said}"
        raise L3DError(f"{said}; restore it or re-create the decomposition") from None


def _read_meta(path: Path) -> dict:
    """decomposition.json, its structure checked (a hand edit is one line naming the file)."""
    meta = read_json(path, "decomposition metadata")

    def bad(what: str) -> L3DError:
        return L3DError(f"{path}: {what}: restore it or re-create the decomposition")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise bad(
            f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION} (written by "
            "another version of l3d?)"
        )
    shapes, ranks = meta.get("shapes"), meta.get("ranks")
    if (
        not isinstance(shapes, dict)
        or not shapes
        or not all(
            isinstance(s, list) and s and all(_positive_int(d) for d in s) for s in shapes.values()
        )
    ):
        raise bad("'shapes' must map each tensor name to a list of positive sizes")
    if not isinstance(ranks, dict) or set(ranks) != set(shapes):
        raise bad(f"'ranks' must give a rank for each tensor of 'shapes' ({', '.join(shapes)})")
    names = meta.get("names")
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(shapes):
        raise bad(f"'names' must list the tensors of 'shapes' ({', '.join(shapes)}) in order")
    if not all(_positive_int(r) for r in ranks.values()):
        raise bad(f"'ranks' must be positive integers; got {ranks}")
    evaluation = meta.get("evaluation")
    needed = ("loss_paper", "loss_pooled_squared", "n_samples")
    if not isinstance(evaluation, dict) or any(k not in evaluation for k in needed):
        raise bad(f"'evaluation' must hold {', '.join(needed)}")
    losses = [evaluation["loss_paper"], evaluation["loss_pooled_squared"]]
    if not all(_number(v) and v >= 0 for v in losses) or not (
        isinstance(evaluation["n_samples"], int)
        and not isinstance(evaluation["n_samples"], bool)
        and evaluation["n_samples"] >= 0
    ):
        raise bad(
            "'evaluation' must hold losses >= 0 and a count of samples; got "
            f"{ {k: evaluation[k] for k in needed} }"
        )
    if not isinstance(meta.get("history"), list):
        raise bad("'history' must be a list of epoch records")
    fingerprint = meta.get("w0_fingerprint")
    if fingerprint is not None and not (
        isinstance(fingerprint, dict) and all(isinstance(v, dict) for v in fingerprint.values())
    ):
        raise bad("'w0_fingerprint' must map tensor names to {sum, sum_sq, sha256}")
    if fingerprint is not None and set(fingerprint) != set(meta["names"]):
        # A missing entry would read as weights that changed.
        odd = sorted(set(fingerprint) ^ set(meta["names"]))
        raise bad(f"'w0_fingerprint' must have one entry per name in 'names'; {odd} differ")
    frozen = meta.get("frozen_fingerprint")
    if frozen is not None and not (
        isinstance(frozen, dict) and all(isinstance(v, str) for v in frozen.values())
    ):
        raise bad("'frozen_fingerprint' must map tensor names to sha256 digests")
    return meta


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_factors(
    expected: dict[str, Tensor], found: dict[str, Tensor], files: list[Path], config: L3DConfig
) -> None:
    """The factors in the safetensors file have the names and shapes that config.yaml
    (n_subnetworks, factorization) and decomposition.json (shapes, ranks) imply."""
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [f"{k} is unexpected" for k in found if k not in expected]
    problems += [
        f"{k} has shape {tuple(found[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    # Saved as float32; another dtype (a bool core) would be cast silently on loading.
    problems += [
        f"{k} is {str(found[k].dtype)[6:]}, expected float32"
        for k in expected
        if k in found and found[k].dtype != torch.float32
    ]
    if problems:
        more = f"; {len(problems) - 2} more" if len(problems) > 2 else ""
        raise L3DError(
            f"{files[2]} does not match {files[1].name} (shapes, ranks) and {files[0].name} "
            f"(n_subnetworks={config.n_v}, factorization={config.factorization}): "
            f"{'; '.join(problems[:2])}{more}; was one edited? Restore them or re-create the "
            "decomposition"
        )
