"""The trainer: runs Algorithm 1's steps over epochs with the paper's schedule (AdamW, learning-rate
decay, warm start, unit-norm projection of V_out), optional resampling, and a state that checkpoints
and resumes to the same result.

Under an initialised process group (core/distributed.py) the trainer is data parallel: each rank
steps on its shard of every batch and the summed gradients make every rank's step the same, so
the state (and its checkpoint) does not depend on the number of ranks. With `shard_factors`, each
rank keeps only its range of subnetworks and their AdamW moments between steps (FSDP2,
`distributed.shard_`); the state is still gathered whole, so it resumes on any number of ranks."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from l3d.config import L3DConfig
from l3d.core.algorithm import (
    DENSE_DIRECTIONS_MAX,
    Losses,
    Selection,
    SubnetworkPair,
    chunked_step,
    evaluate,
)
from l3d.core.distributed import Group, fingerprint, full, like, set_full_, shard_
from l3d.core.gradients import ChunkedGradients, GradientBatch, GradientSource, all_zero
from l3d.core.resampling import Resampler, initialize_from_gradients_
from l3d.errors import L3DError


@contextmanager
def single_thread_if(enabled: bool) -> Iterator[None]:
    """Run the block with one intra-op CPU thread, restoring the caller's setting after."""
    if not enabled:
        yield
        return
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run the block at torch's float32 matmul `precision`, restoring the caller's after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    losses: Losses
    active: Tensor
    """(n_v,) number of samples in which each subnetwork was in the top-k."""
    n_samples: int
    """Samples of the whole batch (all ranks)."""
    g_sq: Tensor
    """sum_i ||g_i||^2 over the whole batch, 0-d (read at the end of the first epoch)."""


