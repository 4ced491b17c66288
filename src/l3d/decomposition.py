"""`decompose(model, data, ...)` runs L3D; a `Decomposition` holds the learned subnetworks and
answers the questions of Section 2.5: coefficients, impact, P_act, interventions. Saved as
safetensors (factors) + JSON/YAML (config, metadata, history); nothing is pickled."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from l3d.algorithm import Evaluation, StepResult, SubnetworkPair, Trainer, evaluate
from l3d.config import L3DConfig
from l3d.divergences import Divergence, ReferenceFn, resolve_divergence, resolve_reference
from l3d.errors import L3DError
from l3d.gradients import GradientSource
from l3d.model import Dataset, Inputs, Target, resolve_device, resolve_ranks, to_device
from l3d.structured import StructuredPlan
from l3d.subnetworks import Subnetworks

FORMAT_VERSION = 1
EpochCallback = Callable[[Trainer, dict], None]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="epoch", desc="L3D", dynamic_ncols=True)


def build(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: Divergence | None = None,
    reference: ReferenceFn | None = None,
) -> tuple[Target, GradientSource, Trainer]:
    """Everything a run needs, validated, before any training: the pieces behind `decompose`."""
    device = resolve_device(config.device)
    model.to(device)
    target = Target.create(model, config.params)
    ranks = resolve_ranks(target.names, config.rank)
    _, divergence_fn = resolve_divergence(divergence or config.divergence)
    _, reference_fn = resolve_reference(reference or config.reference, config.divergence)
    source = GradientSource(
        target,
        Dataset(data, config.batch_size, device),
        divergence_fn,
        reference_fn,
        per_token=config.per_token,
        method=config.gradient_method,
        chunk_size=config.chunk_size,
        sequence_chunk_size=config.sequence_chunk_size,
    )
    generator = torch.Generator().manual_seed(config.seed)
    # Factors are drawn on the CPU so a seed gives the same initialisation on every device.
    pair = SubnetworkPair.initialize(
        target.shapes, config.n_subnetworks, ranks, config.factorization, generator
    ).to(device)
    return target, source, Trainer(config, source, pair)


def decompose(
    model: nn.Module,
    data: object,
    *,
    params: Iterable[str] | str,
    n_subnetworks: int,
    rank: int | dict[str, int] = 1,
    top_k: float = 0.1,
    divergence: str | Divergence = "mse",
    reference: str | ReferenceFn = "random",
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    callback: EpochCallback | None = None,
    **options: Any,
) -> Decomposition:
    """Decompose `model`'s chosen parameter tensors into low-rank subnetworks (L3D, Algorithm 1).

    model: any torch module, frozen at its current weights W0 (put in eval mode for the run).
    data: a tensor of inputs (n, ...), a dict of tensors (input_ids, attention_mask, ...), or a
        re-iterable of such batches (a DataLoader's labels are ignored).
    params: parameter names or glob patterns ('layers.*.weight'); the rest of the model stays fixed.
    divergence: 'mse', 'kl' (KL(p_ref || p_i) on logits), 'mse_authors' (the authors' toy code's
        gradient, to match their published numbers) or a callable (output, reference) -> scalar.
    reference: 'random' (another sample's output), 'mean', 'uniform' or a callable.
    options: any other L3DConfig field (factorization, loss, per_token, warm_start_epochs, ...).
    callback: called as callback(trainer, epoch_record) after every epoch.
    """
    div_name = resolve_divergence(divergence)[0]
    ref_name = resolve_reference(reference, div_name)[0]
    config = L3DConfig.create(
        params=[params] if isinstance(params, str) else list(params),
        n_subnetworks=n_subnetworks,
        rank=rank,
        top_k=top_k,
        divergence=div_name,
        reference=ref_name,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        **options,
    )
    return run(
        model,
        data,
        config,
        divergence=divergence if callable(divergence) else None,
        reference=reference if callable(reference) else None,
        progress=progress,
        callback=callback,
    )


def run(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    *,
    divergence: Divergence | None = None,
    reference: ReferenceFn | None = None,
    progress: bool = True,
    callback: EpochCallback | None = None,
    trainer_state: dict | None = None,
    step_callback: Callable[[StepResult], None] | None = None,
) -> Decomposition:
    """Run L3D from a config (the entry point for config files and resumed runs).

    step_callback: called with each training step's StepResult (per-step progress of long epochs).
    """
    if config.divergence.startswith("custom:") and divergence is None:
        raise L3DError(f"config names divergence '{config.divergence}': pass the callable")
    if config.reference.startswith("custom:") and reference is None:
        raise L3DError(f"config names reference '{config.reference}': pass the callable")
    was_training = model.training
    model.eval()  # batch statistics would make samples interact; BatchNorm uses running stats.
    try:
        _target, source, trainer = build(model, data, config, divergence, reference)
        if trainer_state is not None:
            trainer.load_state_dict(trainer_state)
        with _progress(config.epochs, progress) as bar:
            bar.update(trainer.epoch)
            while trainer.epoch < config.epochs:
                record = trainer.run_epoch(on_step=step_callback)
                bar.set_postfix(
                    loss=f"{record['loss_' + config.loss]:.4f}", live=record["live_subnetworks"]
                )
                bar.update(1)
                if callback is not None:
                    callback(trainer, record)
        final = evaluate(trainer.pair, source, config.top_k, config.seed + 2)
    finally:
        model.train(was_training)
    return Decomposition(
        config=config,
        subnetworks=trainer.pair,
        history=trainer.history,
        evaluation=final,
        model=model,
        divergence=divergence,
        reference=reference,
    )


class Decomposition:
    """The learned subnetworks of one L3D run and what can be asked of them."""

    def __init__(
        self,
        config: L3DConfig,
        subnetworks: SubnetworkPair,
        history: list[dict],
        evaluation: Evaluation,
        model: nn.Module,
        divergence: Divergence | None = None,
        reference: ReferenceFn | None = None,
    ) -> None:
        self.config = config
        self.subnetworks = subnetworks
        self.history = history
        self.evaluation = evaluation
        self.model = model
        self._divergence = divergence
        self._reference = reference
        self.target = Target.create(model, subnetworks.v_out.names)

    # What was learned --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.subnetworks.parameters()).device

    @property
    def n_subnetworks(self) -> int:
        return self.config.n_subnetworks

    @property
    def names(self) -> list[str]:
        return self.subnetworks.v_out.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.subnetworks.v_out.shapes

    @property
    def ranks(self) -> dict[str, int]:
        return self.subnetworks.v_out.ranks

    @property
    def p_active(self) -> Tensor:
        """(n_v,) fraction of samples in which each subnetwork is in the batch top-k."""
        return self.evaluation.p_active

    @property
    def dead_subnetworks(self) -> list[int]:
        return [int(k) for k in torch.nonzero(self.p_active == 0).flatten()]

    @torch.no_grad()
    def v_out(self, k: int) -> dict[str, Tensor]:
        """Subnetwork k (unit global L2 norm) as {param_name: tensor shaped like the parameter}."""
        return self.subnetworks.v_out.direction(self._check_index(k))

    @torch.no_grad()
    def v_in(self, k: int) -> dict[str, Tensor]:
        """Subnetwork k's encoder direction, {param_name: tensor shaped like the parameter}."""
        return self.subnetworks.v_in.direction(self._check_index(k))

    def _check_index(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.n_subnetworks:
            raise L3DError(
                f"subnetwork index {k!r} out of range: use an int in 0..{self.n_subnetworks - 1}"
            )
        return k

    # Questions about samples -------------------------------------------------------------
    def gradient_source(self, inputs: object, method: str | None = None) -> GradientSource:
        """Per-sample gradients of `inputs` under this decomposition's divergence and reference
        strategy: `.batch(inputs, references, generator)` gives them for one batch.

        method: an L3DConfig.gradient_method, or None for one-off use: the structured path where
        a decomposed tensor supports it (ResidMLP's 1000 x 50 layers: dense per-sample gradients
        took 2.5 s per 1000 samples), else torch.func; the cached Jacobians only pay off when the
        same samples come back epoch after epoch."""
        if method is None:
            method = "structured" if StructuredPlan.create(self.target).sites else "vmap"
        _, div = resolve_divergence(self._divergence or self.config.divergence)
        _, ref = resolve_reference(self._reference or self.config.reference, self.config.divergence)
        return GradientSource(
            self.target,
            Dataset(inputs, self.config.batch_size, self.device),
            div,
            ref,
            per_token=self.config.per_token,
            method=method,
            chunk_size=self.config.chunk_size,
            sequence_chunk_size=self.config.sequence_chunk_size,
        )

    @torch.no_grad()
    def coefficients(
        self, inputs: Inputs, references: Tensor | None = None, seed: int | None = None
    ) -> Tensor:
        """c = V_in . grad_W D(f(x_i), y_ref) per sample, (n_samples, n_v) (eq. 3).

        references: reference outputs shaped like the model's outputs for `inputs` (detached), or
        None to draw them with the configured strategy (seeded by `seed`, default config.seed).
        With per_token, rows are the valid (sequence, position) samples in order.
        """
        self.model.eval()
        source = self.gradient_source(inputs)
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        references = None if references is None else references.to(self.device)
        batch = source.batch(to_device(inputs, self.device), references, generator)
        return batch.project(self.subnetworks.v_in)

    @torch.no_grad()
    def evaluate(self, data: object, seed: int = 0, top_k: float | None = None) -> Evaluation:
        """P_act and both losses on any data (e.g. held-out samples), batched as in training."""
        self.model.eval()
        source = self.gradient_source(data, method="auto")
        return evaluate(self.subnetworks, source, top_k or self.config.top_k, seed)

    @torch.no_grad()
    def impact(self, inputs: Inputs, n_references: int = 10, seed: int = 0) -> Tensor:
        """I(x_i, v_k) = mean over n_references random references of |V_in_k . grad D| (eq. 10-11):
        the absolute value is taken before the mean, as the paper defines it. (n_samples, n_v)."""
        total = None
        for j in range(n_references):
            c = self.coefficients(inputs, seed=seed + j).abs()
            total = c if total is None else total + c
        return total / n_references

    @torch.no_grad()
    def intervene(self, inputs: Inputs, k: int, delta: float) -> Tensor:
        """f(x, W0 + delta * v_k): the model's outputs with subnetwork k's unit direction added (eq. 9)."""
        direction = self.v_out(k)
        params = {n: w + delta * direction[n] for n, w in self.target.w0.items()}
        return self.target.forward(inputs, params)

    # Persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write config.yaml, decomposition.json and subnetworks.safetensors to `directory`, each
        atomically (written to a temporary file, then renamed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in self.subnetworks.state_dict().items()
        }
        tensors["p_active"] = self.p_active.cpu().contiguous()
        _atomic(directory / "subnetworks.safetensors", lambda p: save_file(tensors, str(p)))
        meta = {
            "format_version": FORMAT_VERSION,
            "names": self.names,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "ranks": self.ranks,
            "evaluation": {
                "loss_paper": self.evaluation.loss_paper,
                "loss_pooled_squared": self.evaluation.loss_pooled_squared,
                "n_samples": self.evaluation.n_samples,
                "dead_subnetworks": self.dead_subnetworks,
            },
            "history": self.history,
        }
        _atomic(
            directory / "decomposition.json", lambda p: p.write_text(json.dumps(meta, indent=1))
        )
        _atomic(directory / "config.yaml", lambda p: p.write_text(self.config.to_yaml()))
        return directory


def load(
    directory: str | Path,
    model: nn.Module,
    *,
    divergence: Divergence | None = None,
    reference: ReferenceFn | None = None,
) -> Decomposition:
    """Load a saved decomposition against `model`, refusing a model whose decomposed tensors have
    different names or shapes."""
    directory = Path(directory)
    files = [
        directory / f for f in ("config.yaml", "decomposition.json", "subnetworks.safetensors")
    ]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise L3DError(f"{directory} is not a saved decomposition: missing {', '.join(missing)}")
    config = L3DConfig.from_yaml(files[0])
    meta = json.loads(files[1].read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise L3DError(f"{directory} has format version {meta.get('format_version')}, expected 1")
    params = dict(model.named_parameters())
    problems = []
    for name, shape in meta["shapes"].items():
        if name not in params:
            problems.append(f"'{name}' is not a parameter of this model")
        elif tuple(params[name].shape) != tuple(shape):
            problems.append(f"'{name}' has shape {tuple(params[name].shape)}, saved {tuple(shape)}")
    if problems:
        raise L3DError(
            f"the decomposition in {directory} does not fit this model: " + "; ".join(problems)
        )
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    pair = SubnetworkPair(
        Subnetworks(shapes, config.n_subnetworks, meta["ranks"], config.factorization),
        Subnetworks(shapes, config.n_subnetworks, meta["ranks"], config.factorization),
    )
    tensors = load_tensors(files[2], "subnetwork factors")
    p_act = tensors.pop("p_active")
    pair.load_state_dict(tensors)
    pair.to(next(model.parameters()).device)
    ev = meta["evaluation"]
    evaluation = Evaluation(p_act, ev["loss_paper"], ev["loss_pooled_squared"], ev["n_samples"])
    return Decomposition(config, pair, meta["history"], evaluation, model, divergence, reference)


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


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
