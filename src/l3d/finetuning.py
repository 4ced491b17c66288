"""Finetuning along subnetworks (paper Section 4.2 "Finetuning", Appendix B.2): freeze W0 and learn
an adapter W = W0 + sum_k alpha_k v_k over a few chosen subnetworks v_k (V_out directions), so that
an edit moves the weights only along the handles a behaviour uses.

`finetune` trains an `Adapter` (the scalars alpha, initialised at 0, and optionally the chosen
subnetworks' low-rank factors, rank kept, or a small core inside each chosen subnetwork's factor
subspaces); `baseline` trains the comparisons in the same harness
(same data, objective, steps and Adam optimiser): LoRA of rank r on the same tensors through the
`peft` library, and full finetuning of the same tensors. Subnetworks are chosen by impact
(`top_subnetworks`, `contrast_subnetworks`) or by the edit's own objective against the retain
data's curvature (`objective_subnetworks`). The random-direction control is
`finetune(..., directions=decomposition.subnetworks.v_out.random_like(seed))`.

An adapter saves to a folder (adapter.json + adapter.safetensors through `l3d.io`; nothing is
pickled), applies itself as a context manager or a permanent merge (unmerge restores the W0 copy it
keeps, bit for bit) and reports how far it moved each tensor (||Delta W||).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn

from l3d import io
from l3d.config import check_seed
from l3d.core.divergences import Divergence
from l3d.core.model import (
    Target,
    check_token_ids,
    is_hf_conv1d,
    output_tensor,
    shared_parameters,
)
from l3d.core.samples import (
    SAMPLE_MASK,
    Inputs,
    SampleRows,
    batch_size_of,
    check_finite,
    describe_inputs,
    take,
    to_device,
)
from l3d.core.subnetworks import Subnetworks, subnetwork_index
from l3d.decomposition import Decomposition
from l3d.errors import L3DError

Train = Literal["scalars", "factors", "cores", "mixed"]
TRAIN_MODES: tuple[str, ...] = get_args(Train)
Objective = Literal["labels", "forget", "suppress"] | Callable[[Tensor, Tensor], Tensor]
OBJECTIVES = ("labels", "forget", "suppress")
Callback = Callable[[int, "Edit"], None]

IGNORE = -100
"""Integer label of positions that the objective skips (as torch's cross_entropy)."""

ADAPTER_FORMAT = 1
ADAPTER_FILES = ("adapter.json", "adapter.safetensors")


class AdapterDescription(BaseModel):
    """adapter.json as `Adapter.save` writes it. Read through `read_description`, an edited or
    foreign file fails in one line naming the field, not deep inside `Adapter.load` or the
    report."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    format_version: int
    names: list[str]
    shapes: dict[str, list[PositiveInt]] = Field(min_length=1)
    subnetworks: list[NonNegativeInt] = Field(min_length=1)
    train: Train
    factorization: Literal["cp", "tucker"]
    ranks: dict[str, PositiveInt]
    w0_fingerprint: dict[str, dict[str, float | str]]
    n_trainable: NonNegativeInt
    delta_norms: dict[str, float]
    w0_norms: dict[str, float] = {}  # absent before l3d saved them
    trained_with: dict[str, str | int | float | None] = {}  # absent before l3d recorded it
    history: list[dict[str, float | int]]  # float first: its message for a non-number


def read_description(path: Path) -> AdapterDescription:
    """adapter.json, validated, or an L3DError naming the file and the field."""
    meta = io.read_json(path, "adapter description")
    fix = "restore it or re-create the adapter with save()"
    if isinstance(meta, dict) and meta.get("format_version") != ADAPTER_FORMAT:
        raise L3DError(f"{path.parent} is not an l3d adapter folder: re-create it with save()")
    description = io.validated(meta, AdapterDescription, path, fix)
    names = ", ".join(description.shapes)
    if set(description.ranks) != set(description.shapes):
        raise L3DError(
            f"{path}: 'ranks' must give a rank for each tensor of 'shapes' ({names}): {fix}"
        )
    if sorted(description.names) != sorted(description.shapes):
        raise L3DError(
            f"{path}: 'names' must list the tensors of 'shapes' ({names}) in order: {fix}"
        )
    return description


# Data and objectives --------------------------------------------------------------------------
@dataclass(frozen=True)
class Labelled:
    """Inputs with a label per output row: integer class / next-token ids shaped like the outputs
    without their last axis ((n,) for a classifier, (n, seq) for a language model; IGNORE where
    nothing is scored), or float targets shaped like the outputs (regression)."""

    inputs: Inputs
    labels: Tensor

    @classmethod
    def of(cls, data: object) -> Labelled:
        if isinstance(data, Labelled):
            return data
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and isinstance(data[1], Tensor)
            and isinstance(data[0], (Tensor, dict))
        ):
            return cls(data[0], data[1])
        raise L3DError(
            f"finetuning data is a {type(data).__name__}; pass (inputs, labels): a tensor or dict "
            "of inputs and a tensor of labels (class ids, next-token ids or float targets)"
        )


def objective_loss(objective: Objective, outputs: Tensor, labels: Tensor) -> Tensor:
    """The objective on a batch of outputs (n, ..., n_out) and labels (n, ...) or (n, ..., n_out):
    'labels', the model's own loss to the given labels (cross-entropy for ids, mean squared error
    for float targets); 'forget', cross-entropy to the uniform distribution at the labelled
    positions (its minimum is chance, log n_classes: the bounded way to raise a behaviour's
    loss); 'suppress', -log(1 - p(label)) at the labelled positions (the unlikelihood loss of
    Welleck et al. 2019: the labelled answers stop being predicted, the rest of the distribution
    is free); or a callable (outputs, labels) -> scalar."""
    if callable(objective):
        return objective(outputs, labels)
    if labels.is_floating_point():
        _check_float_labels(objective)
        return F.mse_loss(outputs, labels)
    scored = labels != IGNORE
    logits, answers = outputs[scored], labels[scored]
    if not len(answers):  # a minibatch without a labelled position: nothing to act on
        return outputs.sum() * 0.0
    if objective == "labels":
        return F.cross_entropy(logits, answers)
    if objective == "suppress":
        # log(1 - p_y) = logsumexp over the other classes - logsumexp over all: exact where
        # p_y rounds to 1 (1 - p_y would be 0 there).
        others = logits.scatter(-1, answers[:, None], float("-inf"))
        return (logits.logsumexp(-1) - others.logsumexp(-1)).mean()
    return -F.log_softmax(logits, dim=-1).mean()


def _check_float_labels(objective: Objective) -> None:
    if objective != "labels":
        raise L3DError(
            f"objective {objective!r} needs integer labels (the positions and answers to act "
            "on); for float targets use the labels objective (--objective labels / "
            "objective='labels') with the reference outputs as labels"
        )


def _check_labels(objective: Objective, labels: Tensor, n_classes: int) -> None:
    """Refuse labels a built-in objective cannot act on: float targets for 'forget' or
    'suppress', class ids outside the model's outputs, or no label at all (every one IGNORE)."""
    if callable(objective):  # its own labels: whatever it reads them as
        return
    if labels.is_floating_point():
        _check_float_labels(objective)
        return
    scored = labels != IGNORE
    outside = labels[scored & ((labels < 0) | (labels >= n_classes))]
    if outside.numel():
        raise L3DError(
            f"labels must be class indices in 0..{n_classes - 1} (or {IGNORE} to skip a row); "
            f"got {int(outside[0])} in {outside.numel()} of {labels.numel()} labels (the model "
            f"has {n_classes} outputs)"
        )
    if not scored.any():
        raise L3DError(
            f"every label is {IGNORE} (skipped): no label to learn from; give at least one "
            f"class index in 0..{n_classes - 1}"
        )