class Trainer:
    """Runs Algorithm 1. State (subnetworks, optimiser, schedule, RNG, epoch) is all in
    `state_dict()`, so a run can be checkpointed and resumed to the same result. group: the
    data-parallel process group (default: the initialised one, if any); shard_factors: with a
    group, shard the factors and their optimiser state over its ranks (FSDP2)."""

    def __init__(
        self,
        config: L3DConfig,
        source: GradientSource,
        pair: SubnetworkPair,
        group: Group | None = None,
        held_out: GradientSource | None = None,
        shard_factors: bool = False,
    ) -> None:
        """held_out: inputs kept out of training (`heldout_fraction`), evaluated after every
        epoch."""
        self.config, self.source, self.pair = config, source, pair
        self.held_out = held_out
        self.group = Group.current() if group is None else group
        if config.init == "gradients":
            # Every rank the same: the same data and seed give the same gradients and centres.
            initialize_from_gradients_(
                pair, source, config.seed + 3, config.init_samples, config.init_swap_search
            )
        self.sharded = shard_factors and self.group is not None
        if self.sharded and config.n_v < cast(Group, self.group).size:
            # FSDP2 shards the subnetwork axis: a rank without a subnetwork cannot take part in
            # the in-place updates (a DTensor error at the first step); so few factors are small.
            logger.warning(
                "shard_factors: %d subnetwork(s) for %d processes; the factors stay whole",
                config.n_v,
                cast(Group, self.group).size,
            )
            self.sharded = False
        if self.group is not None:
            self._check_same_on_every_rank()
        if self.sharded:
            assert self.group is not None
            if config.chunk_size is not None and not config.per_token:
                raise L3DError(
                    "sharded factors do not combine with chunk_size without per_token (the "
                    "two-pass step runs several backwards per step); use sequence chunks or "
                    "unsharded factors"
                )
            shard_(pair, self.group)
        self.resampler = Resampler.from_config(config)
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        wd = config.weight_decay if config.optimizer == "adamw" else 0.0
        # The fused kernel updates every factor in one call: on toy problems the per-tensor
        # optimiser loop otherwise costs about as much as the rest of the step.
        self.optimizer = opt_cls(pair.parameters(), lr=config.lr, weight_decay=wd, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []

    def _check_same_on_every_rank(self) -> None:
        """Refuse ranks that would not step on the same global batches with the same factors:
        first the config (a different lr trains apart silently; different epochs or batch sizes
        hang in a collective), then W0, the factors and the data held in memory. Batches given
        as an iterable are compared as they come (`GradientSource.epoch`)."""
        group = cast(Group, self.group)
        # The device and the gradient path differ between ranks harmlessly.
        config = self.config.model_dump(
            mode="json", exclude={"device", "gradient_method", "chunk_size", "sequence_chunk_size"}
        )
        digest = hashlib.sha256(json.dumps([config, self.sharded], sort_keys=True).encode())
        # Three 48-bit words: exact in float64, as check_same compares.
        words = [int.from_bytes(digest.digest()[i : i + 6], "big") for i in (0, 6, 12)]
        group.check_same(torch.tensor(words, dtype=torch.float64), "config")
        group.check_same(self._fingerprint(), "decomposed weights, data or factors")

    def _fingerprint(self) -> Tensor:
        """Equal on every rank that will step on the same global batches: W0, the factors and
        the data held in memory (`distributed.fingerprint`)."""
        tensors = [*self.source.target.w0.values(), *self.pair.parameters()]
        data = self.source.dataset.inputs if self.source.dataset is not None else None
        if data is not None:
            tensors += [data] if isinstance(data, Tensor) else list(data.values())
        return fingerprint(tensors)

    def _check_state(self, state: dict) -> None:
        """Refuse a state that does not fit this run before loading any of it: factors of
        other names, shapes or dtypes, AdamW slots missing or shaped otherwise, non-finite
        values (they train on to a NaN decomposition), a negative second moment (its square
        root is NaN), a generator state of another size."""

        def bad(problem: str) -> L3DError:
            return L3DError(
                f"the saved training state does not fit this run: {problem} (a checkpoint edited "
                "or damaged? restore it, or delete the run's checkpoint folder to start over)"
            )

        def check(what: str, value: object, template: Tensor) -> Tensor:
            if not isinstance(value, Tensor):
                raise bad(f"{what} is missing")
            if value.shape != template.shape or value.dtype != template.dtype:
                raise bad(
                    f"{what} has shape {tuple(value.shape)} {value.dtype}, this run's "
                    f"{tuple(template.shape)} {template.dtype}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise bad(f"{what} is not finite")
            return value

        own = self._pair_state()
        pair = state.get("pair")
        if not isinstance(pair, dict) or set(pair) != set(own):
            raise bad("the factors' names differ")
        for name, template in own.items():
            check(f"factor {name}", pair[name], template)
        params = [full(p) for p in self.pair.parameters()]
        slots = state.get("optimizer", {}).get("state", {})
        for i, saved in slots.items():
            if not 0 <= int(i) < len(params) or not isinstance(saved, dict):
                raise bad(f"optimizer state {i} names no parameter")
            if "step" not in saved:
                raise bad(f"optimizer state {i} lacks step")
            # Every factor takes every optimizer step (set_to_none grads are all filled).
            if float(saved["step"]) != state.get("step"):
                raise bad(
                    f"optimizer state {i} is at step {float(saved['step']):g}, the run at "
                    f"{state.get('step')}"
                )
            for slot in ("exp_avg", "exp_avg_sq"):
                value = check(f"optimizer state {i} {slot}", saved.get(slot), params[int(i)])
                if slot == "exp_avg_sq" and bool((value < 0).any()):
                    raise bad(f"optimizer state {i} exp_avg_sq is negative")
        own_groups = self.optimizer.state_dict()["param_groups"]
        groups = state.get("optimizer", {}).get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(own_groups):
            raise bad("the optimizer's parameter groups differ")

        def plain(value: object) -> object:  # betas: a tuple in torch, a list from JSON
            return list(value) if isinstance(value, tuple) else value

        for i, (saved_group, own_group) in enumerate(zip(groups, own_groups)):
            # AdamW's settings follow from the config (lr from its schedule, set every step).
            for key in ("params", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
                saved_value = saved_group.get(key) if isinstance(saved_group, dict) else None
                expected = plain(own_group[key])
                if plain(saved_value) != expected:
                    said = "missing" if saved_value is None else repr(saved_value)
                    raise bad(f"param_groups[{i}].{key} is {said}, this run's {expected!r}")
        generator = check("the generator state", state.get("generator"), self.generator.get_state())
        try:
            torch.Generator().set_state(generator)
        except RuntimeError:
            raise bad("the generator state is not one torch can restore") from None

    def lr_at(self, step: int, epoch: int) -> float:
        c = self.config
        n = (step if c.lr_decay_unit == "step" else epoch) // c.lr_decay_every
        return c.lr * c.lr_decay**n

    def top_k_at(self, epoch: int) -> float:
        c = self.config
        return c.warm_start_top_k if epoch < c.warm_start_epochs else c.top_k

    def train_step(self, batch: GradientBatch) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        c = self.config
        with matmul_precision(c.matmul_precision):
            top_k = self.top_k_at(self.epoch)
            chosen: Selection
            if isinstance(batch, ChunkedGradients):
                result, chosen = chunked_step(
                    self.pair, batch, top_k, c.loss, self.group, c.gram_precision
                )
            else:
                paper, pooled, chosen = self.pair(batch, top_k, self.group, c.gram_precision)
                result = Losses(paper=paper, pooled_squared=pooled)
                result.get(c.loss).backward()
        result = result.detach()
        if self.group is not None:
            result = self._sum_over_ranks(result)
        self.optimizer.step()
        self.pair.v_out.normalize_()
        self.step += 1
        # Left on the device: run_epoch adds them up there and reads them once per epoch (GPU:
        # no host synchronisation per step).
        return StepResult(
            losses=result,
            active=chosen.active,
            n_samples=chosen.n_samples,
            g_sq=chosen.batch_g_sq.sum().detach(),
        )

    def _sum_over_ranks(self, shares: Losses) -> Losses:
        """Every rank's gradient and loss shares summed, in one all-reduce: each rank then holds
        the whole batch's gradient and takes the same step."""
        assert self.group is not None
        # Sharded, FSDP2 has already reduce-scattered the gradients: only the losses remain.
        params = [] if self.sharded else list(self.pair.parameters())
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        *summed, paper, pooled = self.group.all_reduce_sum(
            [*grads, shares.paper.reshape(1), shares.pooled_squared.reshape(1)]
        )
        for p, g in zip(params, summed):
            p.grad = g
        return Losses(paper=paper[0], pooled_squared=pooled[0])

    def _tiny(self) -> bool:
        """Small enough that every op is a few microseconds: extra CPU threads only add
        synchronisation, and on a shared machine they stall the step by orders of magnitude."""
        v = self.pair.v_out
        return self.config.device == "cpu" and v.n_subnetworks * v.n_weights <= DENSE_DIRECTIONS_MAX

    def run_epoch(self, on_step: Callable[[StepResult], None] | None = None) -> dict:
        start = time.perf_counter()
        device = next(self.pair.parameters()).device
        totals = torch.zeros(2, device=device, dtype=torch.float64)  # paper, pooled squared
        active = torch.zeros(self.config.n_v, device=device)
        g_sq = torch.zeros((), device=device, dtype=torch.float64)
        n_batches = n_samples = 0
        lr = self.lr_at(self.step, self.epoch)
        # The precision also covers the model's forward and backward that produce the gradients.
        with single_thread_if(self._tiny()), matmul_precision(self.config.matmul_precision):
            for batch in self.source.epoch(self.generator, group=self.group):
                r = self.train_step(batch)
                totals += torch.stack([r.losses.paper, r.losses.pooled_squared])
                active += r.active
                n_batches += 1
                n_samples += r.n_samples
                g_sq += r.g_sq
                if on_step is not None:
                    on_step(r)
        if n_batches == 0:
            raise L3DError(
                "no batch of the data holds a sample: every position is padding "
                "(attention_mask 0), or outside the pairs' positions"
            )
        if self.epoch == 0 and float(g_sq) == 0:
            raise all_zero("the first epoch found")
        if not bool(torch.isfinite(totals).all()):
            # NaN factors would be saved and trained on; the last finished epoch's are kept.
            raise L3DError(
                f"the loss is not finite at epoch {self.epoch} (paper {float(totals[0]):.3g}, "
                f"pooled {float(totals[1]):.3g}): training diverged at lr {lr:g}; lower lr and "
                "start again"
            )
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "loss_paper": float(totals[0]) / max(n_batches, 1),
            "loss_pooled_squared": float(totals[1]) / max(n_batches, 1),
            "lr": lr,
            "top_k": self.top_k_at(self.epoch),
            "live_subnetworks": int((active > 0).sum()),
            "seconds": time.perf_counter() - start,
        }
        if self.held_out is not None:
            # The same references every epoch (one seed), so the curve moves only with the
            # subnetworks; the top_k is the epoch's, the form the final evaluation reports.
            with (
                torch.no_grad(),
                single_thread_if(self._tiny()),
                matmul_precision(self.config.matmul_precision),
                self.gathered(),
            ):
                held = evaluate(
                    self.pair, self.held_out, record["top_k"], self.config.seed + 7, self.group
                )
            record["loss_heldout_paper"] = held.loss_paper
            record["loss_heldout_pooled_squared"] = held.loss_pooled_squared
        self.epoch += 1
        if self.resampler is not None:
            # Seeded by the epoch and reads only the trainer's state, so a resumed run replays it.
            with self.gathered(write_back=True):
                resampled = self.resampler(
                    self.pair, self.source, self.optimizer, self.epoch, self.top_k_at(self.epoch)
                )
            if resampled:
                record["resampled"] = resampled
        self.history.append(record)
        return record

    @contextmanager
    def gathered(self, write_back: bool = False) -> Iterator[None]:
        """Sharded factors whole for the block (every rank holds all of them, as unsharded), for
        the work outside the step: evaluation, resampling. write_back: the block's changes to the
        factors are kept (each rank keeps its rows); otherwise they are dropped."""
        if not self.sharded:
            yield
            return
        shards = list(self.pair.parameters())
        self.pair.unshard()  # type: ignore[operator]
        try:
            yield
            if write_back:
                for shard, whole in zip(shards, self.pair.parameters()):
                    set_full_(shard, whole)
        finally:
            self.pair.reshard()  # type: ignore[operator]

    def final_pair(self) -> SubnetworkPair:
        """The trained subnetworks as an ordinary module (sharded: gathered whole on every
        rank)."""
        if not self.sharded:
            return self.pair
        return SubnetworkPair.like(self.pair, self._pair_state())

    def _pair_state(self) -> dict[str, Tensor]:
        return {k: full(v) for k, v in self.pair.state_dict().items()}

    def state_dict(self) -> dict:
        """The whole state (sharded: gathered, a collective every rank must call)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {
            i: {slot: full(v) if isinstance(v, Tensor) else v for slot, v in slots.items()}
            for i, slots in optimizer["state"].items()
        }
        return {
            "pair": self._pair_state(),
            "optimizer": optimizer,
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        if not self.sharded:
            self.pair.load_state_dict(state["pair"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            own = dict(self.pair.named_parameters())
            for key, value in state["pair"].items():
                set_full_(own[key], value)
            params = list(self.pair.parameters())
            optimizer = dict(state["optimizer"])
            optimizer["state"] = {
                i: {
                    slot: like(v, params[int(i)]) if isinstance(v, Tensor) else v
                    for slot, v in slots.items()
                }
                for i, slots in state["optimizer"]["state"].items()
            }
            self.optimizer.load_state_dict(optimizer)
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
