"""Data-parallel L3D (issue 15): step time, per-rank peak memory and bytes exchanged per step for
1, 2 and 4 processes on one global batch, through the trainer's own distributed step.

Settings (GPT-Neo with random weights built locally, per-token KL, every attention and MLP weight
decomposed, rank-r subnetworks, the structured gradient path):

  small  hidden 64, 2 layers, MLP 256, vocabulary 512: 16 tensors; 50 subnetworks of rank 4;
         16 sequences of 16 tokens (fits a CPU)
  whole  TinyStories-8M-shaped (hidden 256, 8 layers, MLP 1024, vocabulary 50,257): 48 tensors;
         400 subnetworks of rank 25; 16 sequences of 16 tokens (needs about 12 GB per rank for
         V_in, V_out, their gradients and AdamW state: data parallelism replicates them)

Each world size runs in its own processes (torch.multiprocessing.spawn; gloo on the CPU, NCCL on
one GPU per rank with --device cuda), so peak memory is their own. Per rank: the step's median
wall time over --steps steps after --warmup, its peak memory (the resident set size's peak above
its size after building model, data and subnetworks; on CUDA the allocator's peak), its median
CPU time per step (the work a rank does, which contention for cores does not inflate), and the bytes
it hands to collectives per step (counted at torch.distributed.all_gather / all_reduce), next to
the cost model of docs/distributed.md: all-gather of N x (n_v + 1) float32 (|c| and ||g||^2 of
every sample) and all-reduce of the gradients of every entry of V_in and V_out (float32).

With --shard-factors, V_in, V_out and their AdamW moments are sharded over the ranks (FSDP2): each
step all-gathers the factors and reduce-scatters their gradients instead of all-reducing them.
"state MB" is what the rank holds between steps: its factors, their gradients and AdamW moments
(counted from the tensors); "rss MB" the process's whole peak resident set.

With fewer CPU cores than processes, step times measure contention, not scaling.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --worlds 1,2,4
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --setting whole --subnetworks 40 \
        --shard-factors
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --setting whole --subnetworks 20
    python benchmarks/bench_distributed.py --setting whole --device cuda --worlds 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from itertools import cycle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l3d.config import L3DConfig
from l3d.core.distributed import Group
from l3d.decomposition import build
from l3d.hf import random_causal_lm, tinystories_8m_config

PARAMS = ["transformer.h.*.attn.attention.*_proj.weight", "transformer.h.*.mlp.c_*.weight"]
SETTINGS = {
    "small": dict(
        model=dict(
            vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
            attention_types=[[["global", "local"], 1]], window_size=16,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        ),
        n_subnetworks=50,
        rank=4,
    ),
    "whole": dict(model={}, n_subnetworks=400, rank=25),
}  # fmt: skip
SEQUENCES, TOKENS = 16, 16


def setting(name: str, device: str, n_subnetworks: int | None):
    spec = SETTINGS[name]
    config = tinystories_8m_config(**spec["model"])
    model = random_causal_lm(config)
    ids = torch.randint(
        0, config.vocab_size, (SEQUENCES, TOKENS), generator=torch.Generator().manual_seed(0)
    )
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    l3d_config = L3DConfig.create(
        params=PARAMS,
        n_subnetworks=n_subnetworks or spec["n_subnetworks"],
        rank=spec["rank"],
        divergence="kl",
        per_token=True,
        batch_size=SEQUENCES,
        lr=0.001,
        device=device,
    )
    return model, data, l3d_config


def memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def baseline(device: str) -> int:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Counter:
    """Bytes this rank hands to collectives (wrapping torch.distributed's): the tensors it sends
    to all_gather / all_reduce, and FSDP2's all-gather of factor shards and reduce-scatter of
    whole gradients."""

    def __init__(self) -> None:
        self.bytes = 0
        for name, sent in [
            ("all_gather", 1),
            ("all_reduce", 0),
            ("all_gather_single", 1),
            ("reduce_scatter_single", 1),
        ]:
            setattr(dist, name, self._counting(getattr(dist, name), sent))

    def _counting(self, collective, sent: int):
        def counted(*args, **kwargs):
            x = args[sent] if len(args) > sent else kwargs["input"]
            self.bytes += x.numel() * x.element_size()
            return collective(*args, **kwargs)

        return counted


def state_bytes(trainer) -> int:
    """Bytes of factors, their gradients and optimiser moments this rank holds (its shard)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [local(p) for p in trainer.pair.parameters()]
    tensors += [local(p.grad) for p in trainer.pair.parameters() if p.grad is not None]
    tensors += [
        local(v) for slots in trainer.optimizer.state.values() for v in slots.values() if v.dim()
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    device = args.device
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    model, data, config = setting(args.setting, device, args.subnetworks)
    _, source, trainer = build(
        model, data, config, progress=False, shard_factors=args.shard_factors
    )
    group = trainer.group
    counter = Counter() if group is not None else None
    base = baseline(device)
    batches = cycle(list(source.epoch(torch.Generator().manual_seed(0), group=group)))
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        if counter is not None and step == args.warmup:
            counter.bytes = 0
        batch = next(batches)
        if group is not None:
            dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    n_factors = sum(p.numel() for p in trainer.pair.parameters())
    # Sharded: all-gather of the factors (a rank sends its shard) and reduce-scatter of their
    # gradients (it sends the whole gradient). Else: an all-reduce of the gradients.
    exchanged = n_factors + -(-n_factors // world) if args.shard_factors else n_factors
    n_v = config.n_subnetworks
    result = {
        "world": world,
        "rank": rank,
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_bytes": memory(device) - (0 if device == "cuda" else base),
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state_bytes": state_bytes(trainer),
        "sent_bytes": 0 if counter is None else counter.bytes / args.steps,
        # The cost model: one all-gather of (N, n_v + 1) float32 (padded to the largest shard),
        # one of the shard sizes, the factors' exchange and an all-reduce of the two losses.
        "model_bytes": 0
        if group is None
        else 4 * (-(-SEQUENCES * TOKENS // world)) * (n_v + 1) + 8 + 4 * (exchanged + 2),
        "factor_entries": n_factors,
    }
    Path(out, f"{world}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--subnetworks", type=int, help="instead of the setting's number")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shard-factors", action="store_true", help="shard the factors (FSDP2)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in (int(w) for w in args.worlds.split(",")):
            mp.spawn(worker, args=(world, free_port(), args, out), nprocs=world, join=True)
            rows += [json.loads(Path(out, f"{world}-{r}.json").read_text()) for r in range(world)]
    assert Group.current() is None  # the parent joins no group
    n_v = args.subnetworks or SETTINGS[args.setting]["n_subnetworks"]
    print(
        f"setting {args.setting}, {n_v} subnetworks, {rows[0]['factor_entries']} factor entries, "
        f"on {args.device}, {args.threads} thread(s) per process, "
        f"factors {'sharded' if args.shard_factors else 'replicated'}"
    )
    print("world rank  step s   cpu s   peak MB  state MB    rss MB   sent kB/step   model kB/step")
    for r in rows:
        print(
            f"{r['world']:5d} {r['rank']:4d} {r['seconds']:7.3f} {r['cpu_seconds']:7.3f}"
            f" {r['peak_bytes'] / 1e6:9.1f} {r['state_bytes'] / 1e6:9.1f}"
            f" {r['rss_bytes'] / 1e6:9.1f}"
            f" {r['sent_bytes'] / 1e3:14.1f} {r['model_bytes'] / 1e3:15.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
