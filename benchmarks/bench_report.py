"""Time and size of `l3d report`, and the time to open its pages in headless Chromium.

Two runs, both written without training:
- `lm`: shaped like the paper's TinyStories-8M decomposition (block h.4 attention: q/k/v/out
  weights 256 x 256 + out bias, 100 subnetworks of CP rank 25) with random factors (the worst
  case for PNG compression), 100 epochs of metrics, no analysis: the cost of the heatmaps;
- `large`: 1,000 subnetworks over a TMS-shaped model and N samples (default 100,000) of sparse
  20-feature vectors with labels, with a synthetic analysis (random sparse impacts): the cost of
  the index, the examples and the related-subnetwork tables at scale.

Prints seconds to write each report, the size of index.html, of one subnetwork page and of the
whole folder, and the seconds headless Chromium takes to load the index (to its load event) and
one subnetwork page, and to filter the index by a search.

    OMP_NUM_THREADS=1 python benchmarks/bench_report.py [--out /tmp/l3d-bench-report]
        [--samples 100000] [--only lm|large]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from l3d import io
from l3d.config import L3DConfig
from l3d.core.algorithm import SubnetworkPair
from l3d.report import write_report

# The synthetic analysed run and the Chromium driver are the report tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_report import Chromium, Page, _chromium, synthetic_run


def lm_run(run: Path, n_subnetworks: int = 100, rank: int = 25) -> Path:
    shapes = {f"transformer.h.4.attn.attention.{p}_proj.weight": (256, 256) for p in "qkv"}
    shapes |= {"transformer.h.4.attn.attention.out_proj.weight": (256, 256)}
    shapes |= {"transformer.h.4.attn.attention.out_proj.bias": (256,)}
    config = L3DConfig.create(
        params=list(shapes), n_subnetworks=n_subnetworks, rank=rank, divergence="kl", per_token=True
    )
    ranks = {n: rank for n in shapes}
    pair = SubnetworkPair.initialize(shapes, n_subnetworks, ranks, "cp", torch.Generator())
    p_active = torch.rand(n_subnetworks, generator=torch.Generator().manual_seed(0)) * 0.2
    p_active[: n_subnetworks // 10] = 0
    history = [
        {
            "epoch": i,
            "step": 625 * (i + 1),
            "loss_paper": 0.9 / (1 + 0.05 * i),
            "loss_pooled_squared": 0.6 / (1 + 0.05 * i),
            "lr": 1e-3,
            "top_k": 0.1,
            "live_subnetworks": n_subnetworks - n_subnetworks // 10,
            "seconds": 60.0,
        }
        for i in range(100)
    ]
    evaluation = {
        "loss_paper": history[-1]["loss_paper"],
        "loss_pooled_squared": history[-1]["loss_pooled_squared"],
        "n_samples": 160_000,
    }
    io.save_decomposition(run / "decomposition", config, pair, p_active, evaluation, history)
    return run


def measure(name: str, run: Path, browser: Chromium | None) -> None:
    start = time.perf_counter()
    index = write_report(run)
    seconds = time.perf_counter() - start
    files = [f for f in index.parent.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    page = max((index.parent / "subnetworks").glob("*.html"), key=lambda f: f.stat().st_size)
    label = f"the largest page, subnetworks/{page.name}"
    print(
        f"{name}: report written in {seconds:.1f} s; {len(files)} files, {size / 1e6:.1f} MB in "
        f"all; index.html {index.stat().st_size / 1e6:.2f} MB, {label} "
        f"{page.stat().st_size / 1e6:.3f} MB"
    )
    if browser is None:
        print("  (no chromium: opening times not measured)")
        return
    for shown, path in (("index.html", index), (label, page)):
        start = time.perf_counter()
        Page(browser, path.resolve().as_uri())
        print(f"  {shown} opened (load event) in {time.perf_counter() - start:.2f} s")
    opened = Page(browser, index.resolve().as_uri())
    start = time.perf_counter()
    count = opened.eval(
        "{ const s = document.getElementById('search'); s.value = '#99';"
        " s.dispatchEvent(new Event('input')); document.getElementById('count').textContent }"
    )
    print(f"  index search for '#99' shows {count} in {time.perf_counter() - start:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/l3d-bench-report")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--only", choices=["lm", "large"])
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    binary = _chromium()
    browser = Chromium(binary) if binary else None
    try:
        if args.only in (None, "lm"):
            measure("lm (100 subnetworks x 5 tensors, no analysis)", lm_run(out / "lm"), browser)
        if args.only in (None, "large"):
            run = synthetic_run(out / "large", n_v=1000, n_samples=args.samples)
            measure(f"large (1,000 subnetworks, {args.samples:,} samples)", run, browser)
    finally:
        if browser is not None:
            browser.close()
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
