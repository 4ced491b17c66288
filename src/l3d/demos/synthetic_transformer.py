"""A small transformer (GPT-Neo, 2 layers) trained on a synthetic multi-task dataset whose tasks are
known, then decomposed at one attention block with the paper's language-model settings
(Section 3.5.1: one sample per token, KL(p_ref ‖ p_i), padding masked out).

Every sequence starts with a task-marker token:
  copy       [COPY a1..a5 SEP a1..a5]           repeat the symbols after a separator
  reverse    [REVERSE a1..a5 SEP a5..a1]        repeat them backwards
  induction  [INDUCTION r1..rL r1..r(11-L)]     distinct random symbols, repeated at a random
                                                offset L in 6..8: the next token is the one that
                                                followed the current token's earlier occurrence
  count      [COUNT a a+1 a+2 ...]              counting mod 12 from a random start; 8-11
                                                symbols, then padding

    python -m l3d.demos.synthetic_transformer --out runs/synthetic-transformer
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3d import controls
from l3d.cli import positive_int
from l3d.config import L3DConfig
from l3d.core.subnetworks import total
from l3d.demos.common import command_line, decompose_and_analyze, demo_arguments
from l3d.io import load_tensors, write_json, write_text

TASKS = ("copy", "reverse", "induction", "count")
PAD, SEP = 0, 1
MARKERS = {task: 2 + i for i, task in enumerate(TASKS)}
N_SYMBOLS = 12
FIRST_SYMBOL = 2 + len(TASKS)
VOCAB = FIRST_SYMBOL + N_SYMBOLS
SEQ_LEN = 12
BLOCK = [
    "transformer.h.1.attn.attention.*_proj.weight",
    "transformer.h.1.attn.attention.out_proj.bias",
]


class Vocabulary:
    """Decodes token ids to readable names (a stand-in for a tokenizer in the analysis)."""

    names = ("<pad>", "|", *(t.upper() for t in TASKS), *(str(i) for i in range(N_SYMBOLS)))

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.names[i] for i in ids)


def make_sequence(task: str, g: torch.Generator) -> tuple[list[int], list[int]]:
    """(tokens, answer positions): positions whose next token is determined by the task."""
    sym = lambda n: (torch.randint(0, N_SYMBOLS, (n,), generator=g) + FIRST_SYMBOL).tolist()  # noqa: E731
    marker = MARKERS[task]
    if task in ("copy", "reverse"):
        a = sym(5)
        b = a if task == "copy" else a[::-1]
        return [marker, *a, SEP, *b], list(range(6, 11))
    if task == "induction":
        n = int(torch.randint(6, 9, (1,), generator=g))
        r = (torch.randperm(N_SYMBOLS, generator=g)[:n] + FIRST_SYMBOL).tolist()
        return [marker, *r, *r[: SEQ_LEN - 1 - n]], list(range(1 + n, SEQ_LEN - 1))
    start, n = (
        int(torch.randint(0, N_SYMBOLS, (1,), generator=g)),
        int(torch.randint(8, 12, (1,), generator=g)),
    )
    tokens = [marker, *((start + i) % N_SYMBOLS + FIRST_SYMBOL for i in range(n))]
    return tokens, list(range(1, n))


def dataset(n_per_task: int, seed: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """({'input_ids', 'attention_mask'} (n, SEQ_LEN), task index per sequence (n,), answer mask
    (n, SEQ_LEN): positions whose next token the training loss scores), tasks interleaved."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_task * len(TASKS)
    ids = torch.full((n, SEQ_LEN), PAD)
    mask = torch.zeros(n, SEQ_LEN, dtype=torch.long)
    answer = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    tasks = torch.arange(n) % len(TASKS)
    for i in range(n):
        tokens, answers = make_sequence(TASKS[int(tasks[i])], g)
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        answer[i, answers] = True
    return {"input_ids": ids, "attention_mask": mask}, tasks, answer


def build_model(seed: int = 0) -> nn.Module:
    from l3d import hf

    config = hf.tinystories_8m_config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global"], 2]],
        max_position_embeddings=SEQ_LEN,
        bos_token_id=SEP,
        eos_token_id=SEP,
        pad_token_id=PAD,
    )
    return hf.random_causal_lm(config, seed=seed)


