"""What a run spec's sources name, built: the model (a toy of l3d.toys.registry, a HuggingFace
model, or a Python function), the data (with contrastive pairs: `l3d.pairs.pair_data`), the labels,
and custom divergence / reference functions."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l3d.config import L3DConfig
from l3d.controls import shuffle_parameters_
from l3d.core.divergences import DivergenceFn, ReferenceFn, is_custom
from l3d.core.samples import Inputs
from l3d.errors import L3DError
from l3d.io import file_sha256, load_tensors, read_json, save_tensors, write_json
from l3d.pairs import pair_data
from l3d.runs.folder import RunDir
from l3d.runs.spec import Counterpart, DataSource, ModelSource, PairSource
from l3d.toys import registry as toys


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
        if spec is None or spec.loader is None:
            raise L3DError(f"{what} '{target}': cannot load {path} as a Python module")
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
    found = getattr(module, name)
    if not callable(found):
        raise L3DError(
            f"{what} '{target}': {name} is not a function (type {type(found).__name__}): name a "
            "function that returns it"
        )
    return found


def _call(fn: Callable, options: dict | None, what: str) -> Any:
    """fn(**options), options the function does not take a one-line error. options None: a source
    without options, called with no arguments. The options are checked against fn's signature:
    a TypeError raised inside fn is its own bug, whatever its message says; only where the
    signature cannot tell (none, or **kwargs passed on) does the error's text decide."""
    kwargs = options or {}
    try:
        signature = inspect.signature(fn)
    except ValueError:  # a builtin without a signature
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            raise _bad_options(what, options, err) from None
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            return fn(**kwargs)  # a TypeError from here on is raised inside fn
    try:
        return fn(**kwargs)
    except TypeError as err:
        if "argument" in str(err):
            raise _bad_options(what, options, err) from None
        raise


def _bad_options(what: str, options: dict | None, err: TypeError) -> L3DError:
    if options is None:
        return L3DError(
            f"{what} is called with no arguments: {err}; name a function that needs none"
        )
    return L3DError(f"{what}: bad options {options}: {err}")


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
    """The model of a run. A toy is trained by the toy registry (cached there) and its weights are
    kept in the run folder, so resuming or analysing a run never retrains it. With
    `shuffle_seed`, the control network: every parameter tensor's entries permuted."""
    model = _load_model(source, run_dir)
    if source.shuffle_seed is not None:
        shuffle_parameters_(model, source.shuffle_seed)
    return model


def _load_model(source: ModelSource, run_dir: RunDir | None) -> nn.Module:
    if source.toy is not None:
        return _toy_model(source.toy, source.options, run_dir)
    if source.hf is not None:
        what = f"hf '{source.hf}'"
        precision = next((k for k in ("dtype", "torch_dtype") if k in source.options), None)
        if precision is not None:  # transformers' own option, which l3d could only refuse later
            raise L3DError(
                f"{what}: model.options.{precision} is set ({source.options[precision]}): l3d "
                "decomposes in float32 and loads every model in float32 (weights saved in another "
                "precision are converted); remove the option"
            )
        options = _options(source.options, {"attn_implementation": "eager"}, what)
        return _hf().load_causal_lm(source.hf, **options)
    python = source.python
    assert python is not None  # ModelSource: exactly one of toy, hf, python is set
    model = _call(import_object(python, "model"), source.options, python)
    if not isinstance(model, nn.Module):
        raise L3DError(f"model '{python}' returned {type(model).__name__}, not a torch module")
    return model


def _toy_model(toy: str, toy_options: dict[str, Any], run_dir: RunDir | None) -> nn.Module:
    spec = toys.get_toy(toy)
    options = _options(toy_options, {"seed": 0}, f"toy model '{toy}'")
    if run_dir is not None and run_dir.model_weights.is_file():
        info = read_json(run_dir.model_info, "toy model info")
        init_seed = info.get("init_seed") if isinstance(info, dict) else None
        if type(init_seed) is not int:
            raise L3DError(
                f"toy model info {run_dir.model_info} has no integer 'init_seed': restore it, or "
                "delete it and model.safetensors to retrain the toy"
            )
        retrain = "delete model.safetensors and model.json to retrain the toy"
        if info.get("toy", toy) != toy:
            raise L3DError(
                f"{run_dir.model_weights} is a trained '{info['toy']}' toy, but "
                f"{run_dir.config} names toy '{toy}': restore config.yaml, or {retrain}"
            )
        model = spec.make(init_seed)[0]
        try:
            model.load_state_dict(load_tensors(run_dir.model_weights, "toy model weights"))
        except RuntimeError as err:  # tensors of other names or shapes (other toy options)
            detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise L3DError(
                f"{run_dir.model_weights} does not fit toy '{toy}' as {run_dir.config} describes "
                f"it ({detail}): restore config.yaml, or {retrain}"
            ) from None
        return model.eval()
    trained = toys.train_toy_model(spec, options["seed"])
    if run_dir is not None:
        save_tensors(run_dir.model_weights, trained.model.state_dict())
        write_json(run_dir.model_info, {"toy": toy, "init_seed": trained.info["init_seed"]})
    return trained.model


