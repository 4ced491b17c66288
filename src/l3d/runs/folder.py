"""The run folder: where each file of a run lives, its metrics log, and starting a fresh one.

A run folder holds:
  config.yaml        the resolved run spec (overrides applied, paths absolute)
  model.safetensors  a toy's trained weights, with model.json (other models are rebuilt)
  metrics.jsonl      one JSON line per epoch: step, both losses, lr, live subnetworks, time
  checkpoint/        state.json + state-EPOCH.safetensors: the trainer after a whole epoch
  decomposition/     the final Decomposition.save
  analysis/, interventions/, report/   written by `l3d analyze`, `l3d intervene`, `l3d report`
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from l3d.errors import L3DError
from l3d.io import write_text
from l3d.runs.spec import RunSpec, read_yaml


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
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

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

    def append_metrics(self, record: dict) -> None:
        """One epoch's line (an append: a kill mid-write cuts only this line short)."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs after the checkpoint: they are run again on resume."""
        records = [r for r in self.metrics_records() if r["epoch"] < epochs_done]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))


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
            run_dir.tensorboard,
        ):
            shutil.rmtree(folder, ignore_errors=True)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.config, spec.to_yaml())
    return run_dir