def _check_objective(objective: object) -> None:
    if not callable(objective) and objective not in OBJECTIVES:
        raise L3DError(
            f"unknown objective {objective!r}: use 'labels', 'forget', 'suppress' or a callable "
            "(outputs, labels) -> loss"
        )


def retain_distance(
    divergence: Divergence, moved: Tensor, base: Tensor, inputs: Inputs, per_token: bool
) -> Tensor:
    """Mean over the retain samples of the decomposition's intervention distance between the
    edited and the frozen outputs: KL(p(W0) || p(W)) for 'kl', the mean squared change
    otherwise (the same measure as `Decomposition.output_change`)."""
    rows = SampleRows.of(inputs, per_token)
    moved_rows, base_rows = rows.rows(moved).flatten(1), rows.rows(base).flatten(1)
    return divergence.distance(moved_rows, base_rows).mean()


# The edits: adapter and baselines ---------------------------------------------------------------
class Edit(ABC):
    """A trainable change of the decomposed tensors, run by the shared harness (`train_edit`)."""

    names: list[str]
    history: list[dict]
    """One record per training step: step, objective, retain_distance (with retain data), loss."""
    trained_with: dict
    """How `train_edit` trained it: objective (its name; 'callable NAME' for a function), steps,
    lr, retain_weight (None without retain data), batch_size, seed. Empty before training."""

    @abstractmethod
    def forward(self, inputs: Inputs) -> Tensor:
        """The edited model's batch-first outputs, differentiable in `trainable()`."""

    @abstractmethod
    def trainable(self) -> list[Tensor]:
        """The tensors the optimiser updates."""

    @abstractmethod
    def delta(self) -> dict[str, Tensor]:
        """Delta W = W - W0 per decomposed tensor, shaped like it."""

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable())

    @torch.no_grad()
    def delta_norms(self) -> dict[str, float]:
        """||Delta W||_F per decomposed tensor: how far the edit moved each."""
        return {n: float(d.norm()) for n, d in self.delta().items()}