def _data_files(source: DataSource) -> dict[str, str]:
    """sha256 by path of the files the data are read from (`file`, a `text` file)."""
    files = [f for f in (source.file, source.text) if f is not None and Path(f).is_file()]
    return {f: file_sha256(f) for f in files}


def record_data(run_dir: RunDir, source: DataSource) -> None:
    """Keep the sha256 of the run's data files in the run folder (`check_data`)."""
    write_json(run_dir.data_record, _data_files(source))


def check_data(run_dir: RunDir, source: DataSource, fix: str) -> None:
    """Refuse data files replaced since the run recorded them (`record_data`): a resumed run, an
    analysis or an intervention would measure inputs the decomposition never saw, silently. A
    run from before the record, or a file now missing (named where it is read), passes here."""
    if not run_dir.data_record.is_file():
        return
    recorded = read_json(run_dir.data_record, "data record")
    if not isinstance(recorded, dict):
        raise L3DError(f"{run_dir.data_record} is not what l3d writes: delete it")
    now = _data_files(source)
    changed = next((f for f, digest in recorded.items() if now.get(f, digest) != digest), None)
    if changed is not None:
        raise L3DError(
            f"{changed} has changed since this run started (its sha256 is not the one in "
            f"{run_dir.data_record}): {fix}"
        )


def build_data(
    source: DataSource, model_source: ModelSource, model: nn.Module | None = None
) -> Any:
    """The data of a run: a tensor, a dict of tensors, or a re-iterable of batches; with
    `data.pairs`, `l3d.pairs.pair_data` of the inputs and their counterparts, whose outputs under
    `model` are the references."""
    inputs = _build_inputs(source, model_source, model)
    if source.pairs is None:
        return inputs
    if model is None:
        raise L3DError(
            "data.pairs: the counterparts' outputs need the model: call build_data(..., model)"
        )
    return _pair_data(source, source.pairs, inputs, model)


def _build_inputs(source: DataSource, model_source: ModelSource, model: nn.Module | None) -> Any:
    if source.toy is not None:
        spec = toys.get_toy(source.toy)
        options = _options(
            source.options, {"n_samples": 1000, "seed": 1}, f"toy data '{source.toy}'"
        )
        return spec.sample(options["n_samples"], torch.Generator().manual_seed(options["seed"]))
    if source.file is not None:
        tensors = load_tensors(source.file, "data file")
        key = source.options.get("key")
        if key is None:
            # The pairs' own tensors (counterparts, positions) in the same file are no inputs.
            taken = set(source.pairs.names()) if source.pairs is not None else set()
            tensors = {k: v for k, v in tensors.items() if k not in taken}
            if not tensors:
                raise L3DError(
                    f"{source.file} holds only the pairs' tensors ({', '.join(sorted(taken))}): "
                    "add the inputs"
                )
            return tensors if len(tensors) > 1 else next(iter(tensors.values()))
        if key not in tensors:
            raise L3DError(f"{source.file} has no tensor '{key}'; it has {', '.join(tensors)}")
        return tensors[key]
    if source.text is not None:
        if model_source.hf is None:
            raise L3DError("data 'text' is tokenized by the model's tokenizer: use an hf model")
        options = dict(source.options)
        tokenizer = load_tokenizer(options.pop("tokenizer", model_source.hf))
        if model is not None:  # ids or positions past the model's: name them, not torch's index
            _hf().check_vocabulary(tokenizer, model)
            default = inspect.signature(_hf().token_dataset).parameters["seq_len"].default
            seq_len = options.get("seq_len", default)
            if isinstance(seq_len, int):
                _hf().check_positions(seq_len, model)
        return _call(
            lambda **o: _hf().token_dataset(source.text, tokenizer, **o), options, "data 'text'"
        )
    python = source.python
    assert python is not None  # DataSource: exactly one of toy, file, text, python is set
    return _call(import_object(python, "data"), source.options, python)


