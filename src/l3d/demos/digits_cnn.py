"""A small CNN with mobilenet-v3 blocks (depthwise conv, BatchNorm, squeeze-excite, hardswish)
trained on scikit-learn's 8x8 digits, then decomposed at one inverted-residual block with the
paper's vision settings (Section 3.5.2: all tensors of a middle block, KL over classes).

    python -m l3d.demos.digits_cnn --out runs/digits-cnn
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3d import controls
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.demos.common import command_line, decompose_and_analyze, demo_arguments
from l3d.io import save_tensors, write_json, write_text
from l3d.vision import check_classifier, ranks_by_fraction

BLOCK = "features.3.*"


class SqueezeExcite(nn.Module):
    """Channel gates from globally pooled features, as in mobilenet-v3."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (n, c, h, w)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise kxk, squeeze-excite, 1x1 project; BatchNorm after each conv."""

    def __init__(self, c_in: int, c_expand: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(c_in, c_expand, 1, bias=False), nn.BatchNorm2d(c_expand), nn.Hardswish()
            ),
            nn.Sequential(
                nn.Conv2d(
                    c_expand, c_expand, kernel, stride, kernel // 2, groups=c_expand, bias=False
                ),
                nn.BatchNorm2d(c_expand),
                nn.Hardswish(),
            ),
            SqueezeExcite(c_expand, max(8, (c_expand // 4 + 4) // 8 * 8)),  # torchvision's rounding
            nn.Sequential(nn.Conv2d(c_expand, c_out, 1, bias=False), nn.BatchNorm2d(c_out)),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class DigitsNet(nn.Module):
    """(n, 1, 8, 8) digit images -> (n, 10) logits; torchvision's mobilenet layout in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
            ),
            InvertedResidual(16, 32, 16, 3, 1),
            InvertedResidual(16, 48, 24, 3, 2),
            InvertedResidual(24, 64, 24, 3, 1),
            InvertedResidual(24, 72, 32, 3, 2),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as standardised (n, 1, 8, 8) images: train and test splits (3:1)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = 3 * len(x) // 4
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int = 30, seed: int = 0) -> list[float]:
    """AdamW with cosine decay on cross-entropy, with light shift augmentation."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--train-epochs", type=positive_int, default=15)

    args = demo_arguments(__doc__ or "", epochs=30, n_subnetworks=20, extra=extra)(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.seed)
    model = DigitsNet()
    start = time.perf_counter()
    train(model, x_train, y_train, args.train_epochs, args.seed)
    train_seconds = time.perf_counter() - start
    save_tensors(out / "model.safetensors", model.state_dict())
    test_accuracy = accuracy(model, x_test, y_test)
    check_classifier(model, x_test)

    # The decomposition sees held-out digits only; labels are used afterwards, for purity.
    config = L3DConfig.create(
        params=[BLOCK],
        n_subnetworks=args.n_subnetworks,
        rank=ranks_by_fraction(model, [BLOCK], 0.1),
        top_k=0.1,
        divergence="kl",
        batch_size=32,
        lr=0.005,
        epochs=args.epochs,
        warm_start_epochs=min(5, args.epochs // 5),
        seed=args.seed,
    )
    _, analysis, shared = decompose_and_analyze(
        model,
        x_test,
        config,
        out,
        labels=y_test.tolist(),
        class_names=[str(d) for d in range(10)],
        n_top=args.n_top,
        n_references=args.n_references,
        with_controls=not args.no_controls,
    )
    summary = {
        "test_accuracy": test_accuracy,
        "n_samples": len(x_test),
        "block": BLOCK,
        "train_seconds": train_seconds,
        **shared,
        "subnetworks": [
            {
                "index": r["index"],
                "p_active": r["p_active"],
                "purity": r["purity"],
                "top_labels": [e["label"] for e in r["top_samples"]],
                "pushes_up": [t["label"] for t in r["top_logits"]["positive"][:3]],
                "pushes_down": [t["label"] for t in r["top_logits"]["negative"][:3]],
            }
            for r in analysis["subnetworks"]
        ],
    }
    write_json(out / "summary.json", summary)
    if "controls" in summary:
        write_text(out / "controls.md", controls.markdown(summary["controls"]))
    print(
        f"test accuracy {test_accuracy:.3f}; L3D loss {summary['loss_pooled_squared']:.3f} (pooled "
        f"squared); top-{args.n_top} purity {summary['purity']:.3f} vs random directions "
        f"{summary['purity_random_directions']:.3f} "
        f"(majority class {summary['majority_label_fraction']:.3f})"
    )
    return summary


if __name__ == "__main__":
    command_line(main)