class Adapter(Edit):
    """W = W0 + sum_k alpha_k v_k over chosen subnetworks (Appendix B.2).

    directions: a Subnetworks over the decomposed tensors (V_out of a decomposition, or random
    directions for the control); only the rows `subnetworks` are kept, cast to W0's dtype.
    train: 'scalars' learns alpha only (one number per subnetwork); 'factors' also learns the
    chosen subnetworks' CP/Tucker factors, their rank kept; 'cores' learns, per chosen subnetwork
    and tensor, a core C (R x R at rank R) between orthonormal bases of the subnetwork's
    output-mode factors (Q_L) and of its other modes' (Q_M): Delta W = sum_k Q_L C_k Q_M^T. The
    factors stay fixed, so the edit stays inside the subspaces each subnetwork reads and writes,
    but may mix their rank-1 terms (alpha v_k is one such core); alpha is not trained then.
    'mixed' learns every chosen subnetwork's alpha and a core in the first one's subspaces only
    (the first chosen: the most specific, by `contrast_subnetworks`' order), where alpha alone
    leaves part of a behaviour intact (docs/finetuning.md, "α and one core").
    """

    def __init__(
        self,
        model: nn.Module,
        directions: Subnetworks,
        subnetworks: Sequence[int],
        train: Train = "scalars",
    ) -> None:
        if train not in TRAIN_MODES:
            use = ", ".join(repr(m) for m in TRAIN_MODES)
            raise L3DError(f"unknown train mode {train!r}: use one of {use}")
        self.subnetworks = _check_selection(subnetworks, directions.n_subnetworks)
        self.train = train
        self.target = Target.create(model, directions.names)
        self.names = self.target.names
        if self.names != directions.names or self.target.shapes != directions.shapes:
            raise L3DError(
                f"the directions' tensors {directions.shapes} are not the model's "
                f"{self.target.shapes} (names, order, shapes): build them over the model's tensors"
            )
        w0 = next(iter(self.target.w0.values()))
        self.directions = _rows(directions, self.subnetworks).to(w0.device, w0.dtype)
        self.directions.requires_grad_(train == "factors")
        self.alpha = torch.zeros(len(self.subnetworks), dtype=w0.dtype, device=w0.device)
        self.alpha.requires_grad_(train != "cores")
        cored = {"cores": len(self.subnetworks), "mixed": 1}.get(train, 0)
        self.bases = _core_bases(self.directions, cored) if cored else []
        self.cores = [
            torch.zeros(
                q_l.shape[1], q_m.shape[1], dtype=w0.dtype, device=w0.device
            ).requires_grad_(True)
            for _, q_l, q_m in self.bases
        ]
        self.merged = False
        self.history = []
        self.trained_with = {}

    def trainable(self) -> list[Tensor]:
        if self.train == "cores":
            return self.cores
        if self.train == "mixed":
            return [self.alpha, *self.cores]
        factors = list(self.directions.parameters()) if self.train == "factors" else []
        return [self.alpha, *factors]

    def delta(self) -> dict[str, Tensor]:
        # (k, *shape) dense directions of the few chosen subnetworks, combined by alpha (k,).
        dense = self.directions.materialize()
        delta = {n: torch.einsum("k,k...->...", self.alpha, dense[n]) for n in self.names}
        for (name, q_l, q_m), core in zip(self.bases, self.cores):
            delta[name] = delta[name] + (q_l @ core @ q_m.T).reshape(delta[name].shape)
        return delta

    def weights(self) -> dict[str, Tensor]:
        """W0 + Delta W per decomposed tensor."""
        return {n: w + d for (n, w), d in zip(self.target.w0.items(), self.delta().values())}

    def forward(self, inputs: Inputs) -> Tensor:
        """f(inputs, W0 + sum_k alpha_k v_k), differentiable in the adapter's parameters."""
        return self.target.forward(inputs, self.weights())

    @property
    def model(self) -> nn.Module:
        return self.target.model

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model with the adapter merged inside the block, W0 restored after."""
        self.merge()
        try:
            yield self.model
        finally:
            self.unmerge()

    @torch.no_grad()
    def merge(self) -> None:
        """Write W0 + Delta W into the model's parameters (permanent until `unmerge`)."""
        if self.merged:
            raise L3DError("the adapter is already merged: unmerge() it first")
        params = dict(self.model.named_parameters())
        moved = [n for n, w0 in self.target.w0.items() if not torch.equal(params[n], w0)]
        if moved:
            # Merging over another adapter would overwrite it, and unmerging would then restore
            # W0 under the other's feet.
            raise L3DError(
                f"the model's {', '.join(moved)} are not at the W0 this adapter was made on "
                "(another adapter merged?): unmerge that one first"
            )
        for name, w in self.weights().items():
            params[name].copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the model's parameters to the W0 copy taken when the adapter was made."""
        if not self.merged:
            raise L3DError("the adapter is not merged: nothing to unmerge")
        params = dict(self.model.named_parameters())
        for name, w0 in self.target.w0.items():
            params[name].copy_(w0)
        self.merged = False

    # Persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """adapter.json (format, tensors, shapes, subnetworks, train mode, ranks, the W0
        fingerprint, ||Delta W|| and ||W0|| per tensor, how it was trained, history) and
        adapter.safetensors (alpha, cores, factors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"alpha": self.alpha.detach()}
        tensors |= {f"cores.{i}": c.detach() for i, c in enumerate(self.cores)}
        tensors |= {f"directions.{k}": v.detach() for k, v in self.directions.state_dict().items()}
        io.save_tensors(directory / ADAPTER_FILES[1], tensors, io.names_metadata(self.names))
        meta = {
            "format_version": ADAPTER_FORMAT,
            "names": self.names,
            "shapes": {n: list(s) for n, s in self.target.shapes.items()},
            "subnetworks": self.subnetworks,
            "train": self.train,
            "factorization": self.directions.factorization,
            "ranks": self.directions.ranks,
            "w0_fingerprint": io.fingerprint(self.target.w0),
            "n_trainable": self.n_trainable,
            "delta_norms": self.delta_norms(),
            "w0_norms": {n: float(w.norm()) for n, w in self.target.w0.items()},
            "trained_with": self.trained_with,
            "history": self.history,
        }
        io.write_json(directory / ADAPTER_FILES[0], meta)
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, model: nn.Module, *, allow_other_weights: bool = False
    ) -> Adapter:
        """An adapter saved by `save`, against `model` at the W0 it was trained on (its tensors'
        fingerprint must match unless allow_other_weights=True)."""
        directory = Path(directory)
        meta = read_description(directory / ADAPTER_FILES[0])
        file = directory / ADAPTER_FILES[1]
        tensors = io.load_tensors(file, "adapter weights")
        if "alpha" not in tensors:
            raise L3DError(f"{directory} is not an l3d adapter folder: re-create it with save()")
        io.check_names_order(
            file, directory / ADAPTER_FILES[0], meta.names, "re-create the adapter"
        )
        params = dict(model.named_parameters())
        # In the order of 'names' (a list): the directions are stored by position, and tools that
        # rewrite JSON may sort the keys of 'shapes'.
        shapes = {n: tuple(meta.shapes[n]) for n in meta.names}
        wrong = [n for n, s in shapes.items() if n not in params or tuple(params[n].shape) != s]
        if wrong:
            raise L3DError(
                f"the adapter in {directory} does not fit this model: {', '.join(wrong)} missing "
                "or shaped otherwise; load it with the model it was trained on"
            )
        other = io.changed_since(meta.w0_fingerprint, {n: params[n] for n in shapes})
        if other and not allow_other_weights:
            raise L3DError(
                f"the adapter in {directory} was trained on other weights ({', '.join(other)} "
                "differ; merged already?): load it with the model at its W0, or pass "
                "allow_other_weights=True"
            )
        n_sel = len(meta.subnetworks)
        directions = Subnetworks(shapes, n_sel, meta.ranks, meta.factorization)
        prefix = "directions."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            directions.load_state_dict(state)
        except RuntimeError:
            raise L3DError(
                f"{directory}/adapter.safetensors does not match adapter.json (other tensor names "
                "or shapes): re-create the adapter with save()"
            ) from None
        adapter = cls(model, directions, list(range(n_sel)), meta.train)
        adapter.subnetworks = list(meta.subnetworks)
        learned = {"alpha": adapter.alpha} | {f"cores.{i}": c for i, c in enumerate(adapter.cores)}
        unread = sorted(k for k in tensors if k not in learned and not k.startswith(prefix))
        if unread:  # e.g. a cores adapter whose train was edited: its cores would be dropped
            raise L3DError(
                f"{file} does not match adapter.json (it holds {', '.join(unread[:3])}, which "
                f"train {meta.train!r} does not use): re-create the adapter with save()"
            )
        for key, value in learned.items():
            saved_value = tensors.get(key)
            if saved_value is None or saved_value.shape != value.shape:
                problem = (
                    f"{key} is missing"
                    if saved_value is None
                    else f"{key} of shape {tuple(saved_value.shape)}, expected {tuple(value.shape)}"
                )
                raise L3DError(
                    f"{file} does not match adapter.json ({problem}, train {meta.train!r}): "
                    "re-create the adapter with save()"
                )
            check_finite(saved_value, f"{file} ({key})", "re-create the adapter with save()")
            with torch.no_grad():
                value.copy_(saved_value)
        adapter.history = [dict(record) for record in meta.history]
        adapter.trained_with = dict(meta.trained_with)
        return adapter


LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
"""Module types whose weight LoRA adapts (exactly these: a subclass may use its weight otherwise),
with transformers' GPT-2 `Conv1D`."""


class Baseline(Edit):
    """A comparison edit of the same tensors: LoRA of rank r through `peft` (on a copy of the
    model: the adapter layers replace the targeted modules), or full finetuning (every entry of
    the decomposed tensors trained). example: a few inputs on which LoRA's forward is checked
    against f(W0 + delta) per module (modules that fail stay at W0)."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        method: str,
        rank: int = 4,
        example: Inputs | None = None,
    ) -> None:
        self.method = method
        self.rank = rank
        self.names = names
        self.history = []
        self.trained_with = {}
        self.target = Target.create(model, names)
        if method == "full":
            self.weights = {n: w.clone().requires_grad_(True) for n, w in self.target.w0.items()}
            return
        if method != "lora":
            raise L3DError(f"unknown baseline {method!r}: use 'lora' or 'full'")
        modules = dict(model.named_modules())
        shared = shared_parameters(model)
        # LoRA adapts weight matrices of Linear / Conv / Embedding modules; biases and norm
        # scales among the decomposed tensors stay at W0 (their share of the edit is L3D's alone),
        # and so do weights LoRA would change in one use only: tied to a second module, or held
        # by a subclass that may call its weight on other rows than its input (OPT's positions).
        candidates = []
        for name in names:
            module_name, _, local = name.rpartition(".")
            module = modules.get(module_name)
            if (
                local == "weight"
                and module is not None
                and (type(module) in LORA_TYPES or is_hf_conv1d(module))
                and getattr(module, "groups", 1) == 1
                and id(module.weight) not in shared
            ):
                candidates.append(module_name)
        if not candidates:
            raise L3DError(
                "LoRA needs the weight of an nn.Linear, nn.Conv1d or nn.Conv2d (groups 1), "
                "nn.Embedding or GPT-2 Conv1D module (exactly those types, not tied to another "
                f"module) among the tensors {names}"
            )
        self.lora_modules = candidates
        self._inject(model)
        if example is not None:
            wrong = self._misread(example)
            if wrong:
                self.lora_modules = [m for m in candidates if m not in wrong]
                if not self.lora_modules:
                    raise L3DError(
                        f"LoRA cannot adapt the tensors {names}: the model also uses their "
                        "weights outside their modules' calls"
                    )
                self._inject(model)

    def _inject(self, model: nn.Module) -> None:
        """A copy of the model with peft's LoRA layers on `lora_modules`, only they trainable."""
        import warnings

        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.rank, lora_alpha=self.rank, lora_dropout=0.0, target_modules=self.lora_modules
        )
        with warnings.catch_warnings():
            # peft sets fan_in_fan_out per layer (True for GPT-2's Conv1D) and says so.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            self.lora_model = inject_adapter_in_model(config, copy.deepcopy(model)).eval()
        for name, p in self.lora_model.named_parameters():
            p.requires_grad_("lora_" in name)

    @torch.no_grad()
    def _misread(self, example: Inputs) -> list[str]:
        """The LoRA modules whose random LoRA weights move the LoRA model elsewhere than
        f(W0 + delta): their weight is also used outside the module's call (a head written
        h @ wte.weight.T), which LoRA leaves at W0. One forward pair for all, then per module."""
        layers = dict(self.lora_model.named_modules())
        saved = {n: p.clone() for n, p in self.lora_model.named_parameters() if p.requires_grad}
        generator = torch.Generator().manual_seed(0)
        base = self.target.forward(example)
        eps = torch.finfo(base.dtype).eps

        def agrees(modules: list[str]) -> bool:
            w = dict(self.target.w0)
            for m in self.lora_modules:  # random LoRA weights on `modules`, none elsewhere
                for p in layers[m].parameters():
                    if p.requires_grad:
                        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                        p.copy_(noise.to(p.device) * 0.1 if m in modules else 0 * noise)
            for m in modules:
                w[f"{m}.weight"] = w[f"{m}.weight"] + layers[m].get_delta_weight("default")
            want = self.target.forward(example, w)
            got = self.forward(example)
            # A weight LoRA changes in one use only misses a share of the change comparable to
            # the change itself; round-off (any dtype) is far below a tenth of it.
            change = (want - base).abs().max().item()
            error = (got - want).abs().max().item()
            return error <= 0.1 * change + 100 * eps * want.abs().max().item()

        try:
            if agrees(self.lora_modules):
                return []
            return [m for m in self.lora_modules if not agrees([m])]
        finally:
            for n, p in self.lora_model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])

    def forward(self, inputs: Inputs) -> Tensor:
        if self.method == "full":
            return self.target.forward(inputs, self.weights)
        args = (inputs,) if isinstance(inputs, Tensor) else ()
        kwargs = {} if isinstance(inputs, Tensor) else dict(inputs)
        kwargs.pop(SAMPLE_MASK, None)
        return output_tensor(self.lora_model(*args, **kwargs))

    def trainable(self) -> list[Tensor]:
        if self.method == "full":
            return list(self.weights.values())
        return [p for p in self.lora_model.parameters() if p.requires_grad]

    def delta(self) -> dict[str, Tensor]:
        if self.method == "full":
            return {n: self.weights[n] - self.target.w0[n] for n in self.names}
        modules = dict(self.lora_model.named_modules())
        delta = {n: torch.zeros_like(w) for n, w in self.target.w0.items()}
        for name in self.lora_modules:
            delta[f"{name}.weight"] = modules[name].get_delta_weight("default")
        return delta


