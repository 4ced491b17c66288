"""l3d.decompose's defaults ('l3d' settings) against the paper's, group by group."""

import pytest
import torch

import l3d
from conftest import SmallMLP
from l3d.config import L3DConfig
from l3d.core import resampling
from l3d.errors import L3DError

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = ("lr_decay", "lr_decay_unit", "lr_decay_every", "resample_every", "resample_until")


def run(**options) -> l3d.Decomposition:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    return l3d.decompose(
        SmallMLP(), x, params=["fc1.weight"], n_subnetworks=3, progress=False, **options
    )


def test_library_settings_decay_per_epoch_resample_and_start_from_gradients():
    d = run(epochs=20)
    c = d.config
    assert (c.lr_decay, c.lr_decay_unit, c.lr_decay_every) == (0.8, "epoch", 2)
    assert (c.resample_every, c.resample_until, c.init) == (2, 10, "gradients")
    # The lr follows the recorded schedule: x0.8 after every 2 epochs.
    assert [r["lr"] for r in d.history[:5]] == pytest.approx([0.01, 0.01, 0.008, 0.008, 0.0064])
    # The run equals the same settings given by hand (the config records all of them).
    again = run(settings="paper", **{k: getattr(c, k) for k in (*SCHEDULE, "init", "epochs")})
    torch.testing.assert_close(
        again.subnetworks.v_out.materialize_flat(), d.subnetworks.v_out.materialize_flat()
    )


def test_paper_settings_are_the_config_defaults():
    c = run(epochs=4, settings="paper").config
    for field in (*SCHEDULE, "init"):
        assert getattr(c, field) == L3DConfig.model_fields[field].default, field


def test_a_group_the_caller_sets_stays_the_callers():
    c = run(epochs=4, lr_decay_every=3, resample_every=None).config
    # lr_decay_every alone keeps the paper's per-step unit; resampling stays off; init is added.
    assert (c.lr_decay_unit, c.lr_decay_every) == ("step", 3)
    assert c.resample_every is None and c.resample_until is None
    assert c.init == "gradients"


def test_dense_helpers_only_where_dense_gradients_stay_small(monkeypatch):
    # fc1.weight has 24 entries: 4 samples per subnetwork for 3 subnetworks need 288.
    assert resampling.dense_helpers_fit(24, 3, 32, per_token=False)
    assert not resampling.dense_helpers_fit(24, 3, 32, per_token=True)
    monkeypatch.setattr(resampling, "INIT_MAX_ELEMENTS", 24 * 4 * 3 - 1)
    assert not resampling.dense_helpers_fit(24, 3, 32, per_token=False)
    c = run(epochs=4).config
    assert (c.init, c.resample_every, c.lr_decay_unit) == ("random", None, "epoch")


def test_unknown_settings_are_a_one_line_error():
    with pytest.raises(L3DError, match="unknown settings 'best'.*l3d, paper"):
        run(epochs=1, settings="best")
