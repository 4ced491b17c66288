"""The frozen, validated record of every choice an L3D run makes (round-trips to YAML)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from l3d.errors import L3DError, yaml_error

# A float that YAML 1.1 (PyYAML) reads as a string: an exponent without a dot, as in 1e-3.
_YAML_EXPONENT = re.compile(r"[-+]?(\d+|\d*\.\d+)[eE][-+]?\d+")


SEEDS = (-(2**63), 2**63 - 1)
"""Seeds that torch.Generator.manual_seed takes (64 bits), with room for the offsets a run adds
(seed + 1 for batches, + 3 for the initialisation, + 60,000 for a shuffled control)."""


def check_seed(seed: int, what: str) -> None:
    """Beyond 64 bits a run failed at its first seeded draw (`Overflow when unpacking long
    long`)."""
    if not SEEDS[0] <= seed <= SEEDS[1]:
        raise ValueError(
            f"{what} must fit in 64 bits (an integer in {SEEDS[0]}..{SEEDS[1]}); got {seed}"
        )


class L3DConfig(BaseModel):
    """Hyperparameters of one decomposition. Defaults follow the paper (Section 2, Appendix B.4).

    Where the authors' code behaves differently, the option that reproduces it is named in the
    field's description (see docs/algorithm.md).

    Types are strict (a config file's `n_subnetworks: "5"` or `per_token: "no"` is an error, not
    coerced): an int is accepted where a float belongs, a list for `params`, and, because PyYAML
    reads an exponent without a dot (`lr: 1e-3`) as a string, such a string for a float.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    params: tuple[StrictStr, ...] = Field(
        strict=False,  # a YAML list; the names themselves stay strict strings
        description="Parameter names or glob patterns ('layers.*.weight') of the tensors to "
        "decompose.",
    )
    n_subnetworks: int | Literal["auto"] = Field(
        default="auto",
        description="Number of subnetworks n_v, or 'auto' (the default): chosen from the data when "
        "the run starts, twice the number of directions the per-sample gradients at W0 spread "
        "over (their participation ratio; l3d.decomposition.choose_n_subnetworks).",
    )
    rank: StrictInt | dict[StrictStr, StrictInt] = Field(
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
        "'mean', 'uniform', 'zero_input' (the output at an all-zero input: float inputs only), "
        "'counterpart' (contrastive pairs: l3d.pairs), or 'custom:<name>'.",
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
        description="Epochs at warm_start_top_k before top_k (authors' code: 1-10); fewer than "
        "epochs.",
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
    gram_precision: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="Operands of the Gram matrix G = V_out V_out^T's products in training steps: "
        "'bfloat16' rounds them (and each product) to bfloat16 with float32 accumulation and "
        "keeps G's diagonal exact, about 2x faster where the Gram dominates a step (many "
        "subnetworks on large tensors) on CPUs with AVX512-BF16 or AMX and on GPUs; measured "
        "against float32 in docs/performance.md. Evaluation always uses float32.",
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
    init: Literal["random", "gradients"] = Field(
        default="random",
        description="Initial subnetworks: 'random' factors (the paper), or 'gradients': the "
        "centres of a sign-free spherical k-means (k-means++ seeding, then Lloyd steps on |cos|) "
        "of per-sample gradients at W0, each fitted at the subnetworks' rank as resampling does "
        "(docs/algorithm.md, initialisation). Needs the dense gradients of init_samples samples.",
    )
    init_swap_search: bool = Field(
        default=False,
        description="With init='gradients', improve the k-means by a swap search after the Lloyd "
        "steps (a centre moved to where a new one would add most, kept if the objective rose): "
        "gives circuits with few samples a centre. ResidMLP: 0 probe errors in every seed; X²: "
        "one seed lost an input (docs/toys.md), so off by default.",
    )
    init_samples: int | None = Field(
        default=None,
        ge=1,
        description="Samples whose gradients init='gradients' clusters (those with a zero "
        "gradient are left out). None: as many as 2^26 float32 entries hold (256 MiB), at least "
        "n_subnetworks. More samples per subnetwork let small circuits get a centre; the "
        "gradients take init_samples x n_weights x 4 bytes.",
    )
    heldout_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Share of the inputs kept out of training (a seeded random split); their "
        "loss (fresh references, the final evaluation's form) is logged after every epoch as "
        "loss_heldout_paper / loss_heldout_pooled_squared, so overfitting shows as a gap to the "
        "training loss. 0: no split.",
    )
    seed: int = 0
    device: str = "cpu"

    @field_validator(
        "top_k",
        "warm_start_top_k",
        "lr",
        "weight_decay",
        "lr_decay",
        "resample_duplicate_cos",
        "resample_min_p_active",
        "heldout_fraction",
        mode="before",
    )
    @classmethod
    def _yaml_exponent(cls, value: Any) -> Any:
        if isinstance(value, str) and _YAML_EXPONENT.fullmatch(value.strip()):
            return float(value)
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        check_seed(value, "seed")
        return value

    @field_validator("top_k", "warm_start_top_k")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(
                f"must be in (0, 1]: the fraction of all coefficients kept per batch; got {value}"
            )
        return value

    @field_validator("n_subnetworks", mode="before")
    @classmethod
    def _n_subnetworks(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value == "auto" or (whole and value >= 1):
            return value
        quoted = isinstance(value, str) and value.strip().isdigit()
        raise ValueError(
            f"must be a whole number >= 1 or 'auto' (chosen from the data); got "
            f"{_short_repr(value)}" + ("; write numbers without quotes" if quoted else "")
        )

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_type(cls, value: Any) -> Any:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if is_int(value) or (
            isinstance(value, Mapping)
            and all(isinstance(k, str) and is_int(v) for k, v in value.items())
        ):
            return value
        raise ValueError(
            "must be an int or a mapping of parameter name or glob to int, e.g. {'fc1.*': 2} "
            f"(got {_short_repr(value)}); write numbers without quotes"
        )

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

    @model_validator(mode="after")
    def _warm_start_ends(self) -> L3DConfig:
        if self.warm_start_epochs and self.warm_start_epochs >= self.epochs:
            raise ValueError(
                f"warm_start_epochs={self.warm_start_epochs} with epochs={self.epochs}: the run "
                f"would never train at top_k={self.top_k}, only at warm_start_top_k="
                f"{self.warm_start_top_k}; use fewer warm-start epochs than epochs (e.g. "
                f"warm_start_epochs={self.epochs // 10}) or more epochs"
            )
        return self

    @property
    def n_v(self) -> int:
        """n_subnetworks as a number. 'auto' is replaced when a run starts
        (`l3d.decomposition.resolve_n_subnetworks`); code past that point reads this."""
        if isinstance(self.n_subnetworks, str):
            raise L3DError(
                "n_subnetworks is still 'auto': l3d.run / l3d.decompose choose it from the data "
                "when the run starts (l3d.decomposition.resolve_n_subnetworks)"
            )
        return self.n_subnetworks

    @classmethod
    def create(cls, /, **fields: Any) -> L3DConfig:
        """Build a config, turning pydantic's report into a one-line L3DError."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise L3DError(describe_validation_error(err, cls)) from None

    def replace(self, /, **changes: Any) -> L3DConfig:
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
            text, name = source, "the config text"
        elif Path(source).is_file():
            name = str(source)
            try:
                text = Path(source).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise L3DError(f"cannot read config file {name}: {_one_line(str(err))}") from None
        else:
            raise L3DError(f"config file not found: {_one_line(str(source))}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise yaml_error(name, err) from None
        if not isinstance(data, dict):
            raise L3DError(
                f"config must be a YAML mapping of field: value; got {type(data).__name__}"
            )
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise L3DError(
                f"config key {_short_repr(odd[0])} is not a field name: keys are names such as "
                "n_subnetworks"
            )
        return cls.create(**data)


def with_changes(preset: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's config fields with `changes` applied. When the changes set `epochs` but not
    `warm_start_epochs`, the preset's warm start keeps its share of the epochs (10 of 100 epochs
    become 1 of 10, 0 of 2), at most epochs - 1, so the run still ends at the sparse top_k."""
    fields = {**preset, **changes}
    warm = preset.get("warm_start_epochs", 0)
    if "epochs" in changes and "warm_start_epochs" not in changes and warm:
        epochs = changes["epochs"]
        if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
            preset_epochs = preset.get("epochs", field_default("epochs"))
            fields["warm_start_epochs"] = min(epochs - 1, round(warm * epochs / preset_epochs))
    return fields


def field_default(name: str) -> Any:
    """The default of an L3DConfig field."""
    return L3DConfig.model_fields[name].default


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
        loc = [_one_line(str(p)) for p in e["loc"]]
        where = ".".join(loc)
        msg = _one_line(e["msg"].removeprefix("Value error, "))
        if e["type"] == "extra_forbidden":
            parent = next((sections[p] for p in reversed(loc[:-1]) if p in sections), root)
            options = list(parent.model_fields)
            close = difflib.get_close_matches(loc[-1], options, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(options)}"
            parts.append(f"unknown config key '{where}' ({hint})")
        elif e["type"] == "missing":
            parts.append(f"missing required config key '{where}'")
        elif not where and e["type"] == "value_error":
            parts.append(f"config: {msg}")  # a rule across fields (a model validator)
        else:
            got = "" if e["type"] == "value_error" else f" (got {_short_repr(e['input'])})"
            if _quoted(e["input"], e["type"]):
                got += ", a string: write the value without quotes"
            elif e["type"] == "bool_type" and e["input"] in (0, 1):
                got += ": write true or false"
            parts.append(f"config key '{where or 'config'}': {msg}{got}")
    return "; ".join(parts)


_BOOLEANS = {"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0"}


def _quoted(value: Any, error_type: str) -> bool:
    """A string that reads as the number or boolean the field wants: a quoted YAML value."""
    if not isinstance(value, str):
        return False
    if error_type == "bool_type":
        return value.strip().lower() in _BOOLEANS
    if error_type in ("int_type", "float_type"):
        try:
            (int if error_type == "int_type" else float)(value)
        except ValueError:
            return False
        return True
    return False


def _one_line(text: str) -> str:
    """Text with any line breaks (a YAML key may hold one) turned into spaces."""
    lines = text.splitlines()
    return " ".join(line.strip() for line in lines) if len(lines) > 1 else "".join(lines)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
