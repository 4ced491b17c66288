"""The save format under faults: other weights, hand edits, truncation, unwritable targets, run
folders and custom divergences each get one L3DError line naming the file and the fix."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import l3d
from conftest import SmallMLP
from l3d import L3DError, io


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A decomposition of SmallMLP (seed 0) saved once; tests edit copies of its folder."""
    torch.manual_seed(0)
    model = SmallMLP()
    d = l3d.decompose(
        model, torch.randn(48, 4), params=["fc1.weight", "fc2.weight"], n_subnetworks=3,
        rank=1, epochs=1, progress=False,
    )  # fmt: skip
    return d.save(tmp_path_factory.mktemp("saved") / "decomposition")


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "decomposition"
    shutil.copytree(saved, copy)
    return copy


def model() -> SmallMLP:
    torch.manual_seed(0)
    return SmallMLP()


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def edit_json(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# Item 5: other weights of the same shapes -----------------------------------------------------


def test_saved_file_records_a_fingerprint_of_the_decomposed_weights(folder):
    meta = json.loads((folder / "decomposition.json").read_text())
    fingerprint = meta["w0_fingerprint"]
    assert set(fingerprint) == {"fc1.weight", "fc2.weight"}
    w = model().fc1.weight.detach()
    assert fingerprint["fc1.weight"] == io.fingerprint({"fc1.weight": w})["fc1.weight"]
    assert set(fingerprint["fc1.weight"]) == {"sum", "sum_sq", "sha256"}
    assert fingerprint["fc1.weight"]["sum"] == pytest.approx(float(w.double().sum()))


def test_load_refuses_other_weights_of_the_same_shapes_unless_allowed(folder):
    other = model()
    with torch.no_grad():
        other.fc2.weight[0, 0] += 1e-3  # one entry of one decomposed tensor
        other.fc1.bias += 1.0  # not decomposed: not checked
    with pytest.raises(L3DError) as err:
        l3d.load(folder, other)
    message = one_line(err)
    assert "fc2.weight" in message and "fc1.weight" not in message
    assert "allow_other_weights=True" in message and str(folder) in message
    assert "a run folder: restore the model its config.yaml names" in message  # the CLI's fix
    loaded = l3d.load(folder, other, allow_other_weights=True)
    assert loaded.n_subnetworks == 3
    # Saving again keeps the fingerprint of the weights the subnetworks were learned on.
    loaded.save(folder.parent / "again")
    with pytest.raises(L3DError, match="fc2.weight"):
        l3d.load(folder.parent / "again", other)
    l3d.load(folder.parent / "again", model())


def test_files_saved_before_fingerprints_still_load(folder):
    meta = json.loads((folder / "decomposition.json").read_text())
    del meta["w0_fingerprint"]
    (folder / "decomposition.json").write_text(json.dumps(meta))
    other = model()
    with torch.no_grad():
        other.fc2.weight += 1.0
    with pytest.warns(UserWarning, match="without a fingerprint"):
        l3d.load(folder, other)


# Item 9: hand edits and truncation ------------------------------------------------------------


def test_decomposition_json_with_a_syntax_error(folder):
    path = folder / "decomposition.json"
    path.write_text(path.read_text() + "}")
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    assert f"{path} is not valid JSON" in one_line(err)


@pytest.mark.parametrize(
    "changes, said",
    [
        ({"ranks": {"fc1.weight": 2, "fc2.weight": 1}}, "v_in.tensors.0"),
        ({"shapes": {"fc1.weight": [6, 5], "fc2.weight": [3, 6]}}, "v_in.tensors.0"),
        ({"ranks": {"fc1.weight": "x", "fc2.weight": 1}}, "'ranks'"),
        ({"ranks": {"fc1.weight": 1}}, "'ranks'"),
        ({"shapes": [[6, 4]]}, "'shapes'"),
        ({"evaluation": {}}, "'evaluation'"),
        ({"history": 3}, "'history'"),
        ({"format_version": 7}, "format version 7"),
        ({"format_version": "1"}, "format version '1', expected 1"),
    ],
)
def test_edited_decomposition_json_is_one_line_naming_it(folder, changes, said):
    edit_json(folder / "decomposition.json", **changes)
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    message = one_line(err)
    assert said in message and "decomposition.json" in message


def test_decomposition_json_that_is_not_a_mapping(folder):
    (folder / "decomposition.json").write_text("[1, 2]")
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    assert "decomposition.json" in one_line(err)


@pytest.mark.parametrize(
    "old, new, said",
    [
        ("n_subnetworks: 3", "n_subnetworks: 4", "n_subnetworks"),
        ("factorization: cp", "factorization: tucker", "factorization"),
        ("n_subnetworks: 3", "n_subnetworks: 0", "n_subnetworks"),
        ("seed: 0", "seed: 0\nextra: !!python/object:collections.OrderedDict {}", "YAML"),
        ("seed: 0", "seed: [0", "YAML"),
    ],
)
def test_edited_config_yaml_is_one_line_naming_it(folder, old, new, said):
    path = folder / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    message = one_line(err)
    assert said in message and path.name in message and str(folder) in message
    assert message.count(str(path)) <= 1, message  # a YAML problem named the file twice
    if "python/object" in new:
        assert "remove the tag" in message


@pytest.mark.parametrize("dtype", [torch.bool, torch.float64, torch.bfloat16])
def test_a_factor_of_another_dtype_is_refused(folder, dtype):
    """A factor rewritten as bool was cast to float32 and used: the directions changed silently
    (an intervention's change 0.343 -> 0.728)."""
    path = folder / "subnetworks.safetensors"
    tensors = io.load_tensors(path, "factors")
    name = next(k for k in tensors if k != "p_active")
    tensors[name] = tensors[name].to(dtype)
    io.save_tensors(path, tensors)
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    message = one_line(err)
    assert f"{name} is {str(dtype)[6:]}, expected float32" in message and str(path) in message


@pytest.mark.parametrize("keep", [0, 0.05, 0.5, 0.99])
def test_truncated_factor_file_is_one_line_naming_it(folder, keep):
    path = folder / "subnetworks.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    assert f"{path} is not a readable safetensors file" in one_line(err)


def test_factor_file_without_p_active(folder):
    path = folder / "subnetworks.safetensors"
    tensors = io.load_tensors(path, "factors")
    del tensors["p_active"]
    io.save_tensors(path, tensors)
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    assert "p_active" in one_line(err) and str(path) in str(err.value)


@pytest.mark.parametrize("key", ["p_active", "v_out"])
def test_factor_file_with_non_finite_values(folder, key):
    """Found by a scripted pass: NaN factors loaded, then interventions returned NaN outputs and
    the report died in a histogram."""
    path = folder / "subnetworks.safetensors"
    tensors = io.load_tensors(path, "factors")
    name = next(k for k in tensors if k.startswith(key))
    tensors[name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    io.save_tensors(path, tensors)
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    assert f"2 NaN/inf values in {path} ({name})" in one_line(err)
    assert "re-create the decomposition" in str(err.value)


# Item 10: saving onto a file or an unwritable folder ------------------------------------------


def test_save_onto_an_existing_file(saved, tmp_path):
    d = l3d.load(saved, model())
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(L3DError) as err:
        d.save(target)
    message = one_line(err)
    assert str(target) in message and "is a file" in message
    with pytest.raises(L3DError) as err:
        d.save(target / "below")
    assert str(target) in one_line(err)


def test_save_into_an_unwritable_folder(saved, tmp_path, monkeypatch):
    d = l3d.load(saved, model())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    with pytest.raises(L3DError) as err:
        d.save(tmp_path / "out")
    message = one_line(err)
    assert str(tmp_path / "out") in message and "Permission denied" in message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anyway")
def test_save_into_a_read_only_folder(saved, tmp_path):
    d = l3d.load(saved, model())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for target in (locked, locked / "new"):
            with pytest.raises(L3DError) as err:
                d.save(target)
            assert str(target) in one_line(err)
    finally:
        locked.chmod(0o755)


# Items 13 and 14: what load says about custom divergences and run folders ---------------------


def test_load_of_a_custom_divergence_says_to_pass_it(tmp_path):
    def my_divergence(output, reference):
        return (output - reference).abs().mean()

    net = model()
    d = l3d.decompose(
        net, torch.randn(16, 4), params=["fc1.weight"], n_subnetworks=2, epochs=1,
        divergence=my_divergence, progress=False,
    )  # fmt: skip
    d.save(tmp_path / "custom")
    with pytest.raises(L3DError) as err:
        l3d.load(tmp_path / "custom", net)
    assert "divergence=" in one_line(err)
    loaded = l3d.load(tmp_path / "custom", net, divergence=my_divergence)
    x = torch.randn(5, 4)
    assert torch.equal(loaded.coefficients(x), d.coefficients(x))


def test_load_of_a_run_folder_points_to_its_decomposition(saved, tmp_path):
    run = tmp_path / "runs" / "tms"
    shutil.copytree(saved, run / "decomposition")
    (run / "config.yaml").write_text("l3d: {}\n")
    with pytest.raises(L3DError) as err:
        l3d.load(run, model())
    message = one_line(err)
    assert "this is a run folder" in message
    assert f"load {run / 'decomposition'}" in message and "l3d.runs.open_run" in message


def test_load_of_a_missing_folder(tmp_path):
    with pytest.raises(L3DError, match="does not exist"):
        l3d.load(tmp_path / "nowhere", model())


def test_a_folder_or_a_device_in_place_of_a_tensor_file_is_named_as_such(tmp_path):
    """Every reader of safetensors files (run data, adapters, checkpoints) goes through
    io.load_tensors: a folder or /dev/zero was reported as missing."""
    with pytest.raises(L3DError, match=r"data file '.*' is a folder, not a file"):
        io.load_tensors(tmp_path, "data file")
    with pytest.raises(L3DError, match=r"'/dev/zero' is not a regular file \(a device"):
        io.load_tensors("/dev/zero", "data file")
    with pytest.raises(L3DError, match=r"data file .*missing.safetensors does not exist"):
        io.load_tensors(tmp_path / "missing.safetensors", "data file")


def test_file_hash_is_read_once_per_process_unless_the_file_changed(tmp_path, monkeypatch):
    """`l3d control` opens its run several times, and each opening checks the data file's sha256:
    a multi-GB token file was read each time. A file unchanged since a hash (same size, inode and
    modification time, older than the clock's granularity) is not read again; a rewritten one
    is, also when it keeps its size."""
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 1000)
    old = 1_000_000_000
    os.utime(data, ns=(old, old))  # long before now: safe to remember
    reads = []
    real_open = type(data).open

    def counting_open(self, mode="r", *args, **kwargs):
        if mode == "rb":
            reads.append(self)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(data), "open", counting_open)
    first = io.file_sha256(data)
    assert io.file_sha256(data) == first and len(reads) == 1
    data.write_bytes(b"b" * 1000)  # same size, modified now
    second = io.file_sha256(data)
    assert second != first and len(reads) == 2
    assert io.file_sha256(data) == second and len(reads) == 3  # too recent to remember


