"""Property-based fuzzing of the config surfaces: whatever a user writes in an L3DConfig or a run
config file, l3d either accepts it or answers with one L3DError line, never another exception."""

from __future__ import annotations

import math
import string

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from l3d import L3DConfig, L3DError  # noqa: E402
from l3d.runs import load_spec  # noqa: E402
from l3d.runs.spec import RunSpec  # noqa: E402

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FIELDS = list(L3DConfig.model_fields)
VALID = {"params": ["fc1.weight"], "n_subnetworks": 3}

# Keys: the real fields, near misses and arbitrary text (line breaks, quotes, unicode included).
keys = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(FIELDS).map(lambda k: k[:-1] or k + "x"),
    st.text(min_size=1, max_size=12),
    st.text(alphabet=string.ascii_lowercase + "_\n'\"", min_size=1, max_size=12),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=2),
    st.text(max_size=20),
    st.sampled_from(["5", "no", "yes", "1e-3", "0.1", "auto", "kl", "cuda", "*", "custom:f"]),
    st.sampled_from(["cp", "tucker", "paper", "step", "epoch", "highest", "adam", "mean"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
# A valid config with some fields replaced or added: reaches the validators behind the first
# missing key.
mutated = st.builds(
    lambda base, changes: {**base, **changes},
    st.just(VALID),
    st.dictionaries(keys, values, max_size=5),
)
configs = st.one_of(st.dictionaries(keys, values, max_size=8), mutated)


def assert_one_line_or_valid(make) -> None:
    try:
        make()
    except L3DError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)


@FUZZ
@given(configs)
def test_l3d_config_fields(fields):
    assert_one_line_or_valid(lambda: L3DConfig.create(**fields))


# Any text a file may hold, but for control characters (see the xfail test below).
texts = st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=60)


@FUZZ
@given(st.one_of(configs, st.dictionaries(scalars, values, max_size=4)), st.booleans(), texts)
def test_l3d_config_yaml_text(fields, raw, text):
    text = (text if raw else yaml.safe_dump(fields, allow_unicode=True)) + "\n"
    assert_one_line_or_valid(lambda: L3DConfig.from_yaml(text))


@pytest.mark.parametrize("text", ["\x1f\n", "a: \x00\n", "params: [\n", "\x85: 1\n"])
def test_l3d_config_yaml_with_control_characters(tmp_path, text):
    assert_one_line_or_valid(lambda: L3DConfig.from_yaml(text))
    (tmp_path / "c.yaml").write_text(text)
    assert_one_line_or_valid(lambda: L3DConfig.from_yaml(tmp_path / "c.yaml"))


sections = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(
            values,
            st.fixed_dictionaries(
                {}, optional={"toy": scalars, "hf": scalars, "python": scalars, "options": values}
            ),
        ),
        "data": st.one_of(
            values,
            st.fixed_dictionaries(
                {},
                optional={"toy": scalars, "file": scalars, "labels": scalars, "options": values},
            ),
        ),
        "l3d": st.one_of(values, configs),
        "run": st.one_of(
            values,
            st.dictionaries(
                st.sampled_from(["checkpoint_seconds", "progress", "tracking", "project", "x"]),
                values,
                max_size=3,
            ),
        ),
    },
)
specs = st.one_of(sections, st.dictionaries(keys, values, max_size=4), values)


@FUZZ
@given(specs)
def test_run_spec_create(data):
    assert_one_line_or_valid(lambda: RunSpec.create(data))


# `--set` items as a shell passes them: no line breaks (runs.spec quotes the item as given).
one_line_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cc", "Zl", "Zp"]), max_size=16
)
overrides = st.lists(
    st.one_of(
        one_line_text,
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from([*FIELDS, "l3d.epochs", "run.progress", "model.toy", "data", "x.y"]),
            one_line_text,
        ),
    ),
    max_size=2,
)


@FUZZ
@given(specs, overrides, st.booleans())
def test_load_spec_on_yaml_files(tmp_path, data, overrides, as_text):
    path = tmp_path / "run.yaml"
    # Valid YAML from generated data, or other text (broken YAML, tabs, stray quotes).
    text = yaml.safe_dump(data, allow_unicode=True) if not as_text else _printable(str(data))
    path.write_text(text, encoding="utf-8")
    assert_one_line_or_valid(lambda: load_spec(path, overrides))


def test_every_field_value_round_trips_through_yaml():
    """The strict types still read back what to_yaml writes."""
    config = L3DConfig.create(**VALID, rank={"fc1.*": 2}, lr=1e-3, chunk_size=4, top_k=1)
    assert L3DConfig.from_yaml(config.to_yaml()) == config
    assert not math.isnan(config.lr)


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable() or c in "\n\t")


SPEC = "model: {toy: tms}\ndata: {toy: tms}\nl3d: {params: [a], n_subnetworks: 2}\n"


@pytest.mark.parametrize(
    "text",
    [
        SPEC + "run: {project: 2020-01-01}\n",
        SPEC + "run: {project: !!binary aGk=}\n",
        SPEC + "run: !!set {a}\n",
        "\x1f" + SPEC,
    ],
    ids=["date", "binary", "set", "control-character"],
)
def test_yaml_beyond_json_is_a_one_line_error(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert_one_line_or_valid(lambda: load_spec(path))
