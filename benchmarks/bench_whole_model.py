"""Time and peak memory of one L3D step over whole-model scopes of a small language model.

TinyStories-8M-shaped GPT-Neo (hidden 256, 8 layers, MLP 1024, vocabulary 50,257) with random
weights built locally, per-token KL against random references, 16 sequences of 16 tokens, rank 25,
`gradient_method='auto'` (the structured path). Scopes:

  block      block h.4 attention: q/k/v/out weights and the out bias (5 tensors)
  attention  every attention weight: q/k/v/out of all 8 blocks (32 tensors of 256 x 256)
  all        every attention and MLP weight (48 tensors: 32 + 8 of 1024 x 256 + 8 of 256 x 1024)

Each (scope, subnetworks) runs in its own process, so peak memory is its own. In it the model's
plain forward + backward (the floor: one backward of the summed divergences, gradients of the
decomposed tensors only) and the L3D step alternate, floor first, so that every step has its
floor measured next to it and the ratio holds when the machine's speed drifts. Times are the
median step's wall clock and process CPU time (the latter far less sensitive to other load on a
shared machine; with one thread it equals the wall clock of an idle machine); the ratio to the
floor and the paper-schedule hours are taken in CPU time. Peak memory is the process's peak
resident set size above its size after building model, data and subnetworks; the floor's peak is
read before the first L3D step. Before the steps the worker prints the training
state's size (V_in, V_out, gradients, AdamW moments); the factors are part of the base, their
gradients and AdamW moments, allocated by the first step, part of the peak. "est GiB" is what
the library predicts for that peak before a run (three quarters of the training state plus
`step_bytes`: activations, signals, kept products, the Gram's working set), the figure
`l3d decompose` prints and checks against the device's memory.

--parts also times the step's parts one by one, each the minimum CPU time of --repeats runs: the
gradient signals of one batch (forward, per-token backwards), the projections onto V_in and V_out
with their backward, the Gram matrix of V_out with its backward, and the AdamW update (the
figures that docs/scaling.md's cost model is checked against).

    OMP_NUM_THREADS=1 python benchmarks/bench_whole_model.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/bench_whole_model.py --scopes all --subnetworks 100
    OMP_NUM_THREADS=1 python benchmarks/bench_whole_model.py --gram-precision float32,bfloat16

--gram-precision runs each (scope, subnetworks) once per value of L3DConfig.gram_precision, in
a process of its own (the ratio to the floor is measured within each).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_step import initial_pair, make_step, peak_rss_bytes, rss_bytes

from l3d.config import L3DConfig
from l3d.core.algorithm import step_bytes, training_bytes
from l3d.core.divergences import kl, random_other
from l3d.core.gradients import GradientSource
from l3d.core.model import Target, resolve_ranks
from l3d.core.samples import Dataset
from l3d.hf import random_causal_lm, tinystories_8m_config

ATTENTION = "transformer.h.{block}.attn.attention.*_proj.weight"
SCOPES = {
    "block": [ATTENTION.format(block=4), "transformer.h.4.attn.attention.out_proj.bias"],
    "attention": [ATTENTION.format(block="*")],
    "all": [ATTENTION.format(block="*"), "transformer.h.*.mlp.c_*.weight"],
}
# Steps of the paper's language-model schedule, for the hours column.
PAPER_STEPS = 62_500


def setting(scope: str, n_subnetworks: int, seq: int, batch: int, gram_precision: str):
    """(model, data, config) of one scope."""
    model = random_causal_lm(tinystories_8m_config())
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = L3DConfig.create(
        params=SCOPES[scope],
        n_subnetworks=n_subnetworks,
        rank=25,
        divergence="kl",
        per_token=True,
        batch_size=batch,
        lr=0.001,
        gram_precision=gram_precision,
    )
    return model, data, config


def worker(args: argparse.Namespace, scope: str, n_subnetworks: int, precision: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, data, config = setting(scope, n_subnetworks, args.tokens, args.sequences, precision)
    target = Target.create(model, config.params)
    state = training_bytes(
        target.shapes, n_subnetworks, resolve_ranks(target.names, 25), config.factorization
    )
    print(
        f"{scope}: {len(target.names)} tensors, {n_subnetworks} subnetworks; training state "
        f"(V_in, V_out, gradients, AdamW) {state / 2**30:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    ranks = resolve_ranks(target.names, 25)
    source = GradientSource(
        target, kl, random_other, dataset=Dataset(data, config.batch_size), per_token=True
    )
    batch = source.batch_memory(n_subnetworks, ranks, config.batch_size)
    estimate = step_bytes(batch, target.shapes, n_subnetworks, ranks, config.factorization)
    del source
    floor, _ = make_step("floor", model, data, config, data, None)
    fast, detail = make_step("fast", model, data, config, data, None)
    gc.collect()
    base = rss_bytes()
    floor_times, fast_times = [], []

    def timed(step) -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - start, time.process_time() - cpu_start

    for _ in range(args.warmup):
        timed(floor)
    floor_peak = peak_rss_bytes()
    for _ in range(args.warmup):
        timed(fast)
    for _ in range(args.repeats):
        floor_times.append(timed(floor))
        fast_times.append(timed(fast))
    ratios = [a[1] / b[1] for a, b in zip(fast_times, floor_times)]
    peak = peak_rss_bytes()  # before the parts, which build a second pair and optimiser
    parts = part_times(target, data, config, args.repeats) if args.parts else {}
    return {
        "parts_s": parts,
        "scope": scope,
        "gram_precision": precision,
        "tensors": len(target.names),
        "subnetworks": n_subnetworks,
        "threads": args.threads,
        "detail": detail,
        "step_s": statistics.median(t for t, _ in fast_times),
        "step_cpu_s": statistics.median(c for _, c in fast_times),
        "floor_cpu_s": statistics.median(c for _, c in floor_times),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "peak_gb": max(0, peak - base) / 2**30,
        "floor_peak_gb": max(0, floor_peak - base) / 2**30,
        "state_gb": state / 2**30,
        # What the peak above the built factors should be: their gradients and AdamW's moments
        # (three quarters of the state) and what one step adds (`step_bytes`).
        "estimate_gb": (0.75 * state + estimate) / 2**30,
        "estimate_parts_gb": {
            "activations": batch.activations / 2**30,
            "gradients": batch.gradients / 2**30,
            "kept": batch.kept / 2**30,
            "gram and rest": (estimate - batch.activations - batch.gradients - batch.kept) / 2**30,
        },
    }


def part_times(target: Target, data: dict, config: L3DConfig, repeats: int) -> dict[str, float]:
    """CPU seconds of each part of one step (the minimum over `repeats` runs)."""
    source = GradientSource(
        target, kl, random_other, dataset=Dataset(data, config.batch_size), per_token=True
    )
    pair = initial_pair(target, config)
    optimizer = torch.optim.AdamW(pair.parameters(), lr=config.lr, fused=True)
    generator = torch.Generator().manual_seed(1)
    batch = next(source.epoch(generator))

    def signals() -> None:
        next(source.epoch(generator))

    def projections() -> None:
        c, d = batch.project(pair.v_in), batch.project(pair.v_out)
        (c.square().sum() + d.square().sum()).backward()

    def gram() -> None:
        pair.v_out.gram(config.gram_precision).square().sum().backward()

    parts = {"signals": signals, "projections": projections, "gram": gram, "adamw": optimizer.step}
    times = {}
    for name, part in parts.items():
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            part()
            runs.append(time.process_time() - start)
        times[name] = min(runs)
    return times


def run_worker(args: argparse.Namespace, scope: str, n_subnetworks: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", scope, str(n_subnetworks), precision]
    for flag in ("threads", "warmup", "repeats", "tokens", "sequences"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    cmd += ["--parts"] if args.parts else []
    row: dict = {"scope": scope, "subnetworks": n_subnetworks, "gram_precision": precision}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            # A worker killed for memory prints nothing: say so rather than a Python traceback.
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row["error"] = f"exit {proc.returncode}: {last}"
        else:
            row = json.loads(line[len("RESULT ") :])
    except subprocess.TimeoutExpired:
        row["error"] = f"timeout ({args.timeout:.0f} s)"
    if "error" in row:
        print(f"{scope:9s} {n_subnetworks:5d} {precision:8s}  FAILED: {row['error']}", flush=True)
    else:
        hours = row["step_cpu_s"] * PAPER_STEPS / 3600
        print(
            f"{scope:9s} {n_subnetworks:5d} {precision:8s} {row['tensors']:4d} "
            f"{row['step_s']:8.2f} {row['step_cpu_s']:8.2f} {row['floor_cpu_s']:8.3f} "
            f"{row['ratio']:8.1f} {row['peak_gb']:+8.2f} "
            f"{row['floor_peak_gb']:+8.2f} {row['state_gb']:8.2f} {hours:9.1f} "
            f"{row['estimate_gb']:+8.2f}",
            flush=True,
        )
        if row["parts_s"]:
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in row["parts_s"].items())
            print(f"{'':24s} parts: {parts}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scopes", default="block,attention,all", help="of: " + ",".join(SCOPES))
    parser.add_argument("--subnetworks", default="100,400", help="comma-separated n_v values")
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=16, help="sequences per batch")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per (scope, size)")
    parser.add_argument("--parts", action="store_true", help="also time the step's parts")
    parser.add_argument(
        "--gram-precision", default="float32", help="comma-separated L3DConfig.gram_precision"
    )
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument(
        "--worker", nargs=3, metavar=("SCOPE", "N_V", "GRAM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        result = worker(args, args.worker[0], int(args.worker[1]), args.worker[2])
        print("RESULT " + json.dumps(result))
        return
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU cores, "
        f"load average at start {os.getloadavg()[0]:.2f}; {args.sequences} x {args.tokens} "
        f"tokens, rank 25; median of {args.repeats} steps after {args.warmup} warm-up"
    )
    columns = "wall s    CPU s  floor s  x floor peak GiB flr GiB stat GiB  paper h  est GiB"
    print(f"scope        n_v gram     tens   {columns}")
    results = []
    for scope in args.scopes.split(","):
        for n_subnetworks in (int(n) for n in args.subnetworks.split(",")):
            for precision in args.gram_precision.split(","):
                results.append(run_worker(args, scope, n_subnetworks, precision))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