# Files rewritten by other tools ----------------------------------------------------------------
class SameShapes(torch.nn.Module):
    """Two decomposed tensors of one shape, in an order that sorting their names reverses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.z_first = torch.nn.Linear(5, 5)
        self.mid = torch.nn.Linear(5, 5)

    def forward(self, x):
        return self.mid(torch.tanh(self.z_first(x)))


def test_json_rewritten_with_sorted_keys_loads_the_same(tmp_path):
    """`jq -S` or json.dump(sort_keys=True) reorders 'shapes': the factors, stored by position,
    were read in that order, so same-shaped tensors swapped their directions silently."""
    from l3d.finetuning import Adapter, load_adapter

    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    d = l3d.decompose(SameShapes(), x, params=["z_first.weight", "mid.weight"], n_subnetworks=3,
                      epochs=1, progress=False)  # fmt: skip
    adapter = Adapter(d.model, d.subnetworks.v_out, [0, 2])
    with torch.no_grad():
        adapter.alpha.copy_(torch.tensor([0.5, -0.3]))
    d.save(tmp_path / "d")
    adapter.save(tmp_path / "a")
    for path in (tmp_path / "d" / "decomposition.json", tmp_path / "a" / "adapter.json"):
        path.write_text(json.dumps(json.loads(path.read_text()), sort_keys=True, indent=1))
    loaded = l3d.load(tmp_path / "d", d.model)
    assert torch.equal(loaded.coefficients(x), d.coefficients(x))
    again = load_adapter(tmp_path / "a", d.model)
    assert torch.equal(again.forward(x), adapter.forward(x))


def test_a_model_of_another_dtype_is_named_on_load(folder):
    """bfloat16 was refused as 'made on other weights', float64 loaded and then failed or gave
    float64 outputs depending on the call."""
    for dtype in (torch.bfloat16, torch.float64):
        with pytest.raises(L3DError, match=f"{str(dtype)[6:]}: l3d computes in float32") as err:
            l3d.load(folder, model().to(dtype))
        one_line(err)


@pytest.mark.parametrize(
    "evaluation, said",
    [
        ({"loss_paper": "low"}, "'evaluation'"),
        ({"loss_pooled_squared": -1.0}, "'evaluation'"),
        ({"n_samples": "all"}, "'evaluation'"),
    ],
)
def test_evaluation_values_of_the_wrong_type_are_one_line(folder, evaluation, said):
    meta = json.loads((folder / "decomposition.json").read_text())
    edit_json(folder / "decomposition.json", evaluation={**meta["evaluation"], **evaluation})
    with pytest.raises(L3DError, match=said) as err:
        l3d.load(folder, model())
    one_line(err)


def test_a_huge_subnetwork_count_in_config_yaml_is_refused_before_allocating(folder):
    """config.yaml edited to 2 x 10^7 subnetworks: the factors were allocated for that count
    before being compared with the file (3.7 GB; at 10^9 the process was killed for memory)."""
    path = folder / "config.yaml"
    path.write_text(path.read_text().replace("n_subnetworks: 3", "n_subnetworks: 20000000"))
    with pytest.raises(L3DError, match="n_subnetworks") as err:
        l3d.load(folder, model())
    one_line(err)


def test_zero_decoder_factors_are_one_line(folder):
    """All-zero V_out factors loaded, and v_out(k) was a direction of norm 0."""
    from safetensors.torch import load_file, save_file

    path = folder / "subnetworks.safetensors"
    tensors = load_file(path)
    for key in tensors:
        if key.startswith("v_out.") and key.endswith("modes.0"):
            tensors[key][1] = 0.0  # subnetwork 1, in every tensor
    save_file(tensors, path)
    with pytest.raises(
        L3DError, match="zero decoder directions \\(V_out of subnetworks 1\\)"
    ) as err:
        l3d.load(folder, model())
    one_line(err)


def test_names_reordered_in_decomposition_json_are_refused(tmp_path):
    """Two same-shaped tensors swapped in decomposition.json's names swapped their subnetwork
    directions silently (the factors are stored by position): the factor file records its order."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    d = l3d.decompose(net, torch.randn(32, 4), params=["0.weight", "2.weight"], n_subnetworks=2,
                      epochs=1, progress=False)  # fmt: skip
    folder = d.save(tmp_path / "d")
    assert l3d.load(folder, net).n_subnetworks == 2
    path = folder / "decomposition.json"
    meta = json.loads(path.read_text())
    meta["names"] = meta["names"][::-1]
    path.write_text(json.dumps(meta))
    with pytest.raises(L3DError) as err:
        l3d.load(folder, net)
    message = one_line(err)
    assert "names" in message and "['2.weight', '0.weight']" in message, message


