"""`decompose(model, data, ...)` runs L3D; a `Decomposition` holds the learned subnetworks and
answers the questions of Section 2.5, each defined here once: coefficients, impact, P_act,
interventions and how far they move outputs. The CLI, the analysis, the experiments and the
report all ask through it. Saved through `l3d.io` (safetensors + JSON/YAML; nothing pickled)."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp

from l3d import io
from l3d.config import L3DConfig
from l3d.core.algorithm import (
    Evaluation,
    SubnetworkPair,
    check_memory,
    describe_memory,
    evaluate,
    step_bytes,
)
from l3d.core.distributed import Group
from l3d.core.divergences import (
    Divergence,
    DivergenceFn,
    Reference,
    ReferenceFn,
    get_divergence,
    get_reference,
)
from l3d.core.gradients import GradientSource, Method
from l3d.core.gradients.structured import Projection
from l3d.core.model import (
    Target,
    check_loaded,
    resolve_device,
    resolve_ranks,
    select_parameters,
)
from l3d.core.resampling import (
    SUBNETWORKS_PER_DIRECTION,
    dense_helpers_fit,
    effective_directions,
)
from l3d.core.samples import (
    Dataset,
    Inputs,
    SampleRows,
    batch_size_of,
    split_held_out,
    take,
    to_device,
)
from l3d.core.subnetworks import Subnetworks, subnetwork_index
from l3d.core.trainer import StepResult, Trainer
from l3d.errors import L3DError

EpochCallback = Callable[[Trainer, dict], None]

LOSS_LABELS = {"paper": "loss (eq. 8)", "pooled_squared": "pooled loss"}
HELD_OUT_SEED_OFFSET = 5
"""The held-out split (`heldout_fraction`) is drawn at the config's seed + this."""
"""How the training bar names the loss it trains (L3DConfig.loss)."""

NOISE_ULPS = 100
"""Round-off allowed in model outputs, in units in the last place of the largest output: an output
change below (NOISE_ULPS * eps * scale)^2 is indistinguishable from round-off (`output_change`)."""


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="epoch", desc="L3D", dynamic_ncols=True)


def gradient_source(
    target: Target,
    config: L3DConfig,
    divergence: Divergence,
    reference: Reference,
    *,
    dataset: Dataset | None = None,
    example: Inputs | None = None,
    method: str | Method | None = None,
    progress: bool = True,
) -> GradientSource:
    """The one place a GradientSource is configured from an L3DConfig (method: config's default;
    progress: bars for slow set-up such as building the Jacobian cache)."""
    return GradientSource(
        target,
        divergence,
        reference,
        per_token=config.per_token,
        method=config.gradient_method if method is None else method,
        chunk_size=config.chunk_size,
        sequence_chunk_size=config.sequence_chunk_size,
        dataset=dataset,
        example=example,
        progress=progress,
        # Unknown while n_subnetworks is 'auto' (its choice reads gradients from a source).
        projection=None
        if config.n_subnetworks == "auto"
        else Projection(config.n_v, resolve_ranks(target.names, config.rank)),
    )


def build(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
    progress: bool = True,
    shard_factors: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Target, GradientSource, Trainer]:
    """Everything a run needs, validated, before any training: the pieces behind `decompose`.
    Refuses, before allocating the subnetworks, a run whose training state and step would not
    fit in the device's memory; `log` gets the estimate (`describe_memory`)."""
    target, source, held_out, memory = _prepare(
        model, data, config, divergence, reference, progress
    )
    if log is not None:
        log(memory)
    generator = torch.Generator().manual_seed(config.seed)
    device, ranks = resolve_device(config.device), resolve_ranks(target.names, config.rank)
    # Factors are drawn on the CPU so a seed gives the same initialisation on every device.
    pair = SubnetworkPair.initialize(
        target.shapes, config.n_v, ranks, config.factorization, generator, device
    ).to(device)
    trainer = Trainer(config, source, pair, held_out=held_out, shard_factors=shard_factors)
    return target, source, trainer