def _pair_data(source: DataSource, pairs: PairSource, inputs: Any, model: nn.Module) -> Any:
    """`l3d.pairs.pair_data` of the inputs and the counterparts (and positions) `pairs` names."""
    if not isinstance(inputs, (Tensor, Mapping)):
        raise L3DError(
            f"data.pairs needs the inputs as one tensor or one dict of tensors, a row per input "
            f"aligned with its counterparts, not {type(inputs).__name__} (an iterable of batches)"
        )
    file_tensors: dict[str, Tensor] = {}

    def tensor_or_call(name: str, what: str) -> Any:
        if ":" in name:
            return _call(import_object(name, what), None, f"{what} '{name}'")
        if source.file is None:
            raise L3DError(
                f"{what} '{name}' names a tensor of the data file, but the data is not a file: "
                "give 'module:function' returning it"
            )
        if not file_tensors:
            file_tensors.update(load_tensors(source.file, "data file"))
        if name not in file_tensors:
            raise L3DError(
                f"{source.file} has no tensor '{name}' ({what}); it has {', '.join(file_tensors)}"
            )
        return file_tensors[name]

    def one_set(item: Counterpart) -> list[Inputs]:
        what = "data.pairs.counterparts"
        if isinstance(item, dict):
            return [{key: tensor_or_call(name, what) for key, name in item.items()}]
        value = tensor_or_call(item, what)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not isinstance(v, Tensor) and not (
                isinstance(v, Mapping) and all(isinstance(t, Tensor) for t in v.values())
            ):
                raise L3DError(
                    f"{what} '{item}' gave a {type(v).__name__}: give a tensor or a dict of "
                    "tensors shaped like the inputs (or a list of such)"
                )
        return [v if isinstance(v, Tensor) else dict(v) for v in values]

    items = pairs.counterparts if isinstance(pairs.counterparts, list) else [pairs.counterparts]
    sets = [c for item in items for c in one_set(item)]
    positions = None
    if pairs.positions is not None:
        positions = tensor_or_call(pairs.positions, "data.pairs.positions")
        if not isinstance(positions, Tensor):
            raise L3DError(
                f"data.pairs.positions '{pairs.positions}' gave a {type(positions).__name__}: "
                "give a bool (batch, seq) tensor"
            )
        if isinstance(inputs, Tensor):
            raise L3DError(
                "data.pairs.positions marks per-token positions of dict inputs (input_ids, "
                "attention_mask, ...), but the inputs are one tensor: drop positions"
            )
    return pair_data(
        model,
        inputs if isinstance(inputs, Tensor) else dict(inputs),
        sets if len(sets) > 1 else sets[0],
        symmetric=pairs.symmetric,
        positions=positions,
    )


def with_data_file(source: DataSource, path: str | Path) -> DataSource:
    """The run's data source reading `path` instead of its own file (a .safetensors file with the
    same tensor names, or a text file for text data): e.g. held-out inputs or pairs to analyse."""
    path = Path(path)
    if not path.is_file():
        raise L3DError(f"--data {path}: no such file; pass a data file like the run's")
    if source.file is not None:
        return source.model_copy(update={"file": str(path)})
    if source.text is not None:
        return source.model_copy(update={"text": str(path)})
    kind = "a toy" if source.toy is not None else "a Python function"
    raise L3DError(
        f"--data replaces the run's data file, but this run's data come from {kind}; "
        "analyse other inputs from Python (l3d.analysis.write_analysis) instead"
    )


def build_labels(source: DataSource) -> Any:
    """The labels named by the data source, or None: one per input, each named by class_names
    where they are class indices."""
    if source.labels is None:
        return None
    if source.file is not None and ":" not in source.labels:
        tensors = load_tensors(source.file, "data file")
        if source.labels not in tensors:
            raise L3DError(
                f"{source.file} has no labels tensor '{source.labels}'; it has {', '.join(tensors)}"
            )
        tensor = tensors[source.labels]
        if tensor.dim() != 1:
            raise L3DError(
                f"{source.file}: labels tensor '{source.labels}' is shaped "
                f"{tuple(tensor.shape)}: give one label per input, a 1-d tensor"
            )
        labels = tensor.tolist()
    else:
        labels = _call(import_object(source.labels, "labels"), None, f"labels '{source.labels}'")
    classes = [y for y in labels if isinstance(y, int) and not isinstance(y, bool)]
    if source.class_names is not None and classes and max(classes) >= len(source.class_names):
        # Labels past the names would show as bare numbers beside named ones.
        raise L3DError(
            f"{len(source.class_names)} class_names for labels up to {max(classes)}: name every "
            f"class (data.class_names), or leave class_names out"
        )
    return labels


def resolve_custom(config: L3DConfig) -> tuple[DivergenceFn | None, ReferenceFn | None]:
    """'custom:module:function' divergences and references, imported from the config."""
    out: list[Callable | None] = []
    for name in (config.divergence, config.reference):
        if is_custom(name):
            out.append(import_object(name.split(":", 1)[1], "custom function"))
        else:
            out.append(None)
    return out[0], out[1]