# Selection ------------------------------------------------------------------------------------
def _check_selection(subnetworks: Sequence[int], n_subnetworks: int) -> list[int]:
    chosen = list(subnetworks)
    if not chosen:
        raise L3DError(
            "no subnetworks selected: pass indices, e.g. subnetworks=[0, 3], or choose them with "
            "top_subnetworks(...) or contrast_subnetworks(...)"
        )
    chosen = [subnetwork_index(k, n_subnetworks) for k in chosen]
    if len(set(chosen)) != len(chosen):
        raise L3DError(f"subnetworks {chosen} repeat an index: list each subnetwork once")
    return chosen


def _rows(directions: Subnetworks, rows: list[int]) -> Subnetworks:
    """A copy of `directions` holding only the given subnetworks (same tensors, ranks, form)."""
    kept = Subnetworks(directions.shapes, len(rows), directions.ranks, directions.factorization)
    index = torch.tensor(rows)
    with torch.no_grad():
        for mine, theirs in zip(kept.parameters(), directions.parameters()):
            mine.copy_(theirs.detach()[index.to(theirs.device)].cpu())
    return kept


def _core_bases(directions: Subnetworks, n: int) -> list[tuple[str, Tensor, Tensor]]:
    """(tensor name, Q_L (d_out, R'), Q_M (rest, R'')) per tensor and each of the first n
    subnetworks: orthonormal bases of its output-mode factors and of its other modes' (the split
    V_k = sum_r L_kr (x) M_kr; a vector's M is the scalar 1), fixed while the cores train."""
    bases = []
    with torch.no_grad():
        for name, factors in zip(directions.names, directions.factors):
            if len(factors.work_shape) == 1:
                left, right = factors.modes[0], None
            else:
                left, right = factors.split(0)
            for k in range(n):
                q_l = torch.linalg.qr(left[k].T).Q
                q_m = left.new_ones(1, 1) if right is None else torch.linalg.qr(right[k].T).Q
                bases.append((name, q_l, q_m))
    return bases


def _check_count(decomposition: Decomposition, n: object) -> int:
    """n as a count of subnetworks to choose, or an L3DError (a negative n would slice)."""
    n_v = decomposition.subnetworks.v_out.n_subnetworks
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_v:
        raise L3DError(f"cannot choose {n!r} subnetworks: n must be an int in 1..{n_v}")
    return n


def _mean_impact(
    decomposition: Decomposition, inputs: Inputs, samples: Tensor | None, n_references: int
) -> Tensor:
    impact = decomposition.impact(inputs, n_references=n_references)  # (n_samples, n_v)
    if samples is None:
        return impact.mean(0)
    samples, n_rows = samples.cpu(), len(impact)
    if samples.dtype == torch.bool:
        if samples.shape != (n_rows,):
            raise L3DError(
                f"a samples mask of shape {tuple(samples.shape)} for inputs with {n_rows} sample "
                f"rows: give a bool mask of {n_rows}, or row indices"
            )
    elif (outside := samples[(samples < -n_rows) | (samples >= n_rows)]).numel():
        raise L3DError(
            f"samples name row {int(outside[0])} but the inputs have {n_rows} sample rows: give "
            f"indices in 0..{n_rows - 1}, or a bool mask"
        )
    return impact[samples].mean(0)


def top_subnetworks(
    decomposition: Decomposition,
    inputs: Inputs,
    n: int,
    *,
    samples: Tensor | None = None,
    n_references: int = 10,
) -> list[int]:
    """The n subnetworks of largest mean impact (eq. 10-11) on `inputs`: the subnetworks this
    behaviour uses. samples: a bool mask or indices of the impact's sample rows to average over
    (e.g. only answer tokens), default all."""
    n = _check_count(decomposition, n)
    score = _mean_impact(decomposition, inputs, samples, n_references)
    return [int(k) for k in score.argsort(descending=True)[:n]]


def contrast_subnetworks(
    decomposition: Decomposition,
    target: Inputs,
    retain: Inputs,
    n: int,
    *,
    target_samples: Tensor | None = None,
    retain_samples: Tensor | None = None,
    n_references: int = 10,
) -> list[int]:
    """The n subnetworks whose mean impact on `target` exceeds that on `retain` the most: used by
    the behaviour to change, little by the behaviour to keep."""
    n = _check_count(decomposition, n)
    on_target = _mean_impact(decomposition, target, target_samples, n_references)
    on_retain = _mean_impact(decomposition, retain, retain_samples, n_references)
    return [int(k) for k in (on_target - on_retain).argsort(descending=True)[:n]]


