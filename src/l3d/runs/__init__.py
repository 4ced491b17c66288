"""Runs driven by config files: the run spec (model source, data source, `l3d:` hyperparameters),
the run folder, its metrics log and atomic safetensors checkpoints, and resuming after a stop.

- `spec`: the config file's schema, `--set` overrides, path resolution;
- `sources`: the model, data, labels and custom functions the spec names;
- `folder`: the run folder's layout, metrics log and lock (light: the report reads run folders);
- `checkpoint`: the trainer state as safetensors + JSON, with the config it was made with;
- `execution`: running a folder to the end (resuming, signals, tracking), checking a spec without
  running it (`check`), and opening a run again (`open_run`).
"""

from l3d.runs.checkpoint import (
    config_changes,
    config_hash,
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from l3d.runs.execution import Interrupted, LoadedRun, check, execute, open_run
from l3d.runs.folder import RunDir, create_run, output_folder, writable_folder
from l3d.runs.sources import (
    build_data,
    build_labels,
    build_model,
    check_data,
    import_object,
    load_tokenizer,
    resolve_custom,
    with_data_file,
)
from l3d.runs.spec import (
    DataSource,
    ModelSource,
    PairSource,
    RunOptions,
    RunSpec,
    apply_overrides,
    load_spec,
    read_yaml,
)

__all__ = [
    "DataSource",
    "Interrupted",
    "LoadedRun",
    "ModelSource",
    "PairSource",
    "RunDir",
    "RunOptions",
    "RunSpec",
    "apply_overrides",
    "build_data",
    "build_labels",
    "build_model",
    "check",
    "check_data",
    "config_changes",
    "config_hash",
    "create_run",
    "execute",
    "flatten_state",
    "import_object",
    "load_checkpoint",
    "load_spec",
    "load_tokenizer",
    "open_run",
    "output_folder",
    "read_yaml",
    "resolve_custom",
    "save_checkpoint",
    "unflatten_state",
    "with_data_file",
    "writable_folder",
]
