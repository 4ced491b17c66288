"""The trainer: runs Algorithm 1's steps over epochs with the paper's schedule (AdamW, learning-rate
decay, warm start, unit-norm projection of V_out), optional resampling, and a state that checkpoints
and resumes to the same result.

Under an initialised process group (core/distributed.py) the trainer is data parallel: each rank
steps on its shard of every batch and the summed gradients make every rank's step the same, so
the state (and its checkpoint) does not depend on the number of ranks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
    step_losses,
)
from l3d.core.distributed import Group
from l3d.core.gradients import ChunkedGradients, GradientBatch, GradientSource
from l3d.core.resampling import Resampler


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


@dataclass(frozen=True)
class StepResult:
    losses: Losses
    active: Tensor
    """(n_v,) number of samples in which each subnetwork was in the top-k."""
    n_samples: int
    """Samples of the whole batch (all ranks)."""


class Trainer:
    """Runs Algorithm 1. State (subnetworks, optimiser, schedule, RNG, epoch) is all in
    `state_dict()`, so a run can be checkpointed and resumed to the same result. group: the
    data-parallel process group (default: the initialised one, if any)."""

    def __init__(
        self,
        config: L3DConfig,
        source: GradientSource,
        pair: SubnetworkPair,
        group: Group | None = None,
        held_out: GradientSource | None = None,
    ) -> None:
        """held_out: inputs kept out of training (`heldout_fraction`), evaluated after every
        epoch."""
        self.config, self.source, self.pair = config, source, pair
        self.held_out = held_out
        self.group = Group.current() if group is None else group
        if self.group is not None:
            self.group.check_same(self._fingerprint(), "decomposed weights, data or factors")
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

    def _fingerprint(self) -> Tensor:
        """Sums of W0, the factors and the data held in memory: equal on every rank that will
        step on the same global batches."""
        tensors = [*self.source.target.w0.values(), *self.pair.parameters()]
        data = self.source.dataset.inputs if self.source.dataset is not None else None
        if data is not None:
            tensors += [data] if isinstance(data, Tensor) else list(data.values())
        return torch.stack([t.detach().double().sum().cpu() for t in tensors])

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
        with matmul_precision(self.config.matmul_precision):
            top_k = self.top_k_at(self.epoch)
            chosen: Selection
            if isinstance(batch, ChunkedGradients):
                result, chosen = chunked_step(self.pair, batch, top_k, self.config.loss, self.group)
            else:
                result, chosen = step_losses(self.pair, batch, top_k, self.group)
                result.get(self.config.loss).backward()
        result = result.detach()
        if self.group is not None:
            result = self._sum_over_ranks(result)
        self.optimizer.step()
        self.pair.v_out.normalize_()
        self.step += 1
        # Left on the device: run_epoch adds them up there and reads them once per epoch (GPU:
        # no host synchronisation per step).
        return StepResult(losses=result, active=chosen.active, n_samples=chosen.n_samples)

    def _sum_over_ranks(self, shares: Losses) -> Losses:
        """Every rank's gradient and loss shares summed, in one all-reduce: each rank then holds
        the whole batch's gradient and takes the same step."""
        assert self.group is not None
        params = list(self.pair.parameters())
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
        active = torch.zeros(self.config.n_subnetworks, device=device)
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
                if on_step is not None:
                    on_step(r)
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
            ):
                held = evaluate(
                    self.pair, self.held_out, record["top_k"], self.config.seed + 7, self.group
                )
            record["loss_heldout_paper"] = held.loss_paper
            record["loss_heldout_pooled_squared"] = held.loss_pooled_squared
        self.epoch += 1
        if self.resampler is not None:
            # Seeded by the epoch and reads only the trainer's state, so a resumed run replays it.
            resampled = self.resampler(
                self.pair, self.source, self.optimizer, self.epoch, self.top_k_at(self.epoch)
            )
            if resampled:
                record["resampled"] = resampled
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {
            "pair": self.pair.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.pair.load_state_dict(state["pair"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = list(state["history"])