def _core_tangents(
    bases: list[tuple[str, Tensor, Tensor]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """{name: (n_c, *shape)}: the weight change of each core coordinate (one entry of one core
    C set to 1: Q_L[:, a] Q_M[:, b]^T), coordinates in the order of the cores' flattened
    entries. For one subnetwork's bases they are orthonormal in parameter space (Q_L and Q_M have
    orthonormal columns), so quadratic forms in them are the subspace's own."""
    sizes = [q_l.shape[1] * q_m.shape[1] for _, q_l, q_m in bases]
    n_c, start = sum(sizes), 0
    tangents = {n: bases[0][1].new_zeros(n_c, *s) for n, s in shapes.items()}
    for (name, q_l, q_m), size in zip(bases, sizes):
        unit = torch.eye(size, dtype=q_l.dtype, device=q_l.device)
        unit = unit.reshape(size, q_l.shape[1], q_m.shape[1])
        dense = torch.einsum("ia,cab,jb->cij", q_l, unit, q_m)
        tangents[name][start : start + size] = dense.reshape(size, *shapes[name])
        start += size
    return tangents


def objective_scores(
    decomposition: Decomposition,
    data: object,
    retain: Inputs,
    *,
    objective: Objective = "forget",
    damping: float = 1e-3,
    directions: Subnetworks | None = None,
    chunk: int = 16,
) -> Tensor:
    """(n_subnetworks,) how much of the edit's objective each subnetwork's core subspace (the
    span that train='cores' moves in, see `Adapter`) can remove per unit of retain change:

        s_k = g_k^T (H_k + eps I)^-1 g_k

    g_k: the gradient of objective(data) at W0 in subnetwork k's core coordinates (the projection
    Q_L Q_L^T G Q_M Q_M^T of the weight gradient G, per tensor); H_k: the Gauss-Newton matrix of
    the retain distance (`retain_distance`, mean over retain samples) in the same coordinates,
    J_k^T (d^2 D / dy^2) J_k: the Fisher information of the retain outputs for 'kl', whose
    gradient is 0 at W0 so only its curvature matters. s_k is the first-order drop of the
    objective bought by the best step in the subspace under a quadratic retain penalty; eps =
    damping times the mean of H's diagonal over all subnetworks. J_k by forward-mode JVPs, `chunk`
    retain inputs at a time."""
    _check_weights(decomposition)
    _check_objective(objective)
    if damping <= 0 or chunk < 1:
        raise L3DError(f"damping must be > 0 and chunk >= 1; got damping={damping}, chunk={chunk}")
    directions = decomposition.subnetworks.v_out if directions is None else directions
    n_v = directions.n_subnetworks
    labelled = _prepare(decomposition, data, objective)
    retain = _prepare_retain(decomposition, retain)
    # g: every subnetwork's cores at 0 in one adapter; one backward of the objective.
    adapter = Adapter(decomposition.model, directions, list(range(n_v)), "cores")
    loss = objective_loss(objective, adapter.forward(labelled.inputs), labelled.labels)
    grads = torch.autograd.grad(loss, adapter.cores)
    by_k: list[list[int]] = [[] for _ in range(n_v)]  # _core_bases: tensor-major, then k
    for i in range(len(adapter.bases)):
        by_k[i % n_v].append(i)
    g = [torch.cat([grads[i].flatten() for i in idx]) for idx in by_k]
    h = [_retain_gauss_newton(decomposition, [adapter.bases[i] for i in idx], retain, chunk)
         for idx in by_k]  # fmt: skip
    eps = damping * torch.cat([m.diagonal() for m in h]).mean().clamp_min(1e-30)
    scores = [
        g_k @ torch.linalg.solve(h_k + eps * torch.eye(len(g_k), dtype=h_k.dtype), g_k)
        for g_k, h_k in zip((g_k.double().cpu() for g_k in g), h)
    ]
    return torch.stack(scores).float().cpu()


def _retain_gauss_newton(
    decomposition: Decomposition,
    bases: list[tuple[str, Tensor, Tensor]],
    retain: Inputs,
    chunk: int,
) -> Tensor:
    """(n_c, n_c) J^T (d^2 D / dy^2) J of the retain distance in the core coordinates of `bases`,
    averaged over retain samples (rows as `retain_distance` takes them)."""
    target, divergence = decomposition.target, decomposition.divergence
    tangents = _core_tangents(bases, target.shapes)
    n_c = len(next(iter(tangents.values())))
    w0 = dict(target.w0)
    gauss_newton, n_rows = torch.zeros(n_c, n_c, dtype=torch.float64), 0
    for start in range(0, batch_size_of(retain), chunk):
        inputs = take(retain, slice(start, start + chunk))
        rows = SampleRows.of(inputs, decomposition.config.per_token)

        def outputs(params: dict[str, Tensor], inputs: Inputs = inputs) -> Tensor:
            return target.forward(inputs, params)

        with torch.no_grad():
            base = target.forward(inputs)
            d_out = torch.func.vmap(lambda t: torch.func.jvp(outputs, (w0,), (t,))[1])(tangents)
            base_rows = rows.rows(base).flatten(1)  # (n_rows, n_out)
            # (n_c, batch, ...) -> (n_rows, n_c, n_out): the coordinate axis after the sample's.
            j = rows.rows(d_out.movedim(0, -1)).movedim(-1, 1).flatten(2)

            def curvature(y: Tensor, dy: Tensor) -> Tensor:  # d^2 D / dy^2 at y = base, times dy
                grad = torch.func.grad(divergence.distance_fn)
                return torch.func.jvp(lambda m: grad(m, y), (y,), (dy,))[1]

            hj = torch.func.vmap(torch.func.vmap(curvature, (None, 0)))(base_rows, j)
            gauss_newton += torch.einsum("rio,rjo->ij", j.double(), hj.double()).cpu()
        n_rows += len(base_rows)
    return gauss_newton / max(n_rows, 1)


def objective_subnetworks(
    decomposition: Decomposition,
    data: object,
    retain: Inputs,
    n: int,
    *,
    objective: Objective = "forget",
    damping: float = 1e-3,
) -> list[int]:
    """The n subnetworks of largest `objective_scores`: whose core subspaces carry the most of
    the edit's own objective per unit of change on the retain data (for train='cores')."""
    n = _check_count(decomposition, n)
    scores = objective_scores(decomposition, data, retain, objective=objective, damping=damping)
    return [int(k) for k in scores.argsort(descending=True)[:n]]


def select_subnetworks(
    decomposition: Decomposition,
    how: Sequence[str],
    target: Inputs,
    retain: Inputs | None = None,
) -> list[int]:
    """Subnetworks from a command line: indices ('0', '3'), 'top:N' (the N of largest impact on
    `target`) or 'contrast:N' (largest impact on `target` over that on `retain`)."""
    if len(how) == 1 and ":" in how[0]:
        rule, _, count = how[0].partition(":")
        if rule not in ("top", "contrast") or not count.isdigit() or int(count) < 1:
            raise L3DError(
                f"cannot read subnetworks '{how[0]}': use indices (0 3), top:N or contrast:N"
            )
        if decomposition.config.reference == "counterpart":
            raise L3DError(
                "top:N and contrast:N are not available for a run of contrastive pairs (its "
                "impact needs each input's counterpart, which the data file does not give): give "
                "subnetwork indices, e.g. --subnetworks 0 1"
            )
        if rule == "top":
            return top_subnetworks(decomposition, target, int(count))
        if retain is None:
            raise L3DError("contrast:N compares the target data with retain data: give --retain")
        return contrast_subnetworks(decomposition, target, retain, int(count))
    try:
        return [int(k) for k in how]
    except ValueError:
        raise L3DError(
            f"cannot read subnetworks {' '.join(how)}: use indices (0 3), top:N or contrast:N"
        ) from None


def read_inputs(path: str | Path, what: str = "finetuning data") -> Inputs:
    """Inputs from a safetensors file: one tensor named 'inputs', or the model's keyword inputs
    (e.g. 'input_ids' and 'attention_mask'); a 'labels' tensor beside them is left out. `what`
    names the file in errors (e.g. 'retain data')."""
    tensors = io.load_tensors(path, what)
    tensors.pop("labels", None)
    if not tensors:
        raise L3DError(f"{path} holds no inputs: name them 'inputs' or as the model's arguments")
    return tensors["inputs"] if set(tensors) == {"inputs"} else tensors


def read_data(path: str | Path) -> Labelled:
    """Finetuning data from a safetensors file: the inputs (see `read_inputs`) and a tensor named
    'labels' (see `Labelled`)."""
    labels = io.load_tensors(path, "finetuning data").get("labels")
    if labels is None:
        raise L3DError(
            f"{path} holds no tensor named 'labels': save the labels beside the inputs, e.g. "
            "safetensors.torch.save_file({'inputs': x, 'labels': y}, path)"
        )
    return Labelled(read_inputs(path), labels)


# The harness ----------------------------------------------------------------------------------
def _n_rows(inputs: Inputs) -> int | None:
    """The inputs' rows, or None where they have none to count (a 0-d tensor, no tensor)."""
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()), None)
    return None if first is None or first.dim() == 0 else first.shape[0]


