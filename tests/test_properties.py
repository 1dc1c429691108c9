"""Property-based tests: whatever a user feeds the config loader, the front door or the override
editor, the answer is a config or a ConfigError, never another exception.

(tests/test_overrides.py already covers parse_override / parse_value on arbitrary strings.)
"""

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difftrain.cli import config_from_argv
from difftrain.config import ALIASES, FIELD_NAMES, Config, load_config, validate_config_dict
from difftrain.errors import ConfigError
from difftrain.jsonfile import read_json_object
from difftrain.overrides import apply_overrides

KNOWN_KEYS = sorted({*FIELD_NAMES, *ALIASES, "2nd pass", "$schema", "simulation"})
SIMULATION_KEYS = ["size", "coarsen", "trajectories", "steps", "keep", "dt", "reynolds", "wavenumber", "drag"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**20, max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["0.0002", "4", "true", "AdamW", "LoRA", "kolmogorov", "cosine", "-1", "1e400", ""]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=15))
nested_section = st.dictionaries(st.one_of(st.sampled_from(SIMULATION_KEYS + KNOWN_KEYS), st.text(max_size=8)),
                                 json_values, max_size=5)
configs = st.dictionaries(keys, st.one_of(json_values, nested_section), max_size=8)


def loads_or_refuses(action) -> None:
    try:
        result = action()
    except ConfigError as error:
        assert str(error).strip(), "a ConfigError must say something"
        return
    if isinstance(result, Config):
        # What loaded must survive the round trip the run folder's config.json makes.
        dumped = result.model_dump(mode="json")
        json.dumps(dumped, allow_nan=False)
        assert validate_config_dict(dumped) == result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_any_json_object_loads_or_raises_config_error(data):
    loads_or_refuses(lambda: validate_config_dict(data, "random.json"))


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_any_json_value_at_the_top_level_loads_or_raises_config_error(data):
    loads_or_refuses(lambda: validate_config_dict(data, "random.json"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_as_a_config_file_load_or_raise_config_error(tmp_path, content):
    path = tmp_path / "random.json"
    path.write_bytes(content)
    loads_or_refuses(lambda: load_config(path))
    loads_or_refuses(lambda: read_json_object(path) and None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=string.printable + "é\\", max_size=120))
def test_any_text_as_a_config_file_loads_or_raises_config_error(tmp_path, text):
    path = tmp_path / "random.json"
    path.write_text(text, encoding="utf-8")
    loads_or_refuses(lambda: load_config(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs)
def test_any_json_config_through_both_front_doors_loads_or_raises_config_error(tmp_path, data):
    path = tmp_path / "random.json"
    try:
        path.write_text(json.dumps(data), encoding="utf-8")
    except ValueError:
        return
    for door in ("train", "train_j"):
        loads_or_refuses(lambda: config_from_argv([str(path)], door))


flags = st.lists(st.one_of(st.sampled_from([f"--{name}" for name in FIELD_NAMES]), st.text(max_size=8)),
                 max_size=6)


@settings(max_examples=150, deadline=None)
@given(flags)
def test_any_command_line_parses_or_exits_2(argv):
    try:
        loads_or_refuses(lambda: config_from_argv(argv, "train"))
    except SystemExit as stop:  # argparse's usage errors (our parser exits 2), and --help (0)
        assert stop.code in (0, 2)


@settings(max_examples=200, deadline=None)
@given(configs, st.lists(st.tuples(st.booleans(), st.sampled_from(KNOWN_KEYS + ["a.b", "0", "x.0"]),
                                   st.text(max_size=10)), max_size=4))
def test_any_overrides_on_any_config_apply_or_raise_config_error(data, edits):
    overrides = [f"{'+' if plus else ''}{key}:{value}" for plus, key, value in edits]
    try:
        edited, changes = apply_overrides(data, overrides, "random.json")
    except ConfigError:
        return
    assert len(changes) <= len(overrides)
    json.dumps(edited, allow_nan=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=6), json_values, min_size=1, max_size=6), st.data())
def test_a_key_written_twice_is_refused_naming_the_lines_of_both(tmp_path, data, draw):
    # One entry a line (nested values stay on their key's line); the copy goes anywhere after the
    # first, so its line number is known. Keys and strings hold quotes, braces, colons, escapes.
    entries = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()]
    keys = list(data)
    copied = draw.draw(st.sampled_from(keys))
    first = keys.index(copied)
    second = draw.draw(st.integers(min_value=first + 1, max_value=len(entries)))
    entries.insert(second, f"  {json.dumps(copied)}: 0")
    path = tmp_path / "twice.json"
    path.write_text("{\n" + ",\n".join(entries) + "\n}\n", encoding="utf-8")
    try:
        read_json_object(path)
    except ConfigError as error:
        assert f"{copied!r} is written twice" in str(error)
        assert f"(line {first + 2} and line {second + 2})" in str(error)  # line 1 is the '{'
    else:
        raise AssertionError("a duplicated key was accepted")
