"""Contrastive pairs in run configs (`data.pairs`, `l3d.reference: counterpart`): a TMS pairs file
decomposed with `l3d decompose`, stopped and resumed bit-identically, equal to
`l3d.pairs.decompose_pairs` and `pair_coefficients`; bad pair configs are one-line errors."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import l3d
from conftest import stopped_after_epoch
from l3d import runs
from l3d.cli import main
from l3d.core.samples import Referenced
from l3d.pairs import decompose_pairs, pair_coefficients, patching_scores
from l3d.toys import TMS, sparse_features

N_FEATURES, N_HIDDEN = 5, 2
SPEC = {
    "model": {
        "python": "l3d.toys:TMS",
        "options": {"n_features": N_FEATURES, "n_hidden": N_HIDDEN},
    },
    "data": {
        "file": "pairs.safetensors",
        "options": {"key": "inputs"},
        "pairs": {"counterparts": "counterparts", "symmetric": False, "positions": None},
    },
    "l3d": {
        "params": ["W_in", "W_out", "b"],
        "n_subnetworks": 2,
        "top_k": 1.0,
        "reference": "counterpart",
        "epochs": 4,
        "batch_size": 16,
        "lr": 0.01,
        "seed": 3,
    },
    "run": {"checkpoint_seconds": 0, "progress": False},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse TMS inputs and their counterparts: the same inputs with feature 0 zeroed."""
    inputs = sparse_features(
        64, N_FEATURES, p_active=0.4, generator=torch.Generator().manual_seed(0)
    )
    counterparts = inputs.clone()
    counterparts[:, 0] = 0
    return inputs, counterparts


def _config(folder: Path, spec: dict | None = None, **tensors: torch.Tensor) -> Path:
    """A pairs file (the inputs and counterparts of `_pairs`, plus `tensors`) and a config."""
    inputs, counterparts = _pairs()
    save_file(
        {"inputs": inputs, "counterparts": counterparts, **tensors},
        str(folder / "pairs.safetensors"),
    )
    path = folder / "pairs.yaml"
    path.write_text(yaml.safe_dump(SPEC if spec is None else spec))
    return path


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    config = _config(folder)
    assert main(["decompose", str(config), "--out", str(folder / "run"), "-q"]) == 0
    return folder / "run"


def _factors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "decomposition" / "subnetworks.safetensors"))


def _assert_same_factors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_pairs_config_decomposes_the_pairs_like_decompose_pairs(pair_run):
    inputs, counterparts = _pairs()
    options = {k: v for k, v in SPEC["l3d"].items() if k != "reference"}
    direct = decompose_pairs(TMS(N_FEATURES, N_HIDDEN), inputs, counterparts, **options)
    assert direct.config.reference == "counterpart"
    _assert_same_factors(_factors(pair_run), {k: v.cpu() for k, v in _saved(direct).items()})