def test_a_fingerprint_without_an_entry_is_named_as_damage(folder):
    """One tensor's entry deleted from w0_fingerprint read as 'made on other weights', though
    the weights were those decomposed."""
    path = folder / "decomposition.json"
    meta = json.loads(path.read_text())
    del meta["w0_fingerprint"]["fc2.weight"]
    path.write_text(json.dumps(meta))
    with pytest.raises(L3DError) as err:
        l3d.load(folder, model())
    message = one_line(err)
    assert (
        "w0_fingerprint" in message and "fc2.weight" in message and "other weights" not in message
    )


class NormedMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


@pytest.mark.parametrize("change", ["bn.running_mean", "fc2.weight"])
def test_a_model_whose_other_tensors_differ_is_refused_on_load(tmp_path, change):
    """Only the decomposed tensors were fingerprinted: a loader that gave other BatchNorm
    statistics (or another head) loaded silently, and interventions measured another model."""
    torch.manual_seed(0)
    net = NormedMLP().eval()
    d = l3d.decompose(net, torch.randn(32, 4), params=["fc1.weight"], n_subnetworks=2,
                      epochs=1, progress=False)  # fmt: skip
    folder = d.save(tmp_path / "d")
    x = torch.randn(5, 4)
    expected = d.intervene(x, 0, 1.0)
    torch.testing.assert_close(l3d.load(folder, net).intervene(x, 0, 1.0), expected)
    with torch.no_grad():
        dict(net.named_buffers(), **dict(net.named_parameters()))[change].add_(0.5)
    with pytest.raises(L3DError) as err:
        l3d.load(folder, net)
    message = one_line(err)
    assert change in message and "allow_other_weights=True" in message, message
    assert l3d.load(folder, net, allow_other_weights=True).n_subnetworks == 2
