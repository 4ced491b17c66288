"""Per-token gradients of every tensor of tiny random causal LMs of eleven transformers families
equal a loop of autograd calls, on a batch with left- and right-padded rows. Each tensor takes the
structured path (a tied token embedding as the sum of its lookup's and its head's signals) except
the ones whose layout cannot (broadcast or mask-indexed positions). Guards the layouts a
transformers release could change."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from l3d.core.divergences import kl  # noqa: E402
from l3d.core.gradients import GradientSource  # noqa: E402
from l3d.core.model import Target  # noqa: E402

VOCAB = 64
SMALL = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}
LLAMA_LIKE = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    **SMALL,
}
GEMMA_LIKE = {**LLAMA_LIKE, "head_dim": 8}
# {family: (config class, options, {tensor: the reason it takes the generic path})}
FAMILIES = {
    "gpt2": (
        "GPT2Config",
        {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64, **SMALL},
        {"transformer.wpe.weight": "output not batched"},
    ),
    "llama-tied": ("LlamaConfig", {**LLAMA_LIKE, "tie_word_embeddings": True}, {}),
    "llama-untied": ("LlamaConfig", {**LLAMA_LIKE, "tie_word_embeddings": False}, {}),
    "qwen2": ("Qwen2Config", {**LLAMA_LIKE, "tie_word_embeddings": True}, {}),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": 4}, {}),
    "phi": (
        "PhiConfig",
        {**LLAMA_LIKE, "num_key_value_heads": 2, "partial_rotary_factor": 0.5},
        {},
    ),
    "phi3": ("Phi3Config", LLAMA_LIKE, {}),
    "opt": (
        "OPTConfig",
        {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "word_embed_proj_dim": 16, "max_position_embeddings": 64, **SMALL},
        {"model.decoder.embed_positions.weight": "used outside them"},
    ),
    "gpt-neox": (
        "GPTNeoXConfig",
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "max_position_embeddings": 64, "rotary_pct": 0.5, **SMALL},
        {},
    ),
    "gemma": ("GemmaConfig", GEMMA_LIKE, {}),
    "gemma2": ("Gemma2Config", {**GEMMA_LIKE, "sliding_window": 4}, {}),
}  # fmt: skip


def build(family: str) -> torch.nn.Module:
    name, options, _ = FAMILIES[family]
    config = getattr(transformers, name)(**options)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norm scales start at one, biases at zero: make every tensor generic
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (4, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right-padded
    mask[2, :3] = 0  # left-padded
    return {"input_ids": ids * mask, "attention_mask": mask}


def gradients_by_loop(model, names, inputs, references) -> dict[str, torch.Tensor]:
    """Each valid token's gradient by its own backward call: the oracle."""
    params = dict(model.named_parameters())
    logits = model(**inputs).logits
    rows = [
        torch.autograd.grad(
            kl(logits[i, t], references[i, t]), [params[n] for n in names], retain_graph=True
        )
        for i, t in inputs["attention_mask"].nonzero().tolist()
    ]
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tensor_of_a_causal_lm_family(family):
    model = build(family)
    inputs = padded_batch()
    target = Target.create(model, ["*"])
    with torch.no_grad():
        shape = model(**inputs).logits.shape
    references = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(9))
    source = GradientSource(
        target, "kl", "random", per_token=True, method="structured", example=inputs,
        progress=False,
    )  # fmt: skip
    fast = source.batch(inputs, references).dense()
    oracle = gradients_by_loop(model, target.names, inputs, references)
    # Relative to each token's whole gradient: a tensor whose gradient is round-off (OPT's key
    # bias shifts every score of a query alike) is compared at that scale.
    scale = torch.stack([g.flatten(1).norm(dim=1) for g in oracle.values()]).norm(dim=0)
    for name, g in oracle.items():
        error = (fast[name] - g).flatten(1).norm(dim=1) / scale
        assert error.max() < 1e-5, (name, float(error.max()))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = next(
        n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight
    )
    if tied:  # both uses' signals, summed
        assert source.plan.paths[embedding] == "structured (embedding + linear)"
    generic = {n: p for n, p in source.plan.paths.items() if p.startswith("generic")}
    expected = FAMILIES[family][2]
    assert set(generic) == set(expected), generic
    for name, reason in expected.items():
        assert reason in generic[name], generic[name]