def check_run(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
) -> tuple[L3DConfig, str]:
    """What `run` checks before training, without training or allocating the subnetworks: the
    model, data and divergence together, n_subnetworks 'auto' chosen, and the memory against the
    device. Returns the config as the run would use it and the memory estimate's line."""
    config = resolve_n_subnetworks(model, data, config, divergence, reference)
    *_, memory = _prepare(model, data, config, divergence, reference, progress=False)
    return config, memory


def _prepare(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: DivergenceFn | None,
    reference: ReferenceFn | None,
    progress: bool,
) -> tuple[Target, GradientSource, GradientSource | None, str]:
    """The target, the gradient sources (training, held out) and the memory estimate's line,
    after refusing a run that would not fit in the device's memory (`check_memory`)."""
    device = resolve_device(config.device)
    check_loaded(model)
    model.to(device)
    target = Target.create(model, config.params)
    ranks = resolve_ranks(target.names, config.rank)
    div = get_divergence(divergence or config.divergence)
    ref = get_reference(reference or config.reference, div)
    held_out = None
    if config.heldout_fraction > 0:
        # Seeded by the config alone: a resumed run holds out the same inputs.
        split = torch.Generator().manual_seed(config.seed + HELD_OUT_SEED_OFFSET)
        data, held = split_held_out(data, config.heldout_fraction, split)
        held_out = gradient_source(
            target, config, div, ref, dataset=Dataset(held, config.batch_size, device),
            progress=progress,
        )  # fmt: skip
    dataset = Dataset(data, config.batch_size, device)
    source = gradient_source(target, config, div, ref, dataset=dataset, progress=progress)
    n_v, factorization = config.n_v, config.factorization
    # Under a process group each rank holds its shard of every batch (docs/distributed.md).
    group = Group.current()
    per_rank = config.batch_size if group is None else -(-config.batch_size // group.size)
    batch = source.batch_memory(n_v, ranks, per_rank)
    step = step_bytes(batch, target.shapes, n_v, ranks, factorization)
    check_memory(target.shapes, n_v, ranks, factorization, device, step)
    memory = describe_memory(target.shapes, n_v, ranks, factorization, device, step)
    return target, source, held_out, memory


def decompose(
    model: nn.Module,
    data: object,
    *,
    params: Iterable[str] | str,
    n_subnetworks: int | None = None,
    rank: int | dict[str, int] = 1,
    top_k: float = 0.1,
    divergence: str | DivergenceFn = "mse",
    reference: str | ReferenceFn = "random",
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    callback: EpochCallback | None = None,
    shard_factors: bool = False,
    settings: str = "l3d",
    **options: Any,
) -> Decomposition:
    """Decompose `model`'s chosen parameter tensors into low-rank subnetworks (L3D, Algorithm 1).

    model: any torch module, frozen at its current weights W0; every forward runs it in eval mode
        and keeps its modules' own train/eval flags (`core.model.evaluating`).
    data: a tensor of inputs (n, ...), a dict of tensors (input_ids, attention_mask, ...), or a
        re-iterable of such batches (a DataLoader's labels are ignored).
    params: parameter names or glob patterns ('layers.*.weight'); the rest of the model stays fixed.
    n_subnetworks: None chooses it from the data: twice the number of directions the per-sample
        gradients at W0 spread over (`choose_n_subnetworks`); dead ones are reported at the end.
    divergence: 'mse', 'kl' (KL(p_ref || p_i) on logits), 'mse_authors' (the authors' toy code's
        gradient, to match their published numbers) or a callable (output, reference) -> scalar.
    reference: 'random' (another sample's output), 'mean', 'uniform' or a callable.
    options: any other L3DConfig field (factorization, loss, per_token, warm_start_epochs,
        resample_every, ...).
    progress: progress bars, and the memory estimate on stderr before training (`build`).
    callback: called as callback(trainer, epoch_record) after every epoch.
    shard_factors: under torch.distributed, each rank keeps only its range of subnetworks and
        their optimiser state between steps (FSDP2; docs/distributed.md). Same result.
    settings: 'l3d' adds `library_settings` (a schedule that keeps learning and, where dense
        per-sample gradients stay small, the gradient initialisation and resampling) to the
        paper's; 'paper' leaves every option at the paper's value (Appendix B.4: lr x0.8 every
        100 steps, no resampling, random factors). `options` win over either; the saved config
        records what was used.
    """
    if settings not in SETTINGS:
        raise L3DError(f"unknown settings {settings!r}: use one of {', '.join(SETTINGS)}")
    div = get_divergence(divergence)
    config = L3DConfig.create(
        params=[params] if isinstance(params, str) else list(params),
        n_subnetworks="auto" if n_subnetworks is None else n_subnetworks,
        rank=rank,
        top_k=top_k,
        divergence=div.name,
        reference=get_reference(reference, div).name,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        **options,
    )
    div_fn = divergence if callable(divergence) else None
    ref_fn = reference if callable(reference) else None
    config = resolve_n_subnetworks(model, data, config, div_fn, ref_fn)
    if settings == "l3d":
        parameters = dict(model.named_parameters())
        n_weights = sum(parameters[n].numel() for n in select_parameters(model, config.params))
        # A group the caller sets any field of stays the caller's (lr_decay_every=4 alone keeps
        # the paper's per-step unit).
        library = {
            k: v
            for group in library_settings(config, n_weights)
            if not any(k in options for k in group)
            for k, v in group.items()
        }
        config = config.replace(**library)
    group = Group.current()
    shown = progress and (group is None or group.lead)
    return run(
        model,
        data,
        config,
        divergence=div_fn,
        reference=ref_fn,
        progress=progress,
        callback=callback,
        shard_factors=shard_factors,
        log=_to_stderr if shown else None,
    )


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


SETTINGS = ("l3d", "paper")


def library_settings(config: L3DConfig, n_weights: int) -> list[dict[str, Any]]:
    """What `decompose` adds to the paper's settings by default, in groups that apply whole
    (docs/algorithm.md, "Library defaults"; each measured on the toys, docs/toys.md): lr x0.8
    every 10 % of the epochs (the paper's x0.8 per 100 steps leaves lr below 1e-5 after 100
    epochs of 1000 samples, so later epochs change nothing); and, where dense per-sample
    gradients stay small (`dense_helpers_fit`), the gradient initialisation and dead or
    duplicate subnetworks resampled every 10 % of the epochs during the first half."""
    every = max(1, config.epochs // 10)
    groups: list[dict[str, Any]] = [
        {"lr_decay": 0.8, "lr_decay_unit": "epoch", "lr_decay_every": every}
    ]
    if dense_helpers_fit(n_weights, config.n_v, config.batch_size, config.per_token):
        until = max(1, config.epochs // 2)
        groups += [{"init": "gradients"}, {"resample_every": every, "resample_until": until}]
    return groups


def resolve_n_subnetworks(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
    trainer_state: dict | None = None,
) -> L3DConfig:
    """`config` with n_subnetworks 'auto' replaced by a number: the count of the checkpoint being
    resumed (`trainer_state`), else `choose_n_subnetworks`'s."""
    if config.n_subnetworks != "auto":
        return config
    if trainer_state is not None:
        chosen = next(iter(trainer_state["pair"].values())).shape[0]  # (n_v, ...) factors
    else:
        chosen = choose_n_subnetworks(model, data, config, divergence, reference)
    return config.replace(n_subnetworks=chosen)


def choose_n_subnetworks(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
) -> int:
    """n_subnetworks from the data: SUBNETWORKS_PER_DIRECTION (2) times the participation ratio of
    the per-sample gradients at W0 (`effective_directions`), at least 2. The ratio is close to
    the number of circuits on the suite's toys, and twice as many subnetworks as circuits is what
    gave every circuit its own subnetwork there (docs/toys.md, "Library defaults"); at most the
    number of samples."""
    probe = config.replace(n_subnetworks=1, init="random")  # only its gradient source is used
    _, source, trainer = build(model, data, probe, divergence, reference, progress=False)
    names, n_weights = trainer.pair.v_out.names, trainer.pair.v_out.n_weights
    directions = effective_directions(source, names, n_weights, config.seed + 4)
    chosen = round(SUBNETWORKS_PER_DIRECTION * directions)
    n_samples = source.dataset.n_samples if source.dataset is not None else None
    if n_samples is not None and not config.per_token:
        # More subnetworks than samples cannot each find a sample of their own (and the
        # gradient initialisation needs one per subnetwork).
        chosen = min(chosen, n_samples)
    return max(2, chosen)


def run(
    model: nn.Module,
    data: object,
    config: L3DConfig,
    *,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
    progress: bool = True,
    callback: EpochCallback | None = None,
    trainer_state: dict | None = None,
    step_callback: Callable[[StepResult], None] | None = None,
    shard_factors: bool = False,
    log: Callable[[str], None] | None = None,
) -> Decomposition:
    """Run L3D from a config (the entry point for config files and resumed runs).

    divergence, reference: the callables of a config that names 'custom:...' ones.
    step_callback: called with each training step's StepResult (per-step progress of long epochs).
    shard_factors: see `decompose`.
    log: gets the memory estimate before training starts (`build`).
    Under an initialised torch.distributed process group, every rank calls `run` with the same
    arguments and takes its shard of every batch (docs/distributed.md); all return the same result.
    """
    config = resolve_n_subnetworks(model, data, config, divergence, reference, trainer_state)
    _target, source, trainer = build(
        model, data, config, divergence, reference, progress, shard_factors, log
    )
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
    lead = trainer.group is None or trainer.group.lead
    with _progress(config.epochs, progress and lead) as bar:
        bar.update(trainer.epoch)
        while trainer.epoch < config.epochs:
            record = trainer.run_epoch(on_step=step_callback)
            postfix = {
                LOSS_LABELS[config.loss]: f"{record['loss_' + config.loss]:.4f}",
                "live": record["live_subnetworks"],
            }
            if "loss_heldout_" + config.loss in record:
                postfix["held out"] = f"{record['loss_heldout_' + config.loss]:.4f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if callback is not None:
                callback(trainer, record)
    pair = trainer.final_pair()
    final = evaluate(pair, source, config.top_k, config.seed + 2, trainer.group)
    return Decomposition(
        config=config,
        subnetworks=pair,
        history=trainer.history,
        evaluation=final,
        model=model,
        divergence=divergence,
        reference=reference,
    )


def _chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` rows, none with a single row (a lone input has no
    other sample to serve as its reference), so the last remainder joins the previous chunk."""
    bounds = [*range(0, n, max(size, 2)), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        bounds.pop(-2)
    return [slice(a, b) for a, b in pairwise(bounds)]


class Decomposition:
    """The learned subnetworks of one L3D run and what can be asked of them."""

    def __init__(
        self,
        config: L3DConfig,
        subnetworks: SubnetworkPair,
        history: list[dict],
        evaluation: Evaluation,
        model: nn.Module,
        divergence: DivergenceFn | None = None,
        reference: ReferenceFn | None = None,
    ) -> None:
        self.config = config
        self.subnetworks = subnetworks
        self.history = history
        self.evaluation = evaluation
        self.model = model
        self.divergence = get_divergence(divergence or config.divergence)
        self.reference = get_reference(reference or config.reference, self.divergence)
        self.target = Target.create(model, subnetworks.v_out.names)
        self._source: GradientSource | None = None
        self.w0_fingerprint: dict[str, dict] | None = None
        self.frozen_fingerprint: dict[str, str] | None = None
        """The fingerprint `save` records (io.fingerprint); None: that of `target.w0`. `load`
        keeps the saved one, so re-saving never vouches for other weights."""

    # What was learned --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.subnetworks.parameters()).device

    @property
    def n_subnetworks(self) -> int:
        return self.config.n_v

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
        return self.subnetworks.v_out.direction(subnetwork_index(k, self.n_subnetworks))

    @torch.no_grad()
    def v_in(self, k: int) -> dict[str, Tensor]:
        """Subnetwork k's encoder direction, {param_name: tensor shaped like the parameter}."""
        return self.subnetworks.v_in.direction(subnetwork_index(k, self.n_subnetworks))

    def weight_norm(self) -> float:
        """Global L2 norm of the decomposed tensors at W0: the natural scale for δ."""
        return math.sqrt(sum(float(w.pow(2).sum()) for w in self.target.w0.values()))

    # Questions about samples -------------------------------------------------------------
    def gradient_source(self, inputs: Inputs) -> GradientSource:
        """Per-sample gradients under this decomposition's divergence and reference strategy:
        `.batch(inputs, references, generator)` gives them for one batch of any inputs.

        Built once, on the first inputs asked about: the structured backend where
        a decomposed tensor supports it (ResidMLP's 1000 x 50 layers: dense per-sample gradients
        took 2.5 s per 1000 samples), else torch.func; the cached Jacobians only pay off when the
        same samples come back epoch after epoch. Inputs of another shape, dtype or keys than
        those seen before are checked too, so that they fail in one line here as well."""
        if self._source is None:
            self._source = gradient_source(
                self.target,
                self.config,
                self.divergence,
                self.reference,
                example=to_device(inputs, self.device),
                method=Method.AUTO,
            )
        else:
            self._source.check(inputs)
        return self._source

    @torch.no_grad()
    def coefficients(
        self, inputs: Inputs, references: Tensor | None = None, seed: int | None = None
    ) -> Tensor:
        """c = V_in . grad_W D(f(x_i), y_ref) per sample, (n_samples, n_v) (eq. 3).

        references: reference outputs shaped like the model's outputs for `inputs` (detached), or
        None to draw them with the configured strategy among `inputs` (seeded by `seed`, default
        config.seed). With per_token, rows are the valid (sequence, position) samples in order.
        """
        inputs = to_device(inputs, self.device)
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        references = None if references is None else references.to(self.device)
        batch = self.gradient_source(inputs).batch(inputs, references, generator)
        return batch.project(self.subnetworks.v_in)

    @torch.no_grad()
    def evaluate(self, data: object, seed: int = 0, top_k: float | None = None) -> Evaluation:
        """P_act and both losses on any data (e.g. held-out samples), batched as in training; under
        a process group, each rank evaluates its shard of every batch."""
        source = gradient_source(
            self.target,
            self.config,
            self.divergence,
            self.reference,
            dataset=Dataset(data, self.config.batch_size, self.device),
            method=Method.AUTO,
        )
        # The config's own check of top_k (in (0, 1]): 0 or NaN must not mean the default.
        top_k = self.config.top_k if top_k is None else self.config.replace(top_k=top_k).top_k
        return evaluate(self.subnetworks, source, top_k, seed, Group.current())

    @torch.no_grad()
    def impact(
        self,
        inputs: Inputs,
        n_references: int = 10,
        seed: int = 0,
        *,
        chunk_size: int | None = None,
        progress: bool = False,
    ) -> Tensor:
        """I(x_i, v_k) = mean over n_references random references of |V_in_k . grad D| (eq. 10-11):
        the absolute value is taken before the mean, as the paper defines it. (n_samples, n_v).
        See `impacts` for how references are drawn."""
        return self.impacts(
            inputs,
            [self.subnetworks.v_in],
            n_references=n_references,
            seed=seed,
            chunk_size=chunk_size,
            progress=progress,
        )[0]

    @torch.no_grad()
    def impacts(
        self,
        inputs: Inputs,
        directions: Sequence[Subnetworks],
        *,
        n_references: int = 10,
        seed: int = 0,
        chunk_size: int | None = None,
        progress: bool = False,
    ) -> list[Tensor]:
        """The impact (see `impact`) of each set of directions, each (n_samples, n_v): the
        per-sample gradients of a chunk and reference are computed once and projected on every
        set, so a random-direction baseline costs no extra backward passes.

        References follow the decomposition's strategy within each chunk of `chunk_size` inputs
        (default: the training batch size), as during training; chunk c's reference j is drawn
        with seed `seed + c * n_references + j`. Under a process group, each rank computes a
        contiguous range of chunks and every rank returns all of them.
        """
        from tqdm.auto import tqdm

        if isinstance(n_references, bool) or not isinstance(n_references, int) or n_references < 1:
            raise L3DError(f"n_references must be an int >= 1; got {n_references!r}")
        size = chunk_size or self.config.batch_size
        chunks = list(enumerate(_chunks(batch_size_of(inputs), size)))
        group = Group.current()
        if group is not None:
            chunks = chunks[group.shard(len(chunks))]
            progress = progress and group.lead
        totals: list[list[Tensor]] = [[] for _ in directions]
        for c, rows in tqdm(chunks, desc="impact", unit="chunk", disable=not progress):
            chunk = to_device(take(inputs, rows), self.device)
            source = self.gradient_source(chunk)
            sums: list[Tensor] = []
            for j in range(n_references):
                generator = torch.Generator().manual_seed(seed + c * n_references + j)
                batch = source.batch(chunk, None, generator)
                c_abs = [batch.project(v).abs() for v in directions]
                sums = c_abs if not sums else [s + a for s, a in zip(sums, c_abs)]
            for parts, s in zip(totals, sums):
                parts.append((s / n_references).cpu())
        n_v = [d.n_subnetworks for d in directions]
        mine = [torch.cat(t) if t else torch.zeros(0, n) for t, n in zip(totals, n_v)]
        if group is None:
            return mine
        every, _ = group.gather_rows(torch.cat(mine, 1))  # one gather for all sets
        return [part.contiguous() for part in every.split(n_v, 1)]

    # Interventions (Section 2.5, eq. 9) ----------------------------------------------------
    def _direction(self, k: int, direction: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return self.v_out(k) if direction is None else direction

    @torch.no_grad()
    def intervene(
        self,
        inputs: Inputs,
        k: int,
        delta: float,
        *,
        params: Iterable[str] | None = None,
        direction: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """f(x, W0 + delta * v_k): the model's outputs with subnetwork k's unit direction added
        (eq. 9), on the tensors `params` only (default: all decomposed). direction: V_out_k if
        already materialised, or any other direction to move along."""
        self.gradient_source(inputs)  # inputs the model cannot take: one line, as elsewhere
        moved = self.target.moved(self._direction(k, direction), delta, params)
        return self.target.forward(to_device(inputs, self.device), moved)

    def _sample_inputs(self, inputs: Inputs, samples: Tensor | None) -> tuple[Inputs, Callable]:
        """The inputs holding the given sample rows (all if None), and a map from those inputs'
        outputs to the samples' output rows (n_samples, n_out)."""
        n = batch_size_of(inputs)
        rows = SampleRows.of(inputs, self.config.per_token)
        if samples is None:
            return inputs, lambda out: rows.rows(out).flatten(1)
        positions = rows.positions(n)[samples]
        needed, where = torch.unique(positions[:, 0], return_inverse=True)

        def select(out: Tensor) -> Tensor:
            if self.config.per_token:
                return out[where.to(out.device), positions[:, 1].to(out.device)]
            return out[where.to(out.device)].flatten(1)

        return take(inputs, needed), select

    @torch.no_grad()
    def output_change(
        self,
        inputs: Inputs,
        k: int,
        deltas: Sequence[float],
        samples: Tensor | None = None,
        direction: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """How far moving to W0 + delta * v_k moves each sample's output, per delta and sample:
        the divergence's intervention distance (KL(p(W0) || p(W0 + delta v_k)) for 'kl', the
        mean squared change otherwise), 0 at delta = 0. (len(deltas), n_samples), float32.

        Computed in float64 from the model's outputs and clamped at 0, so round-off never makes a
        change negative (see `output_change_and_floor` for the level below which a change is
        round-off). samples: indices of sample rows (as in `coefficients`) to measure, default
        all; only the inputs holding them are run. direction: V_out_k if already materialised."""
        return self.output_change_and_floor(inputs, k, deltas, samples, direction)[0]

    @torch.no_grad()
    def output_change_and_floor(
        self,
        inputs: Inputs,
        k: int,
        deltas: Sequence[float],
        samples: Tensor | None = None,
        direction: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, float]:
        """`output_change` and its noise floor: the largest change that round-off in the outputs
        alone can produce, (NOISE_ULPS * eps * scale)^2 with eps the outputs' machine epsilon
        (float32: 1.19e-7) and scale the largest |output| of the measured samples at W0, at least
        1 when the divergence reads probabilities (softmax is computed at that scale). Errors of
        NOISE_ULPS ulps of the scale in every output give a mean squared change or a KL (about
        half the p-weighted variance of the logit errors) at most this large; changes below it
        do not measure the subnetwork."""
        if not len(deltas):
            raise L3DError("no deltas given: pass the steps to measure, e.g. [0.5, 1.0]")
        sub, select = self._sample_inputs(inputs, samples)
        direction = self._direction(k, direction)
        base = select(self.intervene(sub, k, 0.0, direction=direction))
        scale = float(base.abs().max()) if base.numel() else 0.0
        if self.divergence.on_probabilities:
            scale = max(scale, 1.0)
        eps = torch.finfo(base.dtype).eps if base.is_floating_point() else 0.0
        floor = (NOISE_ULPS * eps * scale) ** 2
        changes = []
        for d in deltas:
            change = self._distance(select(self.intervene(sub, k, d, direction=direction)), base)
            if not torch.isfinite(change).all():
                raise L3DError(
                    f"δ = {d:g} along subnetwork {k} makes outputs that are not finite (the "
                    "moved weights overflow the model's arithmetic): use a smaller δ"
                )
            changes.append(change)
        return torch.stack(changes).cpu(), floor

    def _distance(self, moved: Tensor, base: Tensor) -> Tensor:
        """The divergence's distance per row, in float64 (float32 KL of nearly equal logits is
        round-off of either sign), clamped at 0 and returned as float32."""
        if moved.device.type == "mps":  # no float64 there
            moved, base = moved.cpu(), base.cpu()
        distance = self.divergence.distance(moved.double(), base.double())
        return distance.clamp(min=0).float()

    def output_derivative(
        self,
        inputs: Inputs,
        k: int,
        samples: Tensor | None = None,
        direction: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """d read(f(x_i, W0 + delta v_k)) / d delta at delta = 0, the outputs as the divergence
        reads them (softmax for 'kl', raw otherwise), by a forward-mode JVP along V_out_k:
        (n_samples, n_out) for the given sample rows (default all)."""
        self.gradient_source(inputs)  # inputs the model cannot take: one line, as elsewhere
        sub, select = self._sample_inputs(inputs, samples)
        sub = to_device(sub, self.device)
        tangent = self._direction(k, direction)

        def outputs(params: dict[str, Tensor]) -> Tensor:
            return self.divergence.read(self.target.forward(sub, params))

        with torch.no_grad():
            d_out = jvp(outputs, (self.target.w0,), ({n: tangent[n] for n in self.names},))[1]
        return select(d_out).cpu()

    @contextmanager
    def perturbed(self, k: int, delta: float) -> Iterator[nn.Module]:
        """The model's weights set to W0 + delta * v_k (eq. 9) inside the block, restored after,
        so any method of the model (generate, predict, ...) runs on the intervened network."""
        params = dict(self.model.named_parameters())
        moved = self.target.moved(self.v_out(k), delta)
        try:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(moved[name])
            yield self.model
        finally:
            with torch.no_grad():
                for name, w0 in self.target.w0.items():
                    params[name].copy_(w0)

    # Persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write config.yaml, decomposition.json and subnetworks.safetensors to `directory`, each
        atomically (l3d.io)."""
        evaluation = {
            "loss_paper": self.evaluation.loss_paper,
            "loss_pooled_squared": self.evaluation.loss_pooled_squared,
            "n_samples": self.evaluation.n_samples,
            "dead_subnetworks": self.dead_subnetworks,
        }
        fingerprint = self.w0_fingerprint or io.fingerprint(self.target.w0)
        frozen = self.frozen_fingerprint or io.frozen_fingerprint(self.model, self.names)
        return io.save_decomposition(
            directory,
            self.config,
            self.subnetworks,
            self.p_active,
            evaluation,
            self.history,
            fingerprint,
            frozen,
        )


def load(
    directory: str | Path,
    model: nn.Module,
    *,
    divergence: DivergenceFn | None = None,
    reference: ReferenceFn | None = None,
    allow_other_weights: bool = False,
) -> Decomposition:
    """Load a saved decomposition against `model`, refusing a model whose decomposed tensors have
    different names or shapes, or other values than those decomposed (their fingerprint, saved
    in decomposition.json, differs) unless allow_other_weights=True: coefficients, impacts and
    interventions of subnetworks learned on other weights are silently wrong.

    divergence, reference: the callables of a decomposition made with custom ones."""
    saved = io.read_decomposition(directory)
    params = dict(model.named_parameters())
    problems = []
    for name, shape in saved.shapes.items():
        if name not in params:
            problems.append(f"'{name}' is not a parameter of this model")
        elif tuple(params[name].shape) != shape:
            problems.append(f"'{name}' has shape {tuple(params[name].shape)}, saved {shape}")
    if problems:
        raise L3DError(
            f"the decomposition in {directory} does not fit this model: " + "; ".join(problems)
        )
    odd = next((n for n in saved.shapes if params[n].dtype != torch.float32), None)
    if odd is not None:
        dtype = str(params[odd].dtype).removeprefix("torch.")
        raise L3DError(
            f"the model's {odd} is {dtype}: l3d computes in float32; load the model in float32 "
            "(model.float()) before l3d.load"
        )
    fingerprint = saved.fingerprint
    if fingerprint is None:
        warnings.warn(
            f"{directory} was saved without a fingerprint of its weights (an older l3d): make "
            "sure the model has the weights it was decomposed on; save it again to add one",
            UserWarning,
            stacklevel=2,
        )
    elif not allow_other_weights:
        other = io.changed_since(fingerprint, {n: params[n] for n in saved.shapes})
        if other:
            raise L3DError(
                f"the decomposition in {directory} was made on other weights: "
                f"{', '.join(other)} differ{'s' if len(other) == 1 else ''} from the decomposed "
                "tensors (same shapes, other values); load it with the model it was made on (a "
                "run folder: restore the model its config.yaml names, or decompose again), or "
                "pass l3d.load(..., allow_other_weights=True) to use it anyway"
            )
    frozen = saved.frozen_fingerprint
    if frozen is not None and not allow_other_weights:
        digests = io.frozen_fingerprint(model, saved.shapes)
        differ = sorted(
            n for n in frozen.keys() | digests.keys() if frozen.get(n) != digests.get(n)
        )
        if differ:
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise L3DError(
                f"the decomposition in {directory} was made on a model whose other tensors "
                f"differ from this one's: {', '.join(differ[:3])}{more} (parameters not "
                "decomposed, or buffers such as BatchNorm statistics; absent on one side, or "
                "other values), and the subnetworks are of the whole function; load it with "
                "the model it was made on, or pass l3d.load(..., allow_other_weights=True) to "
                "use it anyway"
            )
    pair = saved.subnetworks.to(next(model.parameters()).device)
    ev = saved.meta["evaluation"]
    evaluation = Evaluation(
        saved.p_active, ev["loss_paper"], ev["loss_pooled_squared"], ev["n_samples"]
    )
    decomposition = Decomposition(
        saved.config, pair, saved.meta["history"], evaluation, model, divergence, reference
    )
    decomposition.w0_fingerprint = fingerprint
    decomposition.frozen_fingerprint = frozen
    return decomposition