def _saved(decomposition: l3d.Decomposition) -> dict[str, torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        decomposition.save(folder)
        return load_file(str(Path(folder) / "subnetworks.safetensors"))


def test_the_saved_decomposition_gives_the_pair_coefficients(pair_run):
    inputs, counterparts = _pairs()
    run = runs.open_run(pair_run)
    assert isinstance(run.data, Referenced)
    got = run.decomposition.coefficients(run.data.inputs, references=run.data.references)
    loaded = l3d.load(pair_run / "decomposition", TMS(N_FEATURES, N_HIDDEN))
    expected = pair_coefficients(loaded, inputs, counterparts)
    assert got.shape == (64, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    same = (inputs == counterparts).all(1)  # feature 0 was off: no difference, no gradient
    assert 0 < int(same.sum()) < 64
    assert float(got[same].abs().max()) == 0 and float(got[~same].abs().sum()) > 0


def test_a_stopped_pairs_run_resumes_bit_identically(pair_run, tmp_path, monkeypatch, capsys):
    config = _config(tmp_path)
    out = tmp_path / "run"
    with stopped_after_epoch(2):
        assert main(["decompose", str(config), "--out", str(out), "-q"]) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().err
    assert main(["decompose", "--resume", str(out), "-q"]) == 0
    _assert_same_factors(_factors(out), _factors(pair_run))

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss_paper"] for line in lines]

    assert losses(out) == losses(pair_run) and len(losses(out)) == 4

    before = (out / "decomposition" / "subnetworks.safetensors").read_bytes()
    assert main(["decompose", "--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().err
    assert (out / "decomposition" / "subnetworks.safetensors").read_bytes() == before


def test_a_pairs_run_gets_a_report(pair_run, tmp_path):
    assert main(["report", str(pair_run), "--out", str(tmp_path / "report"), "-q"]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_analysis_of_a_pairs_run_uses_each_inputs_counterpart(pair_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(pair_run), "--out", str(out), "--n-top", "5", "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert {p.name for p in out.iterdir()} >= {
        "analysis.json", "analysis.md", "impact.safetensors", "p_active.png",
    }  # fmt: skip
    result = json.loads((out / "analysis.json").read_text())
    assert result["summary"]["pairs"] is True and result["summary"]["n_references"] == 1
    inputs, counterparts = _pairs()
    loaded = l3d.load(pair_run / "decomposition", TMS(N_FEATURES, N_HIDDEN))
    # the impact is |V_in . g| with the counterpart's output as reference, not random references
    impact = load_file(str(out / "impact.safetensors"))["impact"]
    expected = pair_coefficients(loaded, inputs, counterparts).abs()
    torch.testing.assert_close(impact, expected, rtol=1e-5, atol=1e-7)
    scores = patching_scores(loaded, inputs, counterparts)
    for record in result["subnetworks"]:
        assert record["patching_score"] == pytest.approx(float(scores[record["index"]]), abs=1e-6)
        assert 0 <= record["patching_score"] <= 1
    assert max(r["patching_score"] for r in result["subnetworks"]) > 0.5  # feature 0's circuit
    assert "patching score" in (out / "analysis.md").read_text()


def test_held_out_pairs_are_analysed_with_data(pair_run, tmp_path, capsys):
    held_out = sparse_features(
        40, N_FEATURES, p_active=0.4, generator=torch.Generator().manual_seed(7)
    )
    counterparts = held_out.clone()
    counterparts[:, 0] = 0
    path = tmp_path / "held_out.safetensors"
    save_file({"inputs": held_out, "counterparts": counterparts}, str(path))
    out = tmp_path / "analysis"
    argv = ["analyze", str(pair_run), "--data", str(path), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "analysis.json").read_text())
    best = max(r["patching_score"] for r in result["subnetworks"])
    assert result["summary"]["best_patching_score"] == best
    assert f"best patching score {best:.3g}" in capsys.readouterr().err
    assert result["summary"]["n_samples"] == 40
    loaded = l3d.load(pair_run / "decomposition", TMS(N_FEATURES, N_HIDDEN))
    impact = load_file(str(out / "impact.safetensors"))["impact"]
    expected = pair_coefficients(loaded, held_out, counterparts).abs()
    torch.testing.assert_close(impact, expected, rtol=1e-5, atol=1e-7)
    scores = patching_scores(loaded, held_out, counterparts)
    for record in result["subnetworks"]:
        assert record["patching_score"] == pytest.approx(float(scores[record["index"]]), abs=1e-6)
    capsys.readouterr()
    assert main(["analyze", str(pair_run), "--data", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and len(err.splitlines()) == 1
    # A pairs file without rows was torch.cat's "expected a non-empty list of Tensors".
    empty = tmp_path / "empty.safetensors"
    save_file({"inputs": held_out[:0], "counterparts": counterparts[:0]}, str(empty))
    argv = ["analyze", str(pair_run), "--data", str(empty), "--out", str(tmp_path / "a"), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: no pairs: the inputs have 0 rows" in err, err


def test_a_pairs_run_is_analysed_intervened_and_reported_in_its_folder(tmp_path, capsys):
    config = _config(tmp_path)
    run = tmp_path / "run"
    assert main(["decompose", str(config), "--out", str(run), "-q"]) == 0
    assert main(["analyze", str(run), "--n-samples", "40", "-q"]) == 0
    assert main(["intervene", str(run), "--subnetwork", "1", "--delta", "0.5", "-q"]) == 0
    assert main(["report", str(run), "-q"]) == 0
    assert capsys.readouterr().err == ""
    inputs, counterparts = _pairs()
    loaded = l3d.load(run / "decomposition", TMS(N_FEATURES, N_HIDDEN))
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert analysis["summary"]["n_samples"] == 40
    intervention = json.loads((run / "interventions" / "subnetwork_1.json").read_text())
    expected = pair_coefficients(loaded, inputs, counterparts)[:, 1].abs()
    torch.testing.assert_close(torch.tensor(intervention["impact"]), expected)
    assert len(intervention["change"][0]) == 64
    assert (run / "report" / "index.html").is_file()


def test_a_run_config_edited_after_the_run_is_refused_by_its_readers(pair_run, tmp_path, capsys):
    """symmetric: false -> true in config.yaml after the run: analyze and intervene ran on 128
    pairs the run was never decomposed on (64), exit 0. A moved file path stays allowed."""
    import shutil

    run = shutil.copytree(pair_run, tmp_path / "run")
    config = run / "config.yaml"
    text = config.read_text()
    moved = tmp_path / "elsewhere" / "pairs.safetensors"
    moved.parent.mkdir()
    shutil.copyfile(pair_run.parent / "pairs.safetensors", moved)
    config.write_text(text.replace(str(pair_run.parent / "pairs.safetensors"), str(moved)))
    assert main(["intervene", str(run), "--subnetwork", "0", "--delta", "0.5", "-q"]) == 0
    config.write_text(text.replace("symmetric: false", "symmetric: true"))
    for argv in (["analyze", str(run)], ["intervene", str(run), "--subnetwork", "0", "--delta",
                 "0.5"], ["report", str(run)]):  # fmt: skip
        capsys.readouterr()
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "data.pairs.symmetric: false -> true" in err, err
        assert "checkpoint" in err and "restore it" in err, err


BATCHES = """
import torch

def batches():
    return [torch.rand(8, 5) for _ in range(4)]

def words():
    return ["not", "tensors"]

def doubles():
    return torch.rand(64, 5, dtype=torch.float64)

def needs(x):
    return x

NOT_A_FUNCTION = 3
"""


def _spec(data=None, pairs=None, **l3d_changes) -> dict:
    spec = copy.deepcopy(SPEC)
    spec["data"].update(data or {})
    spec["data"]["pairs"].update(pairs or {})
    spec["l3d"].update(l3d_changes)
    return spec


def _without(section: str, key: str) -> dict:
    spec = copy.deepcopy(SPEC)
    del spec[section][key]
    return spec


@pytest.mark.parametrize(
    "spec, message",
    [
        (_spec(reference="random"), "set l3d.reference: counterpart (got 'random')"),
        (_without("l3d", "reference"), "(got 'random', the default)"),
        (_without("data", "pairs"), "l3d.reference: counterpart needs data.pairs"),
        (_spec(pairs={"countreparts": "x"}), "did you mean counterparts"),
        (_spec(pairs={"counterparts": []}), "counterparts is an empty list"),
        (
            _spec(data={"file": None, "options": {}, "python": "batches.py:batches"}),
            "data.pairs needs the inputs as one tensor or one dict of tensors",
        ),
        (
            _spec(data={"file": None, "options": {}, "toy": "tms"}),
            "names a tensor of the data file, but the data is not a file",
        ),
        (_spec(pairs={"counterparts": "missing"}), "has no tensor 'missing'"),
        (_spec(pairs={"counterparts": "short"}), "must have the inputs' shapes"),
        (_spec(pairs={"counterparts": "batches.py:words"}), "gave a str"),
        (_spec(pairs={"positions": "short"}), "but the inputs are one tensor: drop positions"),
        # Counterparts of another dtype failed in the model (torch "expected m1 and m2 to have
        # the same dtype"); the inputs' own dtype errors are one line.
        (_spec(pairs={"counterparts": "c64"}), "must have the inputs' dtypes (tensor float32"),
        (_spec(pairs={"counterparts": "i64"}), "must have the inputs' dtypes"),
        (_spec(pairs={"counterparts": "flags"}), "must have the inputs' dtypes"),
        (_spec(pairs={"counterparts": "batches.py:doubles"}), "counterparts (tensor float64"),
        # Inputs and counterparts alike, but not what the model takes: the inputs' message.
        (
            _spec(data={"options": {"key": "i64"}}, pairs={"counterparts": "i64"}),
            "the model fails on the inputs' first samples (tensor int64",
        ),
        # A dict for one-tensor inputs reached the model as a keyword (TMS.forward() got an
        # unexpected keyword argument 'inputs').
        (
            _spec(pairs={"counterparts": {"inputs": "counterparts"}}),
            "the inputs are one tensor: give the counterparts as one tensor too",
        ),
        # No rows: torch.cat(): expected a non-empty list of Tensors.
        (
            _spec(data={"options": {"key": "none"}}, pairs={"counterparts": "none"}),
            "no pairs: the inputs have 0 rows",
        ),
        # Not a function: 'int' object is not callable; arguments: a TypeError traceback.
        (
            _spec(pairs={"counterparts": "batches.py:NOT_A_FUNCTION"}),
            "NOT_A_FUNCTION is not a function (type int)",
        ),
        (
            _spec(data={"file": None, "options": {}, "python": "batches.py:NOT_A_FUNCTION"}),
            "NOT_A_FUNCTION is not a function (type int)",
        ),
        (
            _spec(pairs={"counterparts": "batches.py:needs"}),
            "is called with no arguments: missing a required argument: 'x'",
        ),
        # Counterparts equal to the inputs decomposed to loss 0.0 and saved a meaningless
        # decomposition (only `l3d analyze` refused them).
        (_spec(pairs={"counterparts": "inputs"}), "the pairs' outputs are identical at W0"),
        # symmetric: "yes" and 1 were taken as true; the other sections are strict.
        (_spec(pairs={"symmetric": "yes"}), "symmetric"),
        (_spec(pairs={"symmetric": 1}), "symmetric"),
    ],
    ids=[
        "other-reference",
        "default-reference",
        "counterpart-without-pairs",
        "misspelt-key",
        "no-counterparts",
        "batches",
        "not-a-file",
        "missing-tensor",
        "wrong-shape",
        "not-tensors",
        "positions-of-a-tensor",
        "float64",
        "int64",
        "bool",
        "float64-function",
        "int64-inputs-and-counterparts",
        "dict-for-a-tensor",
        "no-rows",
        "not-callable",
        "data-not-callable",
        "needs-arguments",
        "identical",
        "symmetric-string",
        "symmetric-int",
    ],
)
def test_bad_pair_configs_are_one_line_errors(tmp_path, capsys, spec, message):
    (tmp_path / "batches.py").write_text(BATCHES)
    counterparts = _pairs()[1]
    config = _config(
        tmp_path, spec, short=torch.zeros(3, N_FEATURES), c64=counterparts.double(),
        i64=counterparts.long(), flags=counterparts.bool(), none=torch.zeros(0, N_FEATURES),
    )  # fmt: skip
    assert main(["decompose", str(config), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("l3d decompose: error: ") and message in err, err


def test_pair_tensors_in_the_data_file_are_not_inputs(tmp_path):
    """Without options.key, the file's tensors other than the pairs' are the inputs."""
    config = _config(tmp_path, _spec(data={"options": {}}))
    spec = runs.load_spec(config)
    data = runs.build_data(spec.data, spec.model, TMS(N_FEATURES, N_HIDDEN))
    assert isinstance(data, Referenced)
    assert torch.equal(data.inputs, _pairs()[0])


TWO_INPUTS = """
import torch
from torch import nn


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, a, b):
        return self.lin(a) - self.lin(b)


def make():
    torch.manual_seed(0)
    return Two()
"""


def test_dict_inputs_take_their_counterparts_by_key_and_several_sets(tmp_path):
    """{input key: tensor name} counterparts for dict inputs; a list makes several sets, each its
    own pairs; with symmetric each pair also the other way round."""
    (tmp_path / "two.py").write_text(TWO_INPUTS)
    g = torch.Generator().manual_seed(1)
    a, b, a2, b2 = (torch.rand(6, 5, generator=g) for _ in range(4))
    save_file({"a": a, "b": b, "ca": a2, "cb": b2}, str(tmp_path / "pairs.safetensors"))
    spec = {
        "model": {"python": "two.py:make"},
        "data": {
            "file": "pairs.safetensors",
            "pairs": {
                "counterparts": [{"a": "ca", "b": "cb"}, {"a": "a", "b": "cb"}],
                "symmetric": True,
            },
        },
        "l3d": {"params": ["lin.weight"], "n_subnetworks": 2, "reference": "counterpart"},
    }
    (tmp_path / "pairs.yaml").write_text(yaml.safe_dump(spec))
    spec = runs.load_spec(tmp_path / "pairs.yaml")
    model = runs.build_model(spec.model)
    data = runs.build_data(spec.data, spec.model, model)
    assert isinstance(data, Referenced) and isinstance(data.inputs, dict)
    assert sorted(data.inputs) == ["a", "b"]  # ca, cb are the pairs', not inputs
    assert data.references.shape == (24, 3)  # 2 sets x 6 pairs x both ways
    with torch.no_grad():
        torch.testing.assert_close(data.references[:6], model(a2, b2))
        torch.testing.assert_close(data.references[6:12], model(a, b2))
        torch.testing.assert_close(data.references[12:], model(a, b).repeat(2, 1))
    torch.testing.assert_close(data.inputs["a"], torch.cat([a, a, a2, a]))


def test_the_docs_pairs_example_is_a_valid_run_spec():
    import re

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    section = text.split("### Contrastive pairs", 1)[1]
    block = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[0])
    spec = runs.RunSpec.create({"model": SPEC["model"], **block})
    assert spec.data.pairs is not None and spec.data.pairs.names() == ["counterparts"]
    assert spec.l3d.reference == "counterpart"


def test_checkpoints_of_runs_without_pairs_keep_their_config_hash():
    """A run stopped before data.pairs existed still resumes: its resolved config (and hash)
    has no 'pairs' key."""
    spec = runs.RunSpec.create(
        {**_without("data", "pairs"), "l3d": _without("l3d", "reference")["l3d"]}
    )
    assert "pairs" not in spec.resolved()["data"]
    assert "pairs" in runs.RunSpec.create(SPEC).resolved()["data"]


def test_data_replaces_only_a_data_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"inputs": torch.zeros(2, N_FEATURES)}, str(path))
    source = runs.DataSource(file="a.safetensors", options={"key": "inputs"})
    assert runs.with_data_file(source, path).file == str(path)
    with pytest.raises(l3d.L3DError, match="come from a toy"):
        runs.with_data_file(runs.DataSource(toy="tms"), path)
