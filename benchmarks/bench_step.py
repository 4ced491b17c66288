"""Time and peak memory of one L3D training step, four ways, side by side (issue 5).

Methods, each run in its own subprocess so that peak memory is its own:
  fast       what gradient_method='auto' picks: the structured path (or, for toys, the cached
             Jacobians), then the training step;
  torchfunc  our materialising torch.func path (gradient_method='vmap'): dense per-sample
             gradients, then the same training step;
  authors    a minimal re-implementation of the authors' approach: a batch jacrev over the vector
             of the batch's per-sample divergences (O(batch^2)), dense decode, dense normalisation;
  fast-bf16  fast with L3DConfig.gram_precision='bfloat16' (the Gram's products in bfloat16);
  floor      one plain forward + backward of the model on the same batch (sum of divergences,
             gradients of the decomposed tensors only).

Settings (issue 5):
  a   TMCS toy 10-5-10, batch 32, 10 subnetworks, rank 1 (1000 points; mse)
  b   TinyStories-8M-shaped GPT-Neo, random weights (hidden 256, 8 layers, vocab 50257): block
      h.4 attention q/k/v/out weights + out bias, 100 subnetworks, rank 25, 16 x 16 tokens, one
      sample per token, KL
  c   4-layer MLP of width 1024, batch 64, all weights, 100 subnetworks, rank 4 (mse)
  d   CIFAR-shaped ResNet (random weights and BatchNorm statistics): a 32-channel stem and two
      basic blocks at 32 x 32, a strided 64-channel block at 16 x 16, torchvision's habits
      (ReLU(inplace=True), `out += identity`); every convolution and BatchNorm tensor and the
      head (22 tensors, 103k weights), batch 64, 64 subnetworks, rank 2, KL over 10 classes
  e   DCGAN-shaped generator (random weights and BatchNorm statistics): a 64-channel 4 x 4 code
      up to a 3 x 32 x 32 image through three stride-2 transposed convolutions (64 -> 64 -> 32,
      kernel 4) with BatchNorm and ReLU(inplace=True), every tensor (8 tensors, 100k weights),
      batch 64, 64 subnetworks, rank 2, mse
  b-chunked  (b) in chunks of 4 sequences (sequence_chunk_size): the memory they save
  c2b (c) with batch 128;  c2w (c) with width 2048          (memory scaling)
  c4b (c) with batch 256                                     (time ratio against batch size)
  c400 (c) with 400 subnetworks                              (the Gram's n_v^2 growth)
  cbig, cbig-chunked  (c) with batch 4096, whole or in sample chunks of 512 (chunk_size):
      the memory the chunks save

--matmul-precision highest,medium runs every method at each float32 matmul precision (torch's
setting, which the trainer applies through L3DConfig.matmul_precision) and also prints the fast
path at the lower precision against the floor at 'highest' (the model's plain pass as users run it).

Time: median of --repeats steps after --warmup steps, wall clock and process CPU time (the latter
is less sensitive to other load on a shared machine). Peak memory: the process's peak
resident set size minus its size after building the model and data (CPU), or the CUDA allocator's
peak above the same point (GPU). "steady": the peak of the timed steps alone, above the memory in
use after the warm-up. On the CPU, glibc's default allocator keeps freed heap and reuses it, so
the resident size follows the live tensors only with MALLOC_MMAP_THRESHOLD_=131072 in the
environment (slower steps): take memory figures under it, times without.

    python benchmarks/bench_step.py --settings a,b,c,c2b,c2w --repeats 5
    python benchmarks/bench_step.py --settings c,c2b,c4b,cbig,cbig-chunked --methods fast,floor
    python benchmarks/bench_step.py --settings c,c400 --methods fast,fast-bf16,floor
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair, batch_top_k
from l3d.core.divergences import Reference, kl, mse, random_other
from l3d.core.gradients import GradientSource
from l3d.core.gradients.structured import Projection
from l3d.core.model import Target, resolve_ranks
from l3d.core.samples import Dataset, SampleRows, to_device
from l3d.core.trainer import Trainer

RANDOM = Reference("random", random_other)

METHODS = ("fast", "torchfunc", "authors", "floor")
# Extra methods, not in the default list.
FAST_BF16 = "fast-bf16"


class MLP(nn.Module):
    def __init__(self, width: int, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class TMCS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_in = nn.Parameter(torch.randn(5, 10, generator=g))
        self.W_out = nn.Parameter(torch.randn(10, 5, generator=g))
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_in.T @ self.W_out.T + self.b)


def trained_statistics(model: nn.Module) -> None:
    """Seeded BatchNorm running statistics as if trained (eval mode reads them)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, in its habits: ReLU(inplace=True), `out += identity`."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )
            if stride != 1 or inputs != outputs
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, 10)
        trained_statistics(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Generator(nn.Module):
    """DCGAN's generator at CIFAR size, from a 64 x 4 x 4 code."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, 2, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, 3, 4, 2, 1),
            nn.Tanh(),
        )
        trained_statistics(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def setting(name: str):
    """(model, data, L3DConfig, batch of inputs, authors' jacrev chunk) for a setting."""
    g = torch.Generator().manual_seed(0)
    if name == "a":
        from l3d.toys.data import sparse_features

        data = sparse_features(1000, 10, 0.05, generator=g)
        config = L3DConfig.create(params=["W_in", "W_out", "b"], n_subnetworks=10, rank=1)
        return TMCS(), data, config, data[:32], None
    if name in ("b", "b-chunked"):
        from l3d.hf import random_causal_lm, tinystories_8m_config

        model = random_causal_lm(tinystories_8m_config())
        ids = torch.randint(0, 50257, (16, 16), generator=g)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        config = L3DConfig.create(
            params=[
                "transformer.h.4.attn.attention.*_proj.weight",
                "transformer.h.4.attn.attention.out_proj.bias",
            ],
            n_subnetworks=100,
            rank=25,
            divergence="kl",
            per_token=True,
            batch_size=16,
            lr=0.001,
            sequence_chunk_size=4 if name == "b-chunked" else None,
        )
        return model, data, config, data, 8
    if name == "d":
        torch.manual_seed(0)
        # 1,024 images: their Jacobian cache (4 GiB) is past `auto`'s budget, as any real set's.
        data = torch.randn(1024, 3, 32, 32, generator=g)
        config = L3DConfig.create(
            params=["stem.*", "blocks.*", "head.weight"],
            n_subnetworks=64,
            rank=2,
            divergence="kl",
            batch_size=64,
        )
        return ResNet().eval(), data, config, data[:64], 16
    if name == "e":
        torch.manual_seed(0)
        data = torch.randn(1024, 64, 4, 4, generator=g)
        config = L3DConfig.create(params=["net.*"], n_subnetworks=64, rank=2, batch_size=64)
        return Generator().eval(), data, config, data[:64], 16
    width = 2048 if name == "c2w" else 1024
    batch = {"c2b": 128, "c4b": 256, "cbig": 4096, "cbig-chunked": 4096}.get(name, 64)
    torch.manual_seed(0)
    model = MLP(width)
    data = torch.randn(batch, width, generator=g)
    config = L3DConfig.create(
        params=["layers.*.weight"],
        n_subnetworks=400 if name == "c400" else 100,
        rank=4,
        batch_size=batch,
        chunk_size=512 if name == "cbig-chunked" else None,
    )
    return model, data, config, data, None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def high_water_bytes() -> int:
    """The process's resident high-water mark since the last `reset_peak` (Linux's VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak(cuda: bool) -> tuple[int, int]:
    """Restart the peak's count here (CUDA's allocator statistics, or VmHWM through
    /proc/self/clear_refs): the memory in use now, and the CUDA peak until now (0 on the CPU,
    whose process peak getrusage keeps)."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes(), 0


def initial_pair(target: Target, config: L3DConfig) -> SubnetworkPair:
    """The same seeded V_in, V_out for every method of a setting."""
    return SubnetworkPair.initialize(
        target.shapes,
        config.n_subnetworks,
        resolve_ranks(target.names, config.rank),
        config.factorization,
        torch.Generator().manual_seed(0),
    )


def make_step(method: str, model, data, config: L3DConfig, batch, chunk) -> tuple[Callable, str]:
    """A closure running one step of `method`, and what it ran (e.g. the path 'auto' chose)."""
    divergence = kl if config.divergence == "kl" else mse
    target = Target.create(model, config.params)
    generator = torch.Generator().manual_seed(1)
    pair = initial_pair(target, config)
    if method == FAST_BF16:
        config = config.replace(gram_precision="bfloat16")
    if method in ("fast", FAST_BF16, "torchfunc"):
        source = GradientSource(
            target,
            divergence,
            random_other,
            dataset=Dataset(data, config.batch_size),
            per_token=config.per_token,
            method="vmap" if method == "torchfunc" else "auto",
            chunk_size=config.chunk_size,
            sequence_chunk_size=config.sequence_chunk_size,
            projection=Projection(config.n_v, resolve_ranks(target.names, config.rank)),
        )
        trainer = Trainer(config, source, pair)
        batches = iter(())

        def step() -> None:
            nonlocal batches
            b = next(batches, None)
            if b is None:
                batches = source.epoch(generator)
                b = next(batches)
            trainer.train_step(b)

        n_chunk = config.sequence_chunk_size if config.per_token else config.chunk_size
        chunked = source.method == "structured" and n_chunk
        return step, source.method + (f", chunks of {n_chunk}" if chunked else "")
    if method == "floor":
        params = {n: w.clone().requires_grad_() for n, w in target.w0.items()}
        rows = SampleRows.of(batch, config.per_token)

        def step() -> None:
            outputs = target.forward(batch, params)
            refs = RANDOM.draw(outputs.detach(), rows, generator)
            vmap(divergence)(
                rows.rows(outputs).flatten(1), rows.rows(refs).flatten(1)
            ).sum().backward()

        return step, "forward+backward"
    return authors_step(target, pair, config, divergence, batch, generator, chunk), "batch jacrev"


def authors_step(target, pair, config, divergence, batch, generator, chunk) -> Callable:
    """The authors' step, minimally: g from a jacrev over the batch's per-sample divergences (each
    row a backward through the whole batch), dense V, dense decode and dense normalisation."""
    rows = SampleRows.of(batch, config.per_token)
    opt = torch.optim.Adam(pair.parameters(), lr=config.lr)
    with torch.no_grad():
        outputs = target.forward(batch)

    def divergences(params: dict[str, Tensor], refs: Tensor) -> Tensor:
        outputs = rows.rows(target.forward(batch, params)).flatten(1)
        return vmap(divergence)(outputs, rows.rows(refs).flatten(1))

    def step() -> None:
        refs = RANDOM.draw(outputs, rows, generator)
        jac = jacrev(divergences, chunk_size=chunk)(target.w0, refs)
        g = torch.cat([j.flatten(1) for j in jac.values()], 1)  # (n_s, n_w)
        v_in, v_out = pair.v_in.materialize_flat(), pair.v_out.materialize_flat()  # (n_v, n_w)
        c = g @ v_in.T
        g_hat = (c * batch_top_k(c, config.top_k)) @ v_out  # dense decode, (n_s, n_w)
        loss = (g - g_hat).pow(2).sum() / g.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            norms = pair.v_out.materialize_flat().norm(dim=1)  # dense normalisation
            for t in pair.v_out.tensors:
                t.scale_(1 / norms)

    return step


def worker(name: str, method: str, warmup: int, repeats: int, device: str, precision: str) -> dict:
    torch.manual_seed(0)
    if name == "a":
        # Microsecond-sized ops: extra threads only add synchronisation (the trainer does the same).
        torch.set_num_threads(1)
    # Every method runs at the same precision: globally, and in the trainer's steps via the config.
    torch.set_float32_matmul_precision(precision)
    model, data, config, batch, chunk = setting(name)
    config = config.replace(matmul_precision=precision)
    model = model.to(device).eval()
    data, batch = to_device(data, device), to_device(batch, device)
    cuda = device.startswith("cuda")
    step, detail = make_step(method, model, data, config, batch, chunk)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times, cpu_times = [], []
    warm, warm_peak = base, 0
    for i in range(warmup + repeats):
        if i == warmup:  # the steady state's peak: from here on, past the first batch's checks
            warm, warm_peak = reset_peak(cuda)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    steady = torch.cuda.max_memory_allocated() if cuda else high_water_bytes()
    peak = max(warm_peak, steady) if cuda else peak_rss_bytes()
    return {
        "setting": name,
        "method": method,
        "precision": precision,
        "detail": detail,
        "median_s": statistics.median(times),
        "times_s": times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_mb": max(0, peak - base) / 2**20,
        "steady_peak_mb": max(0, steady - warm) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="a,b,c,c2b,c2w")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--scaling-methods",
        default="fast,floor",
        help="methods for the scaling settings c2b, c2w, c4b, cbig, cbig-chunked (the baselines "
        "take minutes there)",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (setting, method)")
    parser.add_argument(
        "--matmul-precision",
        default="highest",
        help="comma-separated float32 matmul precisions (highest, high, medium) to run every "
        "method at (torch.set_float32_matmul_precision)",
    )
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument(
        "--worker", nargs=3, metavar=("SETTING", "METHOD", "PREC"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        name, method, precision = args.worker
        result = worker(name, method, args.warmup, args.repeats, args.device, precision)
        print("RESULT " + json.dumps(result))
        return
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    results = []
    precisions = args.matmul_precision.split(",")
    for name in args.settings.split(","):
        by_precision = {}
        for precision in precisions:
            methods = args.methods if name in ("a", "b", "c", "d", "e") else args.scaling_methods
            rows = {m: run_worker(name, m, precision, args) for m in methods.split(",")}
            results += rows.values()
            label = name if len(precisions) == 1 else f"{name} at {precision}"
            print_ratios(label, rows, rows.get("floor", {}))
            by_precision[precision] = rows
        if "highest" in by_precision:
            floor = by_precision["highest"].get("floor", {})
            for precision in [p for p in precisions if p != "highest"]:
                label = f"{name} fast at {precision} vs floor at highest"
                print_ratios(label, {"fast": by_precision[precision].get("fast", {})}, floor)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run_worker(name: str, method: str, precision: str, args: argparse.Namespace) -> dict:
    """One (setting, method, precision) in its own process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--worker", name, method, precision]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device]
    row = {"setting": name, "method": method, "precision": precision}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        else:
            row = json.loads(line[len("RESULT ") :])
    except subprocess.TimeoutExpired:
        row["error"] = "timeout"
    if "error" in row:
        print(f"{name:4s} {method:10s} {precision:8s} FAILED: {row['error']}", flush=True)
    else:
        print(
            f"{name:4s} {method:10s} {precision:8s} {row['median_s'] * 1e3:10.1f} ms/step wall "
            f"{row['median_cpu_s'] * 1e3:10.1f} ms CPU  peak +{row['peak_mb']:8.1f} MB  "
            f"(steady +{row['steady_peak_mb']:.1f} MB)  ({row['detail']})",
            flush=True,
        )
    return row


def print_ratios(name: str, rows: dict, floor: dict) -> None:
    fast = rows.get("fast", {})
    if "median_s" not in fast:
        return
    parts = []
    for other in ("torchfunc", "authors"):
        if "median_s" in rows.get(other, {}):
            wall = rows[other]["median_s"] / fast["median_s"]
            cpu = rows[other]["median_cpu_s"] / fast["median_cpu_s"]
            parts.append(f"{wall:.1f}x faster than {other} (CPU time {cpu:.1f}x)")
    if "median_s" in floor:
        wall = fast["median_s"] / floor["median_s"]
        cpu = fast["median_cpu_s"] / floor["median_cpu_s"]
        parts.append(f"{wall:.1f}x the floor's time (CPU time {cpu:.1f}x)")
        if floor["peak_mb"] > 0:
            parts.append(f"{fast['peak_mb'] / floor['peak_mb']:.1f}x the floor's peak memory")
    if parts:
        print(f"{name:4s} fast path: " + ", ".join(parts), flush=True)
    low = rows.get(FAST_BF16, {})
    if "median_s" in low:
        line = f"{name:4s} fast path, bfloat16 Gram: "
        line += f"{fast['median_cpu_s'] / low['median_cpu_s']:.2f}x faster (CPU time)"
        if "median_s" in floor:
            line += f", {low['median_cpu_s'] / floor['median_cpu_s']:.1f}x the floor's CPU time"
        print(line, flush=True)


if __name__ == "__main__":
    main()