def _check_rows(inputs: Inputs, what: str, fix: str) -> None:
    if _n_rows(inputs) == 0:
        raise L3DError(f"{what} have 0 rows: {fix}")


def _check_fits(target: Target, data: Labelled, objective: Objective = "labels") -> Labelled:
    """One forward at W0, refusing data that do not fit the model, labels that do not fit its
    outputs, and labels the objective cannot learn from (`_check_labels`). Returns the data with
    integer labels as int64 (cross-entropy's dtype)."""
    _check_rows(data.inputs, "the finetuning data", "give at least one input and its label")
    check_token_ids(target.model, data.inputs, "the finetuning data")
    try:
        with torch.no_grad():
            out = target.forward(take(data.inputs, slice(0, 2)))
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise L3DError(
            f"the finetuning data ({describe_inputs(data.inputs)}) do not fit the model "
            f"({reason}): give inputs as the model takes them"
        ) from None
    check_finite(data.inputs, "the finetuning data")
    labels = data.labels
    floats = labels.is_floating_point()
    if not floats and (labels.is_complex() or labels.dtype == torch.bool):
        raise L3DError(
            f"the labels are {str(labels.dtype).removeprefix('torch.')}: give integer class ids "
            f"(or {IGNORE} to skip a row) or float targets"
        )
    check_finite(labels, "the labels")
    want = tuple(out.shape[1:]) if floats else tuple(out.shape[1:-1])
    shaped = f"shaped ({', '.join(['n', *map(str, want)])}{'' if want else ','})"
    if labels.dim() == 0:
        raise L3DError(
            f"the labels are one number (a 0-d tensor): give one label per input row, {shaped}"
        )
    n_rows = batch_size_of(data.inputs)
    if len(labels) != n_rows:
        raise L3DError(
            f"{len(labels)} labels for {n_rows} input rows: give one label per input row, {shaped}"
        )
    if tuple(labels.shape[1:]) != want:
        kind = "float targets" if floats else "integer labels"
        raise L3DError(
            f"{kind} shaped {tuple(labels.shape)} do not fit outputs shaped "
            f"(n, {', '.join(map(str, out.shape[1:]))}): give one label per output row, "
            f"{shaped}"
        )
    if not floats:
        labels = labels.long()
    _check_labels(objective, labels, out.shape[-1])
    return Labelled(data.inputs, labels)


def _prepare(decomposition: Decomposition, data: object, objective: Objective) -> Labelled:
    """The edit's (inputs, labels) on the decomposition's device, checked (`_check_fits`)."""
    device = next(iter(decomposition.target.w0.values())).device
    labelled = Labelled.of(data)
    labelled = Labelled(to_device(labelled.inputs, device), labelled.labels.to(device))
    return _check_fits(decomposition.target, labelled, objective)


def _prepare_retain(decomposition: Decomposition, retain: object) -> Inputs:
    """Retain inputs (or the inputs of (inputs, labels)) on the decomposition's device."""
    device = next(iter(decomposition.target.w0.values())).device
    given = retain if isinstance(retain, (Tensor, dict)) else Labelled.of(retain).inputs
    inputs = to_device(given, device)
    _check_rows(inputs, "the retain data", "give at least one input whose outputs to keep")
    check_token_ids(decomposition.model, inputs, "the retain data")
    return inputs


def _check_weights(decomposition: Decomposition) -> None:
    """Refuse a decomposition whose W0 is not the model's: one loaded against other weights
    (allow_other_weights), or a model edited since (an adapter left merged)."""
    saved = decomposition.w0_fingerprint
    if saved is not None:
        other = io.changed_since(saved, decomposition.target.w0)
        if other:
            raise L3DError(
                f"the decomposition was made on other weights ({', '.join(other)} differ): "
                "finetune along subnetworks of the model they were learned on"
            )
    params = dict(decomposition.model.named_parameters())
    moved = [n for n, w in decomposition.target.w0.items() if not torch.equal(params[n], w)]
    if moved:
        raise L3DError(
            f"the model's {', '.join(moved)} changed since the decomposition was made (an "
            "adapter still merged?): unmerge it, or reload the model"
        )


def _checked_target(
    decomposition: Decomposition,
    data: object,
    objective: Objective,
    steps: int,
    lr: float,
    retain_weight: float,
    seed: int,
) -> Labelled:
    """An edit's settings checked and its target data prepared, once, before the edit is made."""
    _check_weights(decomposition)
    _check_training(steps, lr, retain_weight, seed)
    _check_objective(objective)
    return _prepare(decomposition, data, objective)


