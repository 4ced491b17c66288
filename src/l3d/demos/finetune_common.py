"""What the finetuning demos share: every edit method in one harness (l3d.finetuning's), evaluated
along its training steps, the summary of a trade-off at a constraint, and the caches of their
trained models and decompositions in --out (refused when made with other settings).

Methods: L3D scalars (alpha along the chosen subnetworks), L3D factors (alpha and their factors),
L3D cores (a small core inside each chosen subnetwork's factor subspaces), random directions of
the same ranks as scalars or cores (the controls: the adapter form without the subnetworks), LoRA
rank 1 and 4 through peft on the same tensors, and full finetuning of the same tensors. Each gets
the same data, objective, steps and Adam optimiser, and a grid of learning rates of the same size:
the adapters that train only alpha (a few numbers moving along unit-norm directions of a block
whose norm is ~10) get their own grid (`alpha_lrs`), the others share `lrs`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import l3d
from l3d.config import L3DConfig
from l3d.decomposition import Decomposition
from l3d.errors import L3DError
from l3d.finetuning import Edit, Objective, baseline, finetune
from l3d.io import load_tensors, read_json, save_tensors, write_json
from l3d.runs.checkpoint import config_changes

METHODS = (
    "l3d_scalars",
    "l3d_factors",
    "l3d_cores",
    "l3d_mixed",
    "random_directions",
    "random_cores",
    "random_mixed",
    "lora_r1",
    "lora_r4",
    "full",
)
LABELS = {
    "l3d_scalars": "L3D scalars",
    "l3d_factors": "L3D factors",
    "l3d_cores": "L3D cores",
    "random_directions": "random directions",
    "random_cores": "random cores",
    "l3d_mixed": "L3D α + a core",
    "random_mixed": "random α + a core",
    "lora_r1": "LoRA r1",
    "lora_r4": "LoRA r4",
    "full": "full FT",
}
SCALAR_METHODS = ("l3d_scalars", "random_directions")
Evaluate = Callable[[Edit], dict[str, float]]


def parse_methods(
    text: str, parser: argparse.ArgumentParser, required: Sequence[str] = ()
) -> list[str]:
    """The comma-separated `--methods` of a demo, or a one-line usage error naming the known
    methods (and any the demo's summary needs)."""
    methods = [m for m in text.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    missing = [m for m in required if m not in methods]
    if unknown or missing or not methods:
        parser.error(
            f"--methods {text!r}: "
            + (f"unknown {', '.join(unknown)}; " if unknown else "")
            + (f"this demo's summary needs {', '.join(missing)}; " if missing else "")
            + f"choose from {','.join(METHODS)}"
        )
    return methods


def cached_model(
    folder: Path, model: torch.nn.Module, train: Callable[[], object], settings: dict[str, Any]
) -> torch.nn.Module:
    """`model` trained by `train()` and saved in `folder` with its training `settings`, or the
    weights an earlier run of the same settings saved there (in eval mode). Weights of other
    settings are refused, as `cached_decomposition` refuses a decomposition."""
    path, info = folder / "model.safetensors", folder / "model.json"
    if path.is_file():
        saved = read_json(info, "cached model settings") if info.is_file() else settings
        changes = config_changes(saved, settings) if isinstance(saved, dict) else ["unreadable"]
        if changes:
            raise L3DError(
                f"{folder} holds a model trained with other settings ({'; '.join(changes)}): "
                f"pass another --out, or delete {folder} to train it again"
            )
        model.load_state_dict(load_tensors(path, "cached model"))
        return model.eval()
    train()
    folder.mkdir(parents=True, exist_ok=True)
    # Clones: tied matrices (a transformer's embedding and output) share memory, which
    # safetensors refuses.
    save_tensors(path, {k: v.clone() for k, v in model.state_dict().items()})
    write_json(info, settings)
    return model.eval()


def cached_decomposition(
    folder: Path, model: torch.nn.Module, data: Any, config: L3DConfig
) -> Decomposition:
    """`l3d.run(model, data, config)` saved in `folder`, or the decomposition an earlier run of
    the same config saved there. One of other settings (another --epochs, say) is refused: the
    demo would report it as made with this run's."""
    if not (folder / "decomposition.json").is_file():
        decomposition = l3d.run(model, data, config)
        decomposition.save(folder)
        return decomposition
    cached = l3d.load(folder, model)
    changes = config_changes(cached.config.model_dump(mode="json"), config.model_dump(mode="json"))
    if changes:
        raise L3DError(
            f"{folder} holds a decomposition made with other settings ({'; '.join(changes)}): "
            f"pass another --out, or delete {folder} to make it again"
        )
    return cached


def decomposition_folder(
    seed_folder: Path, scope: str, default_scope: str, n_subnetworks: int | None = None
) -> Path:
    """Where a demo caches its decomposition of `scope`: "decomposition" for the default scope
    (the folder earlier runs wrote), "decomposition-SCOPE" otherwise, "-N" added for a count
    other than the scope's."""
    name = "decomposition" if scope == default_scope else f"decomposition-{scope}"
    return seed_folder / (f"{name}-{n_subnetworks}" if n_subnetworks else name)


def parse_numbers(
    text: str,
    flag: str,
    parser: argparse.ArgumentParser,
    kind: type = float,
    minimum: float = 0.0,
    strict: bool = True,
) -> list:
    """A demo's comma-separated numbers (`--seeds`, `--lrs`, `--retain-weight`), each of `kind`
    and > `minimum` (>= when not `strict`), or a one-line usage error naming the flag and the bad
    value, before any model is trained."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        parser.error(f"{flag} {text!r}: no value given; use comma-separated numbers")
    out = []
    for value in values:
        try:
            number = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            parser.error(f"{flag} {text!r}: {value!r} is not {what}")
        if number < minimum or (strict and number == minimum):
            parser.error(
                f"{flag} {text!r}: {value!r} must be {'>' if strict else '>='} {minimum:g}"
            )
        out.append(number)
    return out


@dataclass(frozen=True)
class Grid:
    """A demo's seeds and the grid every method is swept over (retain weights: none where the
    demo has no retain term)."""

    seeds: list[int]
    lrs: list[float]
    alpha_lrs: list[float]
    retain_weights: list[float]


def parse_grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Grid:
    """`Grid` from a demo's `--seeds`, `--lrs`, `--alpha-lrs` and `--retain-weight` (if it has
    one), checked by `parse_numbers`."""
    retain = getattr(args, "retain_weight", None)
    return Grid(
        parse_numbers(args.seeds, "--seeds", parser, int, strict=False),
        parse_numbers(args.lrs, "--lrs", parser),
        parse_numbers(args.alpha_lrs, "--alpha-lrs", parser),
        [] if retain is None else parse_numbers(retain, "--retain-weight", parser, strict=False),
    )


def learning_rates(method: str, lrs: Sequence[float], alpha_lrs: Sequence[float]) -> list[float]:
    """The learning-rate grid of a method: alpha-only adapters take `alpha_lrs`."""
    return list(alpha_lrs if method in SCALAR_METHODS else lrs)


def sweep(
    methods: Sequence[str],
    grid: Grid,
    decomposition: Decomposition,
    data: object,
    *,
    seed: int,
    steps: int,
    describe: Callable[[dict, dict], str],
    **options: Any,
) -> list[dict]:
    """`run_method` for each retain weight of `grid` (if it has any), method and learning rate
    (evaluated every 5 % of the steps), printing one line per run: seed, method, lr, trained
    numbers, the retain weight, then `describe(last evaluation, run)`."""
    runs = []
    # Without a retain term the weight multiplies nothing: one pass at the default.
    for retain_weight in grid.retain_weights or [1.0]:
        for method in methods:
            for lr in learning_rates(method, grid.lrs, grid.alpha_lrs):
                run = run_method(
                    method, decomposition, data, steps=steps, lr=lr, seed=seed,
                    eval_every=max(1, steps // 20), retain_weight=retain_weight, **options,
                )  # fmt: skip
                runs.append(run)
                print(
                    f"seed {seed} {LABELS[method]:18s} lr {lr:<6g} params {run['n_trainable']:6d}  "
                    + (f"retain weight {retain_weight:g}  " if grid.retain_weights else "")
                    + describe(run["curve"][-1], run)
                )
    return runs


def run_method(
    method: str,
    decomposition: Decomposition,
    data: object,
    *,
    subnetworks: Sequence[int],
    objective: Objective,
    steps: int,
    lr: float,
    seed: int,
    evaluate: Evaluate,
    eval_every: int,
    retain: object | None = None,
    retain_weight: float = 1.0,
    batch_size: int | None = None,
) -> dict:
    """Train one method and evaluate it every `eval_every` steps: {method, lr, seed,
    n_trainable, seconds, curve: [{step, **evaluate(edit)}], delta_norm}."""
    curve: list[dict] = []

    def record(step: int, edit: Edit) -> None:
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                curve.append({"step": step, **evaluate(edit)})

    def train(edit_fn: Callable[..., Edit], **options: Any) -> Edit:
        return edit_fn(
            decomposition,
            data,
            objective=objective,
            steps=steps,
            lr=lr,
            retain=retain,
            retain_weight=retain_weight,
            batch_size=batch_size,
            seed=seed,
            progress=False,
            callback=record,
            **options,
        )

    start = time.perf_counter()
    if method.startswith(("l3d_", "random_")):
        directions = None
        if method.startswith("random"):
            directions = decomposition.subnetworks.v_out.random_like(10_000 + seed)
        mode = method.split("_", 1)[1]  # the train mode; random_directions: scalars
        edit = train(
            finetune,
            subnetworks=subnetworks,
            train="scalars" if mode == "directions" else mode,
            directions=directions,
        )
    elif method.startswith("lora_r"):
        edit = train(baseline, method="lora", rank=int(method.removeprefix("lora_r")))
    else:
        edit = train(baseline, method="full")
    with torch.no_grad():
        delta_norm = sum(n**2 for n in edit.delta_norms().values()) ** 0.5
    return {
        "method": method,
        "lr": lr,
        "retain_weight": retain_weight,
        "seed": seed,
        "n_trainable": edit.n_trainable,
        "seconds": time.perf_counter() - start,
        "curve": curve,
        "delta_norm": delta_norm,
    }


def best_under(
    runs: list[dict],
    method: str,
    seed: int,
    score: str,
    constraint: Callable[[dict], bool],
    lowest: bool = False,
) -> dict | None:
    """The evaluated checkpoint of `method` and `seed` (over its learning rates and steps) with
    the highest `score` (the lowest if `lowest`) among those meeting `constraint`, with its lr and
    retain weight; None if none does."""
    sign = -1 if lowest else 1
    best = None
    for run in runs:
        if run["method"] != method or run["seed"] != seed:
            continue
        for point in run["curve"]:
            if constraint(point) and (best is None or sign * point[score] > sign * best[score]):
                best = {**point, "lr": run["lr"], "retain_weight": run["retain_weight"]}
    return best
