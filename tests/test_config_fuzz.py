"""Fuzzed configuration: every bad value is exit 2 naming its field, never a traceback.

Hypothesis generates ``--set KEY=VALUE`` flags and search space YAML files with values of the
wrong type, out of range, or under unknown keys. Through ``launcher.main`` each must either
pass every check (the tripwire that replaces Ray's start is reached) or end with exit code 2
and ``error: <field>: ...`` naming the field; any other exception fails the test. No Ray
starts; the examples are capped so the file runs in seconds.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ray_mtup import launcher, search
from ray_mtup.config import LoraSettings, TinyModelSettings, TrainConfig, resolve_config
from ray_mtup.errors import ConfigError
from ray_mtup.trial import SAMPLED_KEYS

FIELDS = list(TrainConfig.model_fields)
NESTED = {"lora": list(LoraSettings.model_fields), "tiny": list(TinyModelSettings.model_fields)}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Passed(Exception):
    """Every check before Ray passed (the tripwire replacing the corpus check and Ray's start)."""


@pytest.fixture
def tripwire(monkeypatch):
    def stop(*args, **kwargs):
        raise Passed()

    monkeypatch.setattr(launcher, "check_corpus", stop)  # the corpus is not what is fuzzed here
    monkeypatch.setattr(launcher, "start_ray", stop)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["q_proj", "v2_natural", "tiny", "nan_loss@1", "oom@1:2", "1e-3", "-1", "0", "yes", "null"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
keys = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from([f"{group}.{name}" for group, names in NESTED.items() for name in names]),
    st.sampled_from(["lora.rank", "tiny.depth", "epochs.value", "lora.r.x", "optimizer", "", " ", "a.b"]),
    st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,8})?", fullmatch=True),
)
# a value as the user types it: YAML of a generated value, or arbitrary (often invalid) YAML text
value_text = st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16),
                       st.sampled_from(["[unclosed", "{a: 1", "*anchor", "!!python/object:os.system x", "a: b: c",
                                        "'", "- - -", "1e-3", "0x10", ".inf", "~"]))


def _main(argv, capsys) -> tuple[int | str, str]:
    """(exit code or 'passed', stderr) of launcher.main; any other exception fails the test."""
    try:
        code = launcher.main(argv)
    except Passed:
        code = "passed"
    except SystemExit as exc:  # argparse usage errors exit 2 by themselves
        code = exc.code
    except Exception:  # noqa: BLE001 -- the property under test: nothing else escapes
        pytest.fail(f"launcher.main({argv!r}) raised:\n{traceback.format_exc()}")
    return code, capsys.readouterr().err


def _named(field: str, key: str) -> bool:
    """Whether an error about ``key`` names it (or the part of it that is wrong)."""
    head = key.split(".")[0]
    if key == "":  # an empty key can only be named by its flag or as itself
        return field in ("", "--set")
    return bool(field) and (field == key or key.startswith(field + ".") or field.startswith(head))


@FUZZ
@given(key=keys, text=value_text)
@example(key="lora", text="5")
@example(key="lora.target_modules", text="q_proj")
@example(key="epochs", text="[unclosed")
@example(key="tiny", text="[1, 2]")
def test_set_flag_is_accepted_or_exit_2_naming_the_field(tmp_path, capsys, tripwire, key, text):
    code, err = _main(["--model", "tiny", "--smoke-test", "--storage-path", str(tmp_path / "r"),
                       "--set", f"{key}={text}"], capsys)
    if code == "passed":
        return
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    field = err[len("error: "):].split(": ", 1)[0]
    assert _named(field, key.strip()), f"--set {key}={text}: {err}"


@FUZZ
@given(key=keys, value=values)
@example(key="lora.target_modules", value="q_proj")
@example(key="lora.target_modules", value=[1, 2])
def test_accepted_override_keeps_its_value(key, value):
    """A value that passes validation is the value asked for (no silent conversion)."""
    if value is None:  # resolve_config reads None as "not given" (a flag left out): nothing changes
        assert resolve_config("tiny", overrides={key: None}) == resolve_config("tiny")
        return
    try:
        cfg = resolve_config("tiny", overrides={key: value})
    except ConfigError as exc:
        assert _named(exc.field, key), f"{key}={value!r}: {exc}"
        return
    got = cfg.to_dict()
    for part in key.split("."):
        got = got[part]
    if isinstance(got, dict):  # a whole nested group: the keys given are the keys set
        assert isinstance(value, dict) and all(got[k] == v for k, v in value.items())
    elif isinstance(got, list):  # one name is a list of that one name, never its characters
        assert got == ([value] if isinstance(value, str) else list(value))
    else:
        assert got == value or (isinstance(got, float) and math.isclose(got, float(value))), (key, value, got)


# --- search spaces ----------------------------------------------------------------------------

param_specs = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(search.PARAM_TYPES), scalars)},
    optional={"low": values, "high": values, "values": values, "step": values},
)
spaces = st.fixed_dictionaries(
    {"params": st.one_of(st.dictionaries(st.one_of(st.sampled_from(SAMPLED_KEYS), st.text(max_size=8)),
                                         st.one_of(param_specs, values), max_size=3), values)},
    optional={
        "num_samples": values, "grace_period": values, "reduction_factor": values, "seed": values,
        "overrides": st.one_of(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values,
                                               max_size=2), values),
        "search_alg": values,
    },
)


@FUZZ
@given(space=spaces)
@example(space={"params": {"lora_r": {"type": "choice", "values": 8}}})
@example(space={"params": {"lora_r": {"type": "choice", "values": [8]}}, "num_samples": "many"})
@example(space={"params": {"lora_r": {"type": "choice", "values": [8]}}, "reduction_factor": [2]})
@example(space={"params": {"epochs": {"type": "choice", "values": ["x"]}}})
@example(space={"params": {"lora_r": {"type": "randint", "low": 1, "high": 1e300}}})
def test_search_space_is_valid_or_a_config_error_naming_the_key(tmp_path_factory, space):
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(yaml.safe_dump(space, allow_unicode=True), encoding="utf-8")
    try:
        loaded = search.load_search_space(path)
    except ConfigError as exc:
        top = exc.field.split(".")[0]
        assert exc.field == str(path) or top in set(space) | set(search.SPACE_KEYS) | set(FIELDS), exc
        return
    except Exception:  # noqa: BLE001
        pytest.fail(f"load_search_space({space!r}) raised:\n{traceback.format_exc()}")
    # a space that loads can be used: its first trial's config builds, its counters are numbers
    assert loaded.num_samples >= 1 and loaded.grace_period >= 1 and loaded.reduction_factor >= 2
    assert loaded.max_epochs >= 1
    base = resolve_config("tiny").replace(**loaded.overrides)
    search.documented_optimum(loaded, base)
    loaded.param_space()


def test_set_with_a_bad_search_space_through_main(tmp_path, capsys, tripwire):
    """The search space and ``--set`` errors both reach the user as exit 2 (not fuzzed: one case)."""
    space = Path(tmp_path / "s.yaml")
    space.write_text("params:\n  lora_r: {type: choice, values: [8]}\nnum_samples: many\n", encoding="utf-8")
    code, err = _main(["--search-space", str(space), "--storage-path", str(tmp_path / "r")], capsys)
    assert (code, err.split(":")[0:2]) == (2, ["error", " num_samples"]), err
