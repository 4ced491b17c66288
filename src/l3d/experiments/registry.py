"""The named toy experiments: each decomposes one toy of l3d.toys.registry with the L3D settings of
the paper (Appendix B.4) or our improved ones, and says what to measure beyond the common metrics.

The settings are data, one YAML file per experiment in profiles/ (package data), read with
yaml.safe_load and validated when this module is imported:

- profiles/common.yaml: the `paper` and `improved` settings every toy shares;
- profiles/<toy>.yaml: sections `paper` and `improved`, each an `l3d:` mapping of L3DConfig fields
  (the `l3d:` section of a run config) added to the shared ones, without `params` (the runner
  decomposes all of the toy's parameters) or `seed` (the experiment's seed); optionally
  `paper_results`, `sweep` ({key, values, overrides}), `hidden_params` and `tms_masks`.

Settings profiles:
- "paper": exactly Appendix B.4 (1000 points, batch 32, 1000 epochs, AdamW lr 0.01 x0.8 every 100
  steps, k = 0.1, loss eq. 8) with the paper's subnetwork counts and ranks.
- "improved": what we found works better per toy (docs/toys.md): the pooled squared loss the
  authors' code trains, the lr decayed per epoch, k matched to the number of circuits a sample
  uses, excess subnetworks with re-initialisation of dead or duplicate ones.

A typo in a profile is a one-line L3DError naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from l3d.config import L3DConfig, describe_validation_error
from l3d.errors import L3DError, lookup, yaml_error
from l3d.toys.registry import TOYS, ToySpec

PROFILES = Path(__file__).parent / "profiles"
"""The shipped profiles: common.yaml and one <toy>.yaml per experiment."""
COMMON = "common"
SETTINGS = ("paper", "improved")
RUNNER_FIELDS = ("params", "seed")
"""L3DConfig fields the runner sets, never a profile."""
N_DECOMPOSE = 1000
"""Points L3D trains on (Appendix B.4); held-out metrics use as many fresh ones."""


@dataclass(frozen=True)
class ExperimentSpec:
    toy: ToySpec
    paper: dict
    """L3DConfig fields of the paper's decomposition (Appendix B.4 + Section 3)."""
    improved: dict
    """L3DConfig fields of our improved profile."""
    paper_results: dict = field(default_factory=dict)
    sweep: tuple[str, tuple] | None = None
    """(L3DConfig field, values) for a loss sweep (rank or subnetwork count)."""
    sweep_overrides: dict = field(default_factory=dict)
    hidden_params: tuple[str, ...] = ()
    """Parameters of the hidden layers, for interventions on them alone (Fig. S8)."""
    tms_masks: bool = False
    """TMS: match by the share of norm on each feature's own parameters, and report MMCS."""
    n_samples: dict[str, int] = field(default_factory=dict)
    """Inputs decomposed per settings profile (absent: N_DECOMPOSE)."""

    def inputs_for(self, settings: str) -> int:
        return self.n_samples.get(settings, N_DECOMPOSE)

    @property
    def name(self) -> str:
        return self.toy.name

    @property
    def description(self) -> str:
        return self.toy.description


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Settings(_Frozen):
    l3d: dict[str, Any] = Field(
        description="L3DConfig fields (a run config's `l3d:` section) without params or seed."
    )
    n_samples: int | None = Field(
        default=None,
        ge=2,
        description="Inputs drawn for the decomposition (default: N_DECOMPOSE, the paper's "
        "1000); held-out metrics always use N_DECOMPOSE fresh samples.",
    )


class _Sweep(_Frozen):
    key: str = Field(description="The L3DConfig field that varies, e.g. rank.")
    values: tuple[Any, ...] = Field(min_length=1)
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="L3DConfig fields set at every point of the sweep."
    )


class _CommonFile(_Frozen):
    paper: _Settings
    improved: _Settings


class _ProfileFile(_CommonFile):
    paper_results: dict[str, float] = Field(
        default_factory=dict, description="The paper's published numbers, by summary key."
    )
    sweep: _Sweep | None = None
    hidden_params: tuple[str, ...] = ()
    tms_masks: bool = False


_SECTIONS: dict[str, type[BaseModel]] = {"paper": _Settings, "improved": _Settings, "sweep": _Sweep}