def train_edit(
    edit: Edit,
    decomposition: Decomposition,
    target: Labelled,
    *,
    objective: Objective = "labels",
    steps: int = 100,
    lr: float = 0.01,
    retain: object | None = None,
    retain_weight: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
) -> Edit:
    """The shared harness: Adam on objective(target) + retain_weight * retain distance, for
    `steps` steps of minibatches of `batch_size` rows (default all), the model in eval mode
    (BatchNorm uses its running statistics, as at W0). callback(step, edit) after each step.
    target: from `_checked_target`."""
    from tqdm.auto import tqdm

    retain_inputs = None
    if retain is not None:
        retain_inputs = _prepare_retain(decomposition, retain)
        try:
            with torch.no_grad():
                retain_base = decomposition.target.forward(retain_inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise L3DError(
                f"the retain data ({describe_inputs(retain_inputs)}) do not fit the model "
                f"({str(err).splitlines()[0]}): give inputs as the model takes them"
            ) from None
        check_finite(retain_inputs, "the retain data")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(edit.trainable(), lr=lr)
    n_target = batch_size_of(target.inputs)
    per_token = decomposition.config.per_token
    edit.trained_with = {
        "objective": objective if isinstance(objective, str) else f"callable {_name(objective)}",
        "steps": steps,
        "lr": lr,
        "retain_weight": None if retain is None else retain_weight,
        "batch_size": batch_size,
        "seed": seed,
    }
    bar = tqdm(total=steps, desc="finetune", unit="step", disable=not progress)
    try:
        for step in range(steps):
            rows = _minibatch(n_target, batch_size, generator)
            outputs = edit.forward(take(target.inputs, rows))
            loss_target = objective_loss(objective, outputs, target.labels[rows])
            loss = loss_target
            record = {"step": step + 1, "objective": float(loss_target.detach())}
            if retain_inputs is not None:
                r_rows = _minibatch(batch_size_of(retain_inputs), batch_size, generator)
                r_inputs = take(retain_inputs, r_rows)
                moved = edit.forward(r_inputs)
                distance = retain_distance(
                    decomposition.divergence, moved, retain_base[r_rows], r_inputs, per_token
                )
                loss = loss + retain_weight * distance
                record["retain_distance"] = float(distance.detach())
            if not torch.isfinite(loss):
                raise L3DError(
                    f"the finetuning loss is {float(loss.detach())} at step {step + 1}: lower lr"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record["loss"] = float(loss.detach())
            edit.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            bar.update(1)
            if callback is not None:
                callback(step + 1, edit)
    finally:
        bar.close()
    return edit


def _check_training(steps: int, lr: float, retain_weight: float, seed: int) -> None:
    """Refuse settings torch would fail on (a NaN lr, a seed past 64 bits) or that train to a NaN
    loss blamed on the learning rate (a NaN or infinite retain weight)."""
    if steps < 1:
        raise L3DError(f"steps must be >= 1; got {steps}")
    if not (_finite(lr) and lr > 0):
        raise L3DError(f"lr must be a finite number > 0; got {lr}")
    # A negative weight would reward moving the retain outputs away.
    if not (_finite(retain_weight) and retain_weight >= 0):
        raise L3DError(f"retain_weight must be a finite number >= 0; got {retain_weight}")
    try:
        check_seed(seed, "seed")
    except ValueError as err:
        raise L3DError(str(err)) from None


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except (TypeError, ValueError):
        return False


def _name(function: Callable) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _minibatch(n: int, batch_size: int | None, generator: torch.Generator) -> Tensor | slice:
    if batch_size is None or batch_size >= n:
        return slice(0, n)
    return torch.randperm(n, generator=generator)[:batch_size]


def finetune(
    decomposition: Decomposition,
    data: object,
    *,
    subnetworks: Sequence[int],
    objective: Objective = "labels",
    train: Train = "scalars",
    steps: int = 100,
    lr: float = 0.01,
    retain: object | None = None,
    retain_weight: float = 1.0,
    directions: Subnetworks | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
) -> Adapter:
    """Edit the decomposed model along the chosen subnetworks (Section 4.2, Appendix B.2).

    data: (inputs, labels) of the behaviour to change (see `Labelled`).
    subnetworks: indices of the subnetworks to move along (see `top_subnetworks`,
        `contrast_subnetworks`).
    objective: 'labels' (the model's loss to the labels), 'forget' (push the labelled positions
        to the uniform distribution: their loss rises to chance), 'suppress' (push the labelled
        answers' probability to 0: -log(1 - p)) or a callable.
    train: 'scalars' (alpha only), 'factors' (alpha and the chosen subnetworks' factors),
        'cores' (a core inside each chosen subnetwork's factor subspaces) or 'mixed' (alpha, and
        a core in the first chosen subnetwork's), see `Adapter`.
    retain: inputs (or (inputs, labels)) of behaviour to keep: adds retain_weight times the
        decomposition's divergence between the edited and the frozen outputs on them.
    directions: directions to move along instead of V_out (e.g. V_in, or
        `decomposition.subnetworks.v_out.random_like(seed)`: the random-direction control).
    """
    target = _checked_target(decomposition, data, objective, steps, lr, retain_weight, seed)
    adapter = Adapter(
        decomposition.model,
        decomposition.subnetworks.v_out if directions is None else directions,
        subnetworks,
        train,
    )
    train_edit(
        adapter,
        decomposition,
        target,
        objective=objective,
        steps=steps,
        lr=lr,
        retain=retain,
        retain_weight=retain_weight,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        callback=callback,
    )
    return adapter


def baseline(
    decomposition: Decomposition,
    data: object,
    *,
    method: Literal["lora", "full"],
    rank: int = 4,
    objective: Objective = "labels",
    steps: int = 100,
    lr: float = 0.01,
    retain: object | None = None,
    retain_weight: float = 1.0,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    callback: Callback | None = None,
) -> Baseline:
    """A comparison edit of the decomposed tensors in the same harness as `finetune`: 'lora'
    (peft LoRA of `rank` on their weight matrices) or 'full' (all their entries)."""
    target = _checked_target(decomposition, data, objective, steps, lr, retain_weight, seed)
    example = take(target.inputs, slice(0, 2))
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(seed)  # peft draws LoRA's A from the global generator
        edit = Baseline(decomposition.model, decomposition.names, method, rank, example)
    train_edit(
        edit,
        decomposition,
        target,
        objective=objective,
        steps=steps,
        lr=lr,
        retain=retain,
        retain_weight=retain_weight,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        callback=callback,
    )
    return edit


def load_adapter(
    directory: str | Path, model: nn.Module, *, allow_other_weights: bool = False
) -> Adapter:
    """`Adapter.load`: an adapter saved with `Adapter.save`, against `model` at its W0."""
    return Adapter.load(directory, model, allow_other_weights=allow_other_weights)


__all__ = [
    "Adapter",
    "Baseline",
    "Edit",
    "Labelled",
    "baseline",
    "contrast_subnetworks",
    "finetune",
    "load_adapter",
    "objective_scores",
    "objective_subnetworks",
    "read_data",
    "read_inputs",
    "select_subnetworks",
    "top_subnetworks",
]
