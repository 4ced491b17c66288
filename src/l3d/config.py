"""The frozen, validated record of every choice an L3D run makes (round-trips to YAML)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from l3d.errors import L3DError


class L3DConfig(BaseModel):
    """Hyperparameters of one decomposition. Defaults follow the paper (Section 2, Appendix B.4).

    Where the authors' code behaves differently, the option that reproduces it is named in the
    field's description (see docs/algorithm.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: tuple[str, ...] = Field(
        description="Parameter names or glob patterns ('layers.*.weight') of the tensors to "
        "decompose."
    )
    n_subnetworks: int = Field(ge=1, description="Number of subnetworks n_v.")
    rank: int | dict[str, int] = Field(
        default=1,
        description="Rank of every tensor of every subnetwork, or a mapping from parameter name or "
        "glob to rank (first match wins). Capped at the tensor's largest possible rank.",
    )
    factorization: Literal["cp", "tucker"] = Field(
        default="cp", description="Low-rank form per tensor: CP (Appendix B.1) or Tucker."
    )
    top_k: float = Field(
        default=0.1,
        description="Fraction of all |coefficients| in a batch kept by batch top-k (Section 2.3).",
    )
    divergence: str = Field(
        default="mse",
        description="'mse' (mean over output dims), 'kl' (KL(p_ref || p_i) on logits), "
        "'mse_authors' (the authors' toy code: 1/2 MSE to the reference + 1/2 MSE to 0), or "
        "'custom:<name>' for a user callable.",
    )
    reference: str = Field(
        default="random",
        description="'random' (another sample's output from the batch, never the sample itself), "
        "'mean', 'uniform', or 'custom:<name>'.",
    )
    per_token: bool = Field(
        default=False,
        description="Outputs have a sequence axis: each (sequence, position) is one sample; "
        "positions where attention_mask is 0 are never samples.",
    )
    loss: Literal["paper", "pooled_squared"] = Field(
        default="paper",
        description="Trained loss: 'paper' = mean_i ||g_i - g^_i|| / ||g_i|| (eq. 8); "
        "'pooled_squared' = sum_i ||g_i - g^_i||^2 / sum_i ||g_i||^2 (authors' code, behind every "
        "published number). Both are always logged.",
    )
    epochs: int = Field(default=100, ge=1)
    batch_size: int = Field(
        default=32, ge=2, description="Samples per batch (sequences if per_token)."
    )
    lr: float = Field(
        default=0.01,
        gt=0,
        description="AdamW learning rate: 0.01 is the paper's toy value; use about 1e-3 for layers "
        "hundreds of units wide (docs/algorithm.md, 'Learning rate and layer width').",
    )
    optimizer: Literal["adamw", "adam"] = Field(
        default="adamw",
        description="'adamw' (paper) or 'adam' without weight decay (authors' code).",
    )
    weight_decay: float = Field(
        default=0.01, ge=0, description="AdamW weight decay (torch default)."
    )
    lr_decay: float = Field(
        default=0.8, gt=0, le=1, description="Multiplicative learning-rate decay."
    )
    lr_decay_every: int = Field(default=100, ge=1)
    lr_decay_unit: Literal["step", "epoch"] = Field(
        default="step", description="Decay every N 'step's (paper) or 'epoch's (authors' code)."
    )
    warm_start_epochs: int = Field(
        default=0,
        ge=0,
        description="Epochs at warm_start_top_k before top_k (authors' code: 1-10).",
    )
    warm_start_top_k: float = Field(default=0.999)
    gradient_method: Literal["auto", "jacobian", "vmap", "structured"] = Field(
        default="auto",
        description="'jacobian': cache each sample's output Jacobian at W0 once, then "
        "g_i = J_i^T dD/dy (exact, fast for small models); 'vmap': torch.func per-sample gradients "
        "every batch; 'structured': per-sample gradients kept factored as layer inputs and "
        "output-gradients (Linear, Conv1D, Conv2d, Embedding, biases, LayerNorm; other tensors "
        "use torch.func); 'auto' picks 'jacobian' when the cache fits in memory, else "
        "'structured' when any tensor supports it, else 'vmap'.",
    )
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="Samples per chunk (bounds memory). 'vmap': samples per vmap chunk; "
        "'structured' without per_token: samples per chunk of the batch's forward and backward "
        "(the step then makes two passes over the chunks: same losses and gradients, about one "
        "extra forward + backward); 'structured' with per_token: tokens per batched backward "
        "(default 32). None = whole batch.",
    )
    sequence_chunk_size: int | None = Field(
        default=None,
        ge=1,
        description="per_token on the 'structured' path: sequences per chunk of the batch's "
        "forward and backward (a two-pass step as chunk_size without per_token: same losses and "
        "gradients, only one chunk's activations and signals in memory). None = whole batch.",
    )
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        default="highest",
        description="float32 matrix-product precision of the training steps "
        "(torch.set_float32_matmul_precision, restored after each step): 'highest' = IEEE float32; "
        "'high' lets NVIDIA GPUs use TF32; 'medium' also lets oneDNN CPUs with AVX512-BF16 or AMX "
        "use bfloat16 arithmetic (about 2x faster steps; accuracy depends on the backend, see "
        "docs/performance.md). Evaluation and analysis always run at 'highest'.",
    )
    resample_every: int | None = Field(
        default=None,
        ge=1,
        description="Every this many epochs, re-initialise dead subnetworks (never in the top-k) "
        "and the less active of near-duplicates at the gradient residual of the worst-"
        "reconstructed samples (docs/algorithm.md, resampling). None = never.",
    )
    resample_until: int | None = Field(
        default=None, ge=1, description="No resampling from this epoch on (None = epochs)."
    )
    resample_duplicate_cos: float = Field(
        default=0.9, gt=0, le=1, description="|cos| of two V_out above which they are duplicates."
    )
    resample_min_p_active: float = Field(
        default=0.0, ge=0, le=1, description="Subnetworks with P_act at most this are dead."
    )
    seed: int = 0
    device: str = "cpu"

    @field_validator("top_k", "warm_start_top_k")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(
                f"must be in (0, 1]: the fraction of all coefficients kept per batch; got {value}"
            )
        return value

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        ranks = value.values() if isinstance(value, dict) else [value]
        if any(r < 1 for r in ranks):
            raise ValueError(f"every rank must be >= 1; got {value}")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("no parameter tensors given: pass names or globs, e.g. ['fc1.weight']")
        return value

    @model_validator(mode="after")
    def _sequence_chunks_need_tokens(self) -> L3DConfig:
        if self.sequence_chunk_size is not None and not self.per_token:
            raise ValueError(
                "sequence_chunk_size chunks per-token samples by sequence; without per_token "
                "set chunk_size instead"
            )
        return self

    @classmethod
    def create(cls, **fields: Any) -> L3DConfig:
        """Build a config, turning pydantic's report into a one-line L3DError."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise L3DError(describe_validation_error(err, cls)) from None

    def replace(self, **changes: Any) -> L3DConfig:
        return type(self).create(**{**self.model_dump(), **changes})

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> L3DConfig:
        """Load from a YAML file (a Path, or a one-line string) or from multi-line YAML text."""
        if isinstance(source, str) and "\n" in source:
            text = source
        elif Path(source).is_file():
            text = Path(source).read_text()
        else:
            raise L3DError(f"config file not found: {source}")
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise L3DError(
                f"config must be a YAML mapping of field: value; got {type(data).__name__}"
            )
        return cls.create(**data)


def describe_validation_error(
    err: ValidationError,
    root: type[BaseModel],
    sections: Mapping[str, type[BaseModel]] | None = None,
) -> str:
    """Pydantic's report as one line, with close matches for misspelt keys among the fields of
    the innermost section (by name in `sections`, else `root`) the key sits in."""
    sections = sections or {}
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "config"
        if e["type"] == "extra_forbidden":
            parent = next((sections[p] for p in reversed(loc[:-1]) if p in sections), root)
            options = list(parent.model_fields)
            close = difflib.get_close_matches(loc[-1], options, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(options)}"
            parts.append(f"unknown config key '{where}' ({hint})")
        elif e["type"] == "missing":
            parts.append(f"missing required config key '{where}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if e["type"] != "value_error" else ""
            parts.append(f"config key '{where}': {msg}{got}")
    return "; ".join(parts)