def _read(path: Path, schema: type[_Frozen]) -> Any:
    """One profile file, validated by `schema` (its L3D settings are checked by the callers)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise L3DError(f"cannot read experiment profile {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    if not isinstance(data, dict):
        raise L3DError(
            f"{path}: an experiment profile is a YAML mapping with sections "
            f"{', '.join(schema.model_fields)}; got {type(data).__name__}"
        )
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise L3DError(f"{path}: {describe_validation_error(err, schema, _SECTIONS)}") from None


def _check(fields: dict, where: str, **required: Any) -> None:
    """Validate profile fields with L3DConfig (`required`: stand-ins for fields a toy adds)."""
    reserved = [k for k in RUNNER_FIELDS if k in fields]
    if reserved:
        raise L3DError(
            f"{where}: '{reserved[0]}' is set by the experiment runner, not by a profile "
            "(params: all of the toy's parameters; seed: the experiment's seed)"
        )
    try:
        L3DConfig.create(**{"params": ["*"], **required, **fields})
    except L3DError as err:
        raise L3DError(f"{where}: {err}") from None


def read_common(path: Path = PROFILES / f"{COMMON}.yaml") -> dict[str, dict]:
    """The settings every toy shares: {"paper": {...}, "improved": {...}}."""
    common = _read(path, _CommonFile)
    out = {s: dict(getattr(common, s).l3d) for s in SETTINGS}
    for settings, fields in out.items():
        _check(fields, f"{path}: {settings}.l3d", n_subnetworks=1)
    return out


def load_profile(path: Path, toy: ToySpec, common: dict[str, dict] | None = None) -> ExperimentSpec:
    """The experiment of one profile file: its settings added to `common` (default: the shipped
    common.yaml) and validated with L3DConfig, sweep points included."""
    common = read_common() if common is None else common
    profile = _read(path, _ProfileFile)
    settings = {s: {**common[s], **getattr(profile, s).l3d} for s in SETTINGS}
    for name, fields in settings.items():
        _check(fields, f"{path}: {name}.l3d")
    sweep = profile.sweep
    if sweep is not None:
        for name, fields in settings.items():
            for value in sweep.values:
                point = {**fields, **sweep.overrides, sweep.key: value}
                _check(point, f"{path}: sweep ({name} settings, {sweep.key}={value!r})")
    return ExperimentSpec(
        toy,
        paper=settings["paper"],
        improved=settings["improved"],
        paper_results=dict(profile.paper_results),
        sweep=(sweep.key, sweep.values) if sweep is not None else None,
        sweep_overrides=dict(sweep.overrides) if sweep is not None else {},
        hidden_params=profile.hidden_params,
        tms_masks=profile.tms_masks,
        n_samples={s: n for s in SETTINGS if (n := getattr(profile, s).n_samples) is not None},
    )


def load_experiments(folder: Path = PROFILES) -> dict[str, ExperimentSpec]:
    """Every toy's experiment, in the toy registry's order, from `folder`'s profiles."""
    common = read_common(folder / f"{COMMON}.yaml")
    for path in sorted(folder.glob("*.yaml")):
        if path.stem != COMMON:
            try:
                lookup(TOYS, path.stem, "toy")
            except L3DError as err:
                raise L3DError(f"{path}: a profile is named after its toy: {err}") from None
    missing = [name for name in TOYS if not (folder / f"{name}.yaml").is_file()]
    if missing:
        raise L3DError(f"{folder}: no experiment profile for toy {', '.join(missing)}")
    return {name: load_profile(folder / f"{name}.yaml", toy, common) for name, toy in TOYS.items()}


EXPERIMENTS: dict[str, ExperimentSpec] = load_experiments()
PAPER_L3D: dict = dict(read_common()["paper"])
"""The paper's settings every toy shares (Appendix B.4; profiles/common.yaml)."""


def get_spec(name: str) -> ExperimentSpec:
    return lookup(EXPERIMENTS, name, "experiment")


__all__ = [
    "EXPERIMENTS",
    "N_DECOMPOSE",
    "PAPER_L3D",
    "ExperimentSpec",
    "get_spec",
    "load_experiments",
    "load_profile",
]
