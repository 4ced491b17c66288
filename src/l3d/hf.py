"""HuggingFace causal language models: loading by name or path, token datasets and presets.

One sample per token (Section 3.5.1): with `per_token=True` each (sequence, position) is a sample,
its divergence is KL(p_ref ‖ p_i) over the vocabulary, and padded positions (attention_mask 0)
are never samples. transformers is an optional dependency (`pip install l3d[hf]`), imported here
only, lazily.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from l3d.config import L3DConfig, with_changes
from l3d.errors import L3DError, lookup


def _transformers():
    try:
        import transformers
    except ImportError:
        raise L3DError(
            "HuggingFace models need the transformers package: pip install 'l3d[hf]'"
        ) from None
    return transformers


# Loading -------------------------------------------------------------------------------------


def _check_folder(name_or_path: str | Path, what: str) -> None:
    """A name that can only be a local path (a Path, absolute, ./ ../ ~, more than one '/', or a
    backslash: a hub id is 'name' or 'namespace/name') must exist; say so before the hub's text."""
    text = str(name_or_path)
    path_like = (
        isinstance(name_or_path, Path)
        or text.startswith((".", "~", "/"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).is_absolute()
    )
    path = Path(text).expanduser()
    if path.is_file():
        raise L3DError(
            f"cannot load a {what} from '{text}': '{text}' is a file; pass the folder it was saved "
            "to with save_pretrained (config.json + weights)"
        )
    if path_like and not path.exists():
        raise L3DError(
            f"cannot load a {what} from '{text}': no such folder. Pass the folder it was saved to "
            "with save_pretrained, or a hub name such as 'roneneldan/TinyStories-8M'"
        )


def load_causal_lm(
    name_or_path: str | Path,
    *,
    attn_implementation: str = "eager",
) -> nn.Module:
    """A causal LM from a hub name or a local folder, in eval mode and float32 (the precision
    L3D computes in; weights saved in another are converted).

    Eager attention: it is plain tensor code that torch.func (vmap over samples, jacrev over
    tokens) can transform, and it is exact (no fused-kernel approximations) on every device.
    """
    _check_folder(name_or_path, "causal LM")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=torch.float32, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise L3DError(
            f"cannot load a causal LM from '{name_or_path}': {first}. Pass a local folder written "
            "by save_pretrained (config.json + weights) or a hub name reachable from this machine"
        ) from None
    except SafetensorError as err:  # truncated or damaged weights
        raise L3DError(
            f"cannot load a causal LM from '{name_or_path}': a weights file is not a readable "
            f"safetensors file ({err}); save or copy the model again"
        ) from None
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err):
            raise
        # transformers says which tensor in a report it logs (hidden by -q) and raises this.
        raise L3DError(
            f"cannot load a causal LM from '{name_or_path}': its config.json and the weights "
            "disagree on a size (config.json edited since the model was saved?): restore "
            "config.json, or save the model again"
        ) from None
    return model.eval()


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer saved with a model; a missing pad token is set to the EOS token (padding is
    masked out of every computation, so its id never matters)."""
    _check_folder(name_or_path, "tokenizer")
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        raise L3DError(
            f"cannot load a tokenizer from '{name_or_path}': {first}. Pass the folder or hub name "
            "the tokenizer was saved under (often the model's)"
        ) from None
    if len(tokenizer) <= 1:  # transformers' fallback for a folder without tokenizer files
        raise L3DError(
            f"no usable tokenizer in '{name_or_path}' (it has {len(tokenizer)} token; no "
            "tokenizer.json or vocabulary files?): save the model's tokenizer there, or name its "
            "folder in data.options.tokenizer"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vocab_size(model: nn.Module) -> int:
    """Number of output logits of a causal LM."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    lm: Any = model  # a transformers model: get_output_embeddings() is not nn.Module's
    embeddings = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if embeddings is None:
        raise L3DError(
            f"cannot tell the vocabulary size of a {type(model).__name__}: give it a "
            ".config.vocab_size or output embeddings"
        )
    return int(embeddings.weight.shape[0])


