"""The run folder: where each file of a run lives, its metrics log, and starting a fresh one.

A run folder holds:
  config.yaml        the resolved run spec (overrides applied, paths absolute)
  model.safetensors  a toy's trained weights, with model.json (other models are rebuilt)
  metrics.jsonl      one JSON line per epoch: step, both losses, lr, live subnetworks, time
  checkpoint/        state.json + state-EPOCH.safetensors: the trainer after a whole epoch
  decomposition/     the final Decomposition.save
  analysis/, interventions/, report/   written by `l3d analyze`, `l3d intervene`, `l3d report`
  .lock              held (flock) by the process running the folder, holding its pid

In a distributed run (core/distributed.py) rank 0 alone locks and writes the folder; the other
ranks read it (config, checkpoint, a toy's weights) once rank 0 has written it, so every rank needs
the folder on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from l3d.core.distributed import Group
from l3d.errors import L3DError
from l3d.io import read_json, read_saved_config, write_text
from l3d.runs.checkpoint import config_changes, setting_changes
from l3d.runs.spec import RunSpec, read_yaml

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

# Run folders whose lock this process holds (resolved path -> depth), so the CLI can lock a folder
# before creating the run and `execute` can lock it again.
_HELD: dict[Path, int] = {}


def writable_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder that exists and can be written (made if missing), or an L3DError naming
    it: a read-only folder, or a path under a file, fails here and not midway through the work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise L3DError(
            f"cannot write to '{path}': it is a file, not a folder; move or delete it, or choose "
            f"another {what} folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".l3d-write-test-"):
            pass
    except OSError as err:
        raise L3DError(
            f"cannot write to '{path}' ({err.strerror or err}): choose another {what} folder, or "
            "make it writable"
        ) from None
    return path


@contextlib.contextmanager
def output_folder(path: str | Path, what: str) -> Iterator[Path]:
    """`writable_folder` for a command's output: the folders it makes for `path` are removed
    again, while still empty, when the command fails (no empty folder of its own left behind;
    one that existed before is kept)."""
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    writable_folder(path, what)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty (or not ours to remove): kept
                break
        raise


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
    def data_record(self) -> Path:
        """The sha256 of the files the run's data are read from, by path (`record_data`)."""
        return self.path / "data.json"

    @property
    def model_info(self) -> Path:
        return self.path / "model.json"

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    @property
    def controls(self) -> Path:
        """`l3d control`'s run folders (one per kind), their comparison and its analysis."""
        return self.path / "controls"

    @property
    def interventions(self) -> Path:
        return self.path / "interventions"

    @property
    def report(self) -> Path:
        return self.path / "report"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def finished(self) -> bool:
        return (self.decomposition / "decomposition.json").is_file()

    def require(self) -> None:
        """An L3DError saying what the folder is when it is not a run folder: missing, an
        `l3d experiment` output folder, a saved decomposition, or a folder without config.yaml."""
        if self.path.exists() and not self.path.is_dir():
            how = (
                f"decompose it first (`l3d decompose {self.path} --out RUN_DIR`) and pass RUN_DIR"
                if self.path.suffix in (".yaml", ".yml")
                else "pass the folder `l3d decompose CONFIG --out RUN_DIR` made"
            )
            raise L3DError(f"'{self.path}' is a file, not a run folder: {how}")
        if not self.path.is_dir():
            raise L3DError(f"run folder '{self.path}' does not exist")
        if self._has("decomposition.json"):  # it has a config.yaml too: the L3DConfig
            parent = self.path.parent
            hint = (
                f"pass its run folder '{parent}'"
                if (parent / "config.yaml").is_file() and parent.name != ""
                else "load it in Python with l3d.load(path, model)"
            )
            raise L3DError(f"'{self.path}' is a saved decomposition, not a run folder: {hint}")
        if self.config.is_file():
            return
        results = [n for n in ("metrics.json", "summary.md", "results.json") if self._has(n)]
        if results:
            summary = self.path / ("summary.md" if self._has("summary.md") else "results.md")
            raise L3DError(
                f"'{self.path}' is an `l3d experiment` output folder ({', '.join(results)}), not "
                f"a run folder: its results are in {summary}; to analyse or report a toy, "
                "decompose it into a run folder (`l3d decompose CONFIG --out RUN_DIR` with "
                "`model: {toy: NAME}`, see examples/tms.yaml) and pass RUN_DIR"
            )
        raise L3DError(
            f"'{self.path}' is not a run folder: it has no config.yaml (make one with "
            "`l3d decompose CONFIG --out RUN_DIR`)"
        )

    def require_finished(self) -> None:
        """require(), a saved decomposition (else: how to finish the run), and its settings as
        the run's config.yaml gives them (else: which was edited)."""
        self.require()
        if not self.finished:
            raise L3DError(
                f"'{self.path}' has no finished decomposition yet: run "
                f"`l3d decompose --resume {self.path}`"
            )
        self.check_settings()

    def check_settings(self) -> None:
        """The settings are recorded twice, in config.yaml's l3d section and in
        decomposition/config.yaml (n_subnetworks chosen there); commands read one or the other,
        so an edit to either would be seen by some and not others."""
        spec = self.spec()
        saved_file = self.decomposition / "config.yaml"
        saved = read_saved_config(saved_file).model_dump(mode="json")
        given = spec.l3d.model_dump(mode="json")
        if given["n_subnetworks"] == "auto":
            given["n_subnetworks"] = saved["n_subnetworks"]
        changes = config_changes(given, saved)
        if changes:
            raise L3DError(
                f"{saved_file} does not match the l3d section of {self.config} (config.yaml "
                f"-> decomposition/config.yaml: {'; '.join(changes)}): one of them was edited "
                "after the run; restore it"
            )
        recorded = self._recorded_config()
        changes = [] if recorded is None else setting_changes(recorded, spec.resolved())
        if changes:
            raise L3DError(
                f"{self.config} changed since the run ({'; '.join(changes)}; the checkpoint "
                f"{self.checkpoint / 'state.json'} records the run's): restore it"
            )

    def _recorded_config(self) -> dict | None:
        """The resolved config the last checkpoint recorded; None without a readable one (it is
        not needed to read a finished run, so its damage is left to `--resume` to report)."""
        try:
            index = read_json(self.checkpoint / "state.json", "checkpoint index")
        except L3DError:
            return None
        config = index.get("config") if isinstance(index, dict) else None
        return config if isinstance(config, dict) else None

    def _has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def spec(self) -> RunSpec:
        self.require()
        return RunSpec.create(read_yaml(self.config))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process (an flock on RUN_DIR/.lock, which holds our pid) until
        the block ends. Another process holding it is an L3DError naming its pid. The operating
        system drops the lock when its process dies, so a killed run never blocks the next one.
        Re-entrant within a process. In a distributed run rank 0 holds it for all ranks, and its
        failure to take it stops them all."""
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        group = Group.current()
        fd: int | None = None
        with group.lead_first() if group is not None else contextlib.nullcontext():
            if fcntl is not None and (group is None or group.lead):
                fd = self._acquire()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            if fd is not None:
                with contextlib.suppress(OSError):
                    self.lock_file.unlink()  # while still locked: a waiting process retries
                os.close(fd)  # releases the lock

    def _acquire(self) -> int:
        assert fcntl is not None
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise L3DError(
                    f"cannot write to '{self.path}' ({err.strerror or err}): the run folder must "
                    "be writable"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise L3DError(
                    f"'{self.path}' is in use by another l3d process (pid {owner}): wait for it "
                    f"to end or stop it (kill {owner}); two runs in one folder would mix their "
                    "files"
                ) from None
            # The holder before us may have removed the file after we opened it: then our lock is
            # on a file nobody else sees, so try again on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def metrics_records(self) -> list[dict]:
        """The metric lines; a last line cut short by a kill mid-write is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise L3DError(f"{self.metrics} line {i + 1} is not JSON") from None
                continue
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise L3DError(
                    f"{self.metrics} line {i + 1} is not a metrics record (a JSON object with an "
                    "integer 'epoch'): restore the file, or delete the line"
                )
            records.append(record)
        return records

    def append_metrics(self, record: dict) -> None:
        """One epoch's line (an append: a kill mid-write cuts only this line short)."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs after the checkpoint: they are run again on resume."""
        records = [r for r in self.metrics_records() if r["epoch"] < epochs_done]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))


def create_run(spec: RunSpec, path: str | Path, *, overwrite: bool = False) -> RunDir:
    """A fresh run folder holding the resolved spec (in a distributed run: made by rank 0, the
    other ranks waiting until it is)."""
    group = Group.current()
    with group.lead_first() if group is not None else contextlib.nullcontext():
        if group is None or group.lead:
            _create(spec, RunDir(Path(path)), overwrite)
    return RunDir(Path(path))


def _create(spec: RunSpec, run_dir: RunDir, overwrite: bool) -> None:
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
        for file in (
            run_dir.config,
            run_dir.metrics,
            run_dir.model_weights,
            run_dir.model_info,
            run_dir.data_record,
        ):
            file.unlink(missing_ok=True)
        for folder in (
            run_dir.checkpoint,
            run_dir.decomposition,
            run_dir.analysis,
            run_dir.controls,
            run_dir.interventions,
            run_dir.report,
            run_dir.tensorboard,
        ):
            shutil.rmtree(folder, ignore_errors=True)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.config, spec.to_yaml())
