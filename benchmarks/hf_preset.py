"""The paper's TinyStories-8M preset on a randomly initialised model of the same shape: time per
step, one epoch on a small token dataset, then every analysis output (impact, top tokens, top
logits, P_act, interventions incl. generation). Weights cannot be downloaded here, so the model
is saved to a temporary folder and loaded back by path, as a real checkpoint would be.

    python benchmarks/hf_preset.py --n-sequences 160 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from l3d import hf, run
from l3d.analysis import AnalysisOptions, generate, write_analysis


class IdTokenizer:
    """Shows token ids as '<id>' (the random model has no tokenizer of its own)."""

    pad_token_id = 50256

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    def __call__(self, text: str, return_tensors: str = "pt") -> dict:
        return {"input_ids": torch.tensor([[int(t) for t in text.split()]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sequences", type=int, default=160, help="sequences of 16 tokens")
    parser.add_argument("--n-analysis", type=int, default=32, help="sequences analysed")
    parser.add_argument("--n-references", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=4, help="sequences per vmap chunk")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="analysis folder (default: temp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = hf.get_preset("tinystories-8m")
    with tempfile.TemporaryDirectory() as tmp:
        hf.random_causal_lm(hf.tinystories_8m_config(), Path(tmp) / "model", seed=0)
        start = time.perf_counter()
        model = hf.load_causal_lm(Path(tmp) / "model")
        load_seconds = time.perf_counter() - start
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(8, preset.seq_len + 1, (args.n_sequences,), generator=g)
        token_ids = [torch.randint(0, 50257, (int(n),), generator=g) for n in lengths]
        data = hf.token_dataset(token_ids, seq_len=preset.seq_len, vocab_size=hf.vocab_size(model))
        config = preset.config(epochs=1, warm_start_epochs=0, chunk_size=args.chunk_size)
        start = time.perf_counter()
        decomposition = run(model, data, config)
        epoch_seconds = decomposition.history[0]["seconds"]
        n_steps = decomposition.history[0]["step"]
        total_seconds = time.perf_counter() - start
        out = args.out or Path(tmp) / "analysis"
        analysed = {k: v[: args.n_analysis] for k, v in data.items()}
        start = time.perf_counter()
        analysis = write_analysis(
            decomposition,
            analysed,
            out,
            tokenizer=IdTokenizer(),
            options=AnalysisOptions(n_references=args.n_references),
        )
        analysis_seconds = time.perf_counter() - start
        start = time.perf_counter()
        prompt = " ".join(str(int(t)) for t in data["input_ids"][0, :8])
        texts = [
            generate(decomposition, IdTokenizer(), prompt, k, d, 8)
            for k, d in ((None, 0), (0, 5.0))
        ]
        generate_seconds = time.perf_counter() - start
        files = sorted(p.name for p in out.iterdir())
    figures = {
        "threads": torch.get_num_threads(),
        "decomposed_parameters": sum(w.numel() for w in decomposition.target.w0.values()),
        "n_sequences": args.n_sequences,
        "token_samples": int(data["attention_mask"].sum()),
        "steps": n_steps,
        "seconds_per_step": epoch_seconds / n_steps,
        "epoch_seconds": epoch_seconds,
        "run_seconds_incl_final_evaluation": total_seconds,
        "load_by_path_seconds": load_seconds,
        "analysis_sequences": args.n_analysis,
        "analysis_seconds": analysis_seconds,
        "generate_seconds_2x8_tokens": generate_seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss_pooled_squared": decomposition.evaluation.loss_pooled_squared,
        "analysis_files": files,
        "n_subnetworks_analysed": len(analysis["subnetworks"]),
        "generation_differs_under_intervention": texts[0] != texts[1],
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