def token_text(tokenizer: Any, token_id: int) -> str:
    """Token `token_id` decoded alone, or its id without a tokenizer. A byte-level BPE token
    (GPT-2) or a byte-fallback token (Llama's <0xE2>) can hold part of a multi-byte character,
    which decodes alone to U+FFFD, the same for every such token: those show their bytes instead
    (\\xe2), the whole characters among them as themselves."""
    if tokenizer is None:
        return str(token_id)
    text = str(tokenizer.decode([token_id]))
    if "\ufffd" not in text:
        return text
    raw = _token_bytes(tokenizer, token_id)
    return text if raw is None else raw.decode("utf-8", errors="backslashreplace")


def _token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The bytes behind a byte-level or byte-fallback token; None for other tokenizers."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(token_id) if callable(convert) else None
    if not isinstance(piece, str) or not piece:
        return None
    if fallback := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
        return bytes.fromhex(fallback[1])
    table = _byte_level_table()
    return bytes(table[c] for c in piece) if all(c in table for c in piece) else None


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    other 68 for chr(256 + n) in byte order (no public tokenizers API exposes the table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def check_vocabulary(tokenizer: Any, model: nn.Module) -> None:
    """Refuse a tokenizer that can emit ids the model has no logits for."""
    n_tokenizer, n_model = len(tokenizer), vocab_size(model)
    if n_tokenizer > n_model:
        raise L3DError(
            f"the tokenizer has {n_tokenizer} tokens but the model only {n_model} logits: they "
            "belong to different models; load the tokenizer saved with this model"
        )


def check_positions(seq_len: int, model: nn.Module) -> None:
    """Refuse sequences longer than the model's position embeddings (padding is embedded too, so
    even short documents padded to seq_len would index past them)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and seq_len > positions:
        raise L3DError(
            f"seq_len {seq_len} is more than the model's {positions} positions "
            f"(max_position_embeddings): use seq_len <= {positions}"
        )


# Token datasets ------------------------------------------------------------------------------


def _documents(source: object, separator: str) -> list:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise L3DError(
                f"text source '{source}' is not a file; pass a path to a UTF-8 text file, or an "
                "iterable of strings or of token-id sequences"
            )
        if not separator:
            raise L3DError("separator is empty; pass the text between documents, e.g. '\\n'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise L3DError(
                f"text source {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                f"offset {err.start}): convert it to UTF-8, or pass token ids"
            ) from None
        return [d.strip() for d in text.split(separator) if d.strip()]
    if isinstance(source, Tensor):
        if source.dim() not in (1, 2):
            raise L3DError(
                "a tensor of token ids must be 1-D (one document) or 2-D (one per row); got shape "
                f"{tuple(source.shape)}"
            )
        return list(source) if source.dim() == 2 else [source]
    if not isinstance(source, Iterable):
        raise L3DError(
            f"text source is a {type(source).__name__}; pass a file path or an iterable of "
            "strings or of token-id sequences"
        )
    return list(source)


def _token_ids(document: object, tokenizer: Any) -> list[int]:
    if isinstance(document, str):
        if tokenizer is None:
            raise L3DError(
                "the text source holds strings: pass a tokenizer to turn them into tokens"
            )
        return list(tokenizer(document, add_special_tokens=False)["input_ids"])
    if isinstance(document, Tensor):
        if document.is_floating_point() or document.is_complex() or document.dtype == torch.bool:
            raise L3DError(
                f"token ids must be integers; got a tensor of {str(document.dtype)[6:]}: "
                "tokenize the text, or convert ids with .long()"
            )
        return _checked_ids([int(t) for t in document.flatten()])
    if isinstance(document, Iterable):
        ids = list(document)
        if all(isinstance(t, int) or (isinstance(t, Tensor) and t.dim() == 0) for t in ids):
            return _checked_ids([int(t) for t in ids])
    raise L3DError(
        f"a document of the text source is a {type(document).__name__}; each must be a string "
        "or a sequence of int token ids"
    )


def _checked_ids(ids: list[int]) -> list[int]:
    """Ids index an embedding table: negative ones (and ones past int64) are never a token."""
    for t in ids:
        if t < 0:
            raise L3DError(
                f"token id {t} is negative: ids come from a tokenizer; use the model's own"
            )
        if t >= 2**63:
            raise L3DError(f"token id {t} does not fit a 64-bit integer: it is no tokenizer's id")
    return ids


def token_dataset(
    source: object,
    tokenizer: Any = None,
    *,
    seq_len: int = 16,
    n_sequences: int | None = None,
    chunk: bool = False,
    min_tokens: int = 2,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
    separator: str = "\n",
) -> dict[str, Tensor]:
    """Sequences of token ids with an attention mask, ready for `decompose(..., per_token=True)`.

    source: a text file (documents separated by `separator`; '<|endoftext|>' for TinyStories
        dumps), or an iterable of strings (needs `tokenizer`) or of token-id sequences.
    seq_len: tokens per sequence (the paper used 16). Each document gives its first seq_len
        tokens, or with chunk=True consecutive windows covering the whole document.
    Shorter sequences are right-padded; padded positions have attention_mask 0 and are never
    samples. Documents with fewer than min_tokens tokens are skipped.
    Returns {'input_ids': (n_sequences, seq_len) long,
             'attention_mask': (n_sequences, seq_len) long}.
    """
    counts = (("seq_len", seq_len), ("min_tokens", min_tokens), ("n_sequences", n_sequences))
    for name, value in counts:
        if value is None and name == "n_sequences":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise L3DError(f"{name} must be an integer >= 1; got {value!r}")
    # Options come from YAML: 'no' is a true string, and a number is no separator.
    if not isinstance(chunk, bool):
        raise L3DError(f"chunk must be true or false; got {chunk!r}")
    if not isinstance(separator, str):
        raise L3DError(f"separator must be a string; got {separator!r}")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
    # Padded positions are masked out of every computation, but still go through the embedding.
    if not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise L3DError(f"pad_token_id {pad_token_id!r} must be a token id (an integer >= 0)")
    if vocab_size is not None and pad_token_id >= vocab_size:
        raise L3DError(
            f"pad_token_id {pad_token_id} is outside the model's vocabulary of {vocab_size}: pass "
            "an id the model has (any: padding is masked out)"
        )
    rows: list[list[int]] = []
    for document in _documents(source, separator):
        ids = _token_ids(document, tokenizer)
        windows = (
            [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
            if chunk
            else [ids[:seq_len]]
        )
        rows += [w for w in windows if len(w) >= min_tokens]
        if n_sequences is not None and len(rows) >= n_sequences:
            rows = rows[:n_sequences]
            break
    if len(rows) < 2:
        raise L3DError(
            f"the text source gave {len(rows)} sequence(s) with at least {min_tokens} tokens; "
            "L3D needs at least 2 (each token's reference is another token's output): add "
            "documents, lower min_tokens, or split long documents with chunk: true"
        )
    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    if vocab_size is not None:
        largest = int(input_ids[attention_mask.bool()].max())
        if largest >= vocab_size:
            raise L3DError(
                f"token id {largest} is outside the model's vocabulary of {vocab_size}: the ids "
                "come from another tokenizer; tokenize with the model's own tokenizer"
            )
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# Presets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMPreset:
    """A named L3D run on a causal LM: the model, the block, the data shape and the config."""

    model: str
    description: str
    seq_len: int
    n_sequences: int
    dataset: str
    l3d: dict[str, Any] = field(default_factory=dict)

    def config(self, **changes: Any) -> L3DConfig:
        """The preset's L3DConfig, with any field overridden. Fewer `epochs` than the preset's
        scale its warm start by the same factor (10 of 100 epochs: 1 of 10, 0 of 2), unless
        `warm_start_epochs` is given too."""
        return L3DConfig.create(**with_changes(self.l3d, changes))


PRESETS: dict[str, LMPreset] = {
    # The paper's language-model run as the authors' code ran it
    # (docs/authors-code.md): block h.4 (the text says 7; appendix and code say 4),
    # attention q/k/v/out weights and out bias at rank 25 each, 262,400 parameters.
    "tinystories-8m": LMPreset(
        model="roneneldan/TinyStories-8M",
        description=(
            "TinyStories-8M, attention of block h.4, 100 subnetworks of rank 25 (Section 3.5.1)"
        ),
        seq_len=16,
        n_sequences=10_000,
        dataset="roneneldan/TinyStories (train split), first 16 tokens of each story",
        l3d={
            "params": (
                "transformer.h.4.attn.attention.*_proj.weight",
                "transformer.h.4.attn.attention.out_proj.bias",
            ),
            "n_subnetworks": 100,
            "rank": 25,
            "top_k": 0.1,
            "divergence": "kl",
            "reference": "random",
            "per_token": True,
            "batch_size": 16,
            "lr": 0.001,
            "epochs": 100,
            "warm_start_epochs": 10,
        },
    ),
}


def get_preset(name: str) -> LMPreset:
    return lookup(PRESETS, name, "LM preset")


def tinystories_8m_config(**changes: Any) -> Any:
    """A GPTNeoConfig shaped like TinyStories-8M (hidden 256, 8 layers, 16 heads, vocabulary
    50,257), for running the preset on random weights where the real ones cannot be downloaded."""
    transformers = _transformers()
    fields = {
        "vocab_size": 50257,
        "hidden_size": 256,
        "num_layers": 8,
        "num_heads": 16,
        "attention_types": [[["global", "local"], 4]],
        "window_size": 256,
        "max_position_embeddings": 2048,
        "intermediate_size": None,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }
    return transformers.GPTNeoConfig(**{**fields, **changes})


def random_causal_lm(config: Any, path: str | Path | None = None, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM from a transformers config, saved to `path` if given
    (so it can be loaded back by path like any pretrained model)."""
    transformers = _transformers()
    if not isinstance(config, transformers.PretrainedConfig):
        raise L3DError(
            f"random_causal_lm needs a transformers config (e.g. transformers.GPTNeoConfig(...) or "
            f"l3d.hf.tinystories_8m_config()); got {type(config).__name__}"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    if path is not None:
        model.save_pretrained(str(path))
    return model


@dataclass
class LMSetup:
    """Everything an L3D run on a causal LM needs: pass to `l3d.run(model, data, config)`."""

    model: nn.Module
    tokenizer: Any
    data: dict[str, Tensor]
    config: L3DConfig


def prepare(
    name_or_path: str | Path,
    source: object,
    *,
    preset: str = "tinystories-8m",
    tokenizer: str | Path | None = None,
    seq_len: int | None = None,
    n_sequences: int | None = None,
    separator: str = "\n",
    **changes: Any,
) -> LMSetup:
    """Load a causal LM and its tokenizer by name or path, build the token dataset and the preset's
    config (any L3DConfig field in `changes` overrides it), checking vocabularies agree.

    `epochs` fewer than the preset's scale its warm start to the same share (the paper's 10 of
    100 epochs: 0 of `epochs=2`), so a short run still trains at the sparse top_k; pass
    `warm_start_epochs` to choose it yourself."""
    spec = get_preset(preset)
    model = load_causal_lm(name_or_path)
    tok = load_tokenizer(tokenizer or name_or_path)
    check_vocabulary(tok, model)
    data = token_dataset(
        source,
        tok,
        seq_len=seq_len or spec.seq_len,
        n_sequences=n_sequences or spec.n_sequences,
        vocab_size=vocab_size(model),
        separator=separator,
    )
    return LMSetup(model, tok, data, spec.config(**changes))