def train(model: nn.Module, steps: int, seed: int) -> list[float]:
    """AdamW on next-token cross-entropy at the answer positions, each task weighted equally,
    fresh sequences every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        data, tasks, answer = dataset(16, seed=10_000 + seed * steps + step)
        logits = model(**data).logits[:, :-1]
        ce = F.cross_entropy(logits.transpose(1, 2), data["input_ids"][:, 1:], reduction="none")
        scored = answer[:, :-1]
        per_task = (ce[scored & (tasks == t)[:, None]].mean() for t in range(len(TASKS)))
        loss = total(per_task) / len(TASKS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def task_accuracy(model: nn.Module, data: dict[str, Tensor], tasks: Tensor, answer: Tensor) -> dict:
    predicted = model(**data).logits[:, :-1].argmax(-1)
    correct = predicted == data["input_ids"][:, 1:]
    scored = answer[:, :-1]
    return {
        task: float(correct[(tasks == t)[:, None] & scored].float().mean())
        for t, task in enumerate(TASKS)
    }


def restricted_purity(
    analysis_dir: Path, live: Tensor, tasks: Tensor, answer: Tensor, n_top: int
) -> dict[str, float]:
    """Task purity of top samples drawn only from tokens after the task marker (position > 0),
    or only from answer positions, for the learned and the random directions: the marker token
    alone names the task, so a subnetwork keyed to it would be pure trivially."""
    from l3d.analysis import top_sample_purity

    saved = load_tensors(analysis_dir / "impact.safetensors", "the analysis's impacts")
    rows, positions = saved["sample_positions"].unbind(1)
    labels = tasks[rows].tolist()
    result = {}
    for name, keep in (("after_marker", positions > 0), ("answers", answer[rows, positions])):
        kept = [label for label, k in zip(labels, keep.tolist()) if k]
        learned = top_sample_purity(saved["impact"][keep], kept, n_top)[live.cpu()].mean()
        baseline = top_sample_purity(saved["impact_random_directions"][keep], kept, n_top).mean()
        result[f"purity_{name}"] = float(learned)
        result[f"purity_{name}_random_directions"] = float(baseline)
    return result


def main(argv: list[str] | None = None) -> dict:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--train-steps", type=positive_int, default=3000)
        parser.add_argument(
            "--n-per-task", type=positive_int, default=100, help="sequences per task to decompose"
        )
        parser.add_argument("--rank", type=positive_int, default=4)

    args = demo_arguments(__doc__ or "", epochs=40, n_subnetworks=16, extra=extra)(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model: Any = build_model(args.seed)  # a transformers LM: save_pretrained() is not nn.Module's
    start = time.perf_counter()
    train(model, args.train_steps, args.seed)
    train_seconds = time.perf_counter() - start
    model.save_pretrained(str(out / "model"))  # loadable with l3d.hf.load_causal_lm
    data, tasks, answer = dataset(args.n_per_task, seed=args.seed + 1)
    accuracy = task_accuracy(model, data, tasks, answer)
    print("answer accuracy per task:", {k: round(v, 3) for k, v in accuracy.items()})

    config = L3DConfig.create(
        params=BLOCK,
        n_subnetworks=args.n_subnetworks,
        rank=args.rank,
        top_k=0.1,
        divergence="kl",
        per_token=True,
        batch_size=16,
        lr=0.005,
        epochs=args.epochs,
        warm_start_epochs=min(2, args.epochs // 5),
        seed=args.seed,
    )
    decomposition, analysis, shared = decompose_and_analyze(
        model,
        data,
        config,
        out,
        tokenizer=Vocabulary(),
        labels=[TASKS[int(t)] for t in tasks],
        n_top=args.n_top,
        n_references=args.n_references,
        with_controls=not args.no_controls,
    )
    s = analysis["summary"]
    restricted = restricted_purity(
        out / "analysis", decomposition.p_active > 0, tasks, answer, args.n_top
    )
    summary = {
        "answer_accuracy": accuracy,
        "n_sequences": len(tasks),
        "n_token_samples": s["n_samples"],
        "block": BLOCK,
        "train_seconds": train_seconds,
        **shared,
        **restricted,
        "answer_share_of_top_tokens": sum(
            bool(answer[e["input"], e["position"]])
            for r in analysis["subnetworks"]
            for e in r["top_samples"]
        )
        / sum(len(r["top_samples"]) for r in analysis["subnetworks"]),
        "answer_share_of_tokens": float(answer[data["attention_mask"].bool()].float().mean()),
        "subnetworks": [
            {
                "index": r["index"],
                "p_active": r["p_active"],
                "purity": r["purity"],
                "top_tasks": [e["label"] for e in r["top_samples"]],
                "top_tokens": [f"{e['text']} [{e['token']}]" for e in r["top_samples"][:5]],
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
        f"L3D loss {s['loss_pooled_squared']:.3f} (pooled squared); top-{args.n_top} task purity "
        f"{s['purity']:.3f} vs random directions {s['purity_random_directions']:.3f} "
        f"(majority task {s['majority_label_fraction']:.3f}); tokens after the marker only: "
        f"{summary['purity_after_marker']:.3f} vs "
        f"{summary['purity_after_marker_random_directions']:.3f}; "
        f"answer positions only: {summary['purity_answers']:.3f} vs "
        f"{summary['purity_answers_random_directions']:.3f}"
    )
    return summary


if __name__ == "__main__":
    command_line(main)
