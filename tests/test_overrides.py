"""KEY:VALUE parsing, value typing, dot-path editing (difftrain.overrides) and the one JSON reader
(difftrain.jsonfile) the launcher reads its base config with."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.errors import ConfigError, closest_matches
from difftrain.jsonfile import read_json_object
from difftrain.overrides import (
    MISSING,
    all_key_paths,
    apply_overrides,
    parse_override,
    parse_sweep,
    parse_value,
)

# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("4", 4),
    ("-3", -3),
    ("+7", 7),
    ("0", 0),
    ("1e-4", 1e-4),
    ("0.0001", 0.0001),
    ("5.", 5.0),
    (".5", 0.5),
    ("2E3", 2000.0),
    ("True", True), ("true", True), ("False", False), ("false", False),
    ("None", None), ("null", None),
    ("[1, 2, 3]", [1, 2, 3]),
    ('{"a": 1, "b": [true, null]}', {"a": 1, "b": [True, None]}),
    ('"0001"', "0001"),
    ("'42'", "42"),
    ('"true"', "true"),
    ("MyCustomModel.safetensors", "MyCustomModel.safetensors"),
    ("C:/models/x.safetensors", "C:/models/x.safetensors"),
    ("C:\\models\\x.safetensors", "C:\\models\\x.safetensors"),
    ("https://example.com:8080/a", "https://example.com:8080/a"),
    ("a photo of a cat", "a photo of a cat"),
    ("  padded  ", "padded"),
    ("", ""),
    ("007", "007"),
    ("inf", "inf"),
    ("TRUE", "TRUE"),
    ("1_000", "1_000"),
])
def test_values_are_typed_by_the_documented_rules(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text, expected", [
    # What a shell leaves of ["a","b"] once it has eaten the inner quotes.
    ("[a.png, b.png]", ["a.png", "b.png"]),
    ("[1e-4, 2e-4]", [1e-4, 2e-4]),
    ("['x y', 3, True, None]", ["x y", 3, True, None]),
    ("[C:\\m\\a.safetensors, D:/b]", ["C:\\m\\a.safetensors", "D:/b"]),
    ("{model: C:/x, sizes: [1, 2]}", {"model": "C:/x", "sizes": [1, 2]}),
    ("{'k 2': '007'}", {"k 2": "007"}),
    ("[]", []),
    ("[1, 2,]", [1, 2]),
    ("[[1, 2], [a]]", [[1, 2], ["a"]]),
])
def test_loose_lists_and_dicts_are_read_with_the_same_typing(text, expected):
    assert parse_value(text) == expected


@pytest.mark.parametrize("text", ["[1, 2", "[1,,2]", "{a 1}", "[1] [2]", "{'a': 1", "[1e999]"])
def test_malformed_structures_are_config_errors_that_suggest_quotes(text):
    if not (text.startswith("[") and text.endswith("]")) and not (
            text.startswith("{") and text.endswith("}")):
        # Not shaped like a list/dict at all: it is simply a string.
        assert parse_value(text) == text
        return
    with pytest.raises(ConfigError, match="quotes"):
        parse_value(text)


def test_huge_numbers_are_refused_rather_than_written_as_infinity():
    with pytest.raises(ConfigError, match="too large"):
        parse_value("1e999")


# --- KEY:VALUE ----------------------------------------------------------------------------------


def test_override_splits_on_the_first_colon_only():
    override = parse_override("model:C:/models/x.safetensors")
    assert (override.key, override.value, override.create) == (
        "model", "C:/models/x.safetensors", False)
    assert parse_override("url:http://host:80/p").value == "http://host:80/p"


def test_key_with_spaces_and_plus_prefix():
    override = parse_override("+2nd pass.train_learning_rate:1e-4")
    assert override.key == "2nd pass.train_learning_rate"
    assert override.value == 1e-4
    assert override.create


@pytest.mark.parametrize("text, fragment", [
    ("train_learning_rate=0.0001", "train_learning_rate:0.0001"),
    ("justakey", "no ':'"),
    (":5", "no key"),
    ("a..b:1", "empty part"),
    (".a:1", "empty part"),
])
def test_malformed_overrides_say_how_to_fix_them(text, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_override(text)
    assert fragment in str(caught.value)


def test_sweep_needs_a_non_empty_list():
    assert parse_sweep("lr:[1e-4, 2e-4]").values == (1e-4, 2e-4)
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_sweep("lr:1e-4")
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_sweep("lr:[]")


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_string_parses_or_raises_config_error(text):
    try:
        override = parse_override(text)
    except ConfigError:
        return
    # Whatever parsed must be storable in a JSON config.
    json.dumps(override.value, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="[]{},:'\" ab1.-e", max_size=40))
def test_bracket_soup_parses_or_raises_config_error(text):
    try:
        value = parse_value(text)
    except ConfigError:
        return
    json.dumps(value, allow_nan=False)


# --- editing ------------------------------------------------------------------------------------


BASE = {
    "train_learning_rate": "0.0002",
    "train_batch_size": 1,
    "2nd pass": {"train_learning_rate": "0.0001"},
    "buckets": [256, 512, {"weight": 1}],
    "lora_unet.up": 3,
}


def test_apply_edits_a_copy_and_reports_old_and_new():
    edited, changes = apply_overrides(BASE, ["2nd pass.train_learning_rate:5e-5",
                                             "train_batch_size:4"])
    assert edited["2nd pass"]["train_learning_rate"] == 5e-5
    assert edited["train_batch_size"] == 4
    assert BASE["2nd pass"]["train_learning_rate"] == "0.0001"
    assert BASE["train_batch_size"] == 1
    assert [(c.key, c.old, c.new) for c in changes] == [
        ("2nd pass.train_learning_rate", "0.0001", 5e-5), ("train_batch_size", 1, 4)]


def test_later_value_for_the_same_key_wins_and_keeps_the_original_old():
    edited, changes = apply_overrides(BASE, ["train_batch_size:4", "train_batch_size:8"])
    assert edited["train_batch_size"] == 8
    assert [(c.old, c.new) for c in changes] == [(1, 8)]


def test_list_elements_by_index_including_negative():
    edited, changes = apply_overrides(BASE, ["buckets.0:128", "buckets.-1.weight:2"])
    assert edited["buckets"] == [128, 512, {"weight": 2}]
    assert [c.key for c in changes] == ["buckets.0", "buckets.-1.weight"]


def test_plus_appends_to_a_list_at_its_length_only():
    edited, _ = apply_overrides(BASE, ["+buckets.3:1024"])
    assert edited["buckets"][-1] == 1024
    with pytest.raises(ConfigError, match="outside the list"):
        apply_overrides(BASE, ["+buckets.9:1"])
    with pytest.raises(ConfigError, match="to append"):
        apply_overrides(BASE, ["buckets.3:1"])


def test_key_that_itself_contains_a_dot_is_reachable():
    edited, _ = apply_overrides(BASE, ["lora_unet.up:4"])
    assert edited["lora_unet.up"] == 4


def test_unknown_key_names_it_and_the_closest_keys():
    with pytest.raises(ConfigError) as caught:
        apply_overrides(BASE, ["train_learing_rate:1"], source="base.json")
    message = str(caught.value)
    assert "'train_learing_rate'" in message and "base.json" in message
    assert "train_learning_rate" in message.split("Closest existing keys:")[1]
    assert "+train_learing_rate:1" in message


def test_missing_intermediate_object_is_named():
    config = {"train_learning_rate": "0.0002"}
    with pytest.raises(ConfigError) as caught:
        apply_overrides(config, ["2nd pass.train_learning_rate:1e-4"], source="addift.json")
    message = str(caught.value)
    assert "'2nd pass' does not exist at the top level" in message
    assert "train_learning_rate" in message.split("Closest existing keys:")[1]


def test_plus_creates_missing_intermediate_objects():
    edited, changes = apply_overrides({"a": 1}, ["+2nd pass.train_learning_rate:1e-4"])
    assert edited == {"a": 1, "2nd pass": {"train_learning_rate": 1e-4}}
    assert changes[0].old is MISSING and changes[0].changed


def test_cannot_descend_into_a_number_or_name_a_list_element_by_word():
    with pytest.raises(ConfigError, match="not an object or a list"):
        apply_overrides(BASE, ["+train_batch_size.x:1"])
    with pytest.raises(ConfigError, match="must be an index"):
        apply_overrides(BASE, ["buckets.first:1"])


def test_same_value_is_reported_unchanged_but_int_to_float_is_a_change():
    _, changes = apply_overrides(BASE, ["train_batch_size:1"])
    assert not changes[0].changed
    _, changes = apply_overrides(BASE, ["train_batch_size:1.0"])
    assert changes[0].changed


def test_closest_keys_reaches_nested_keys_by_their_last_part():
    assert "2nd pass.train_learning_rate" in closest_matches("2nd pass.train_learning_rte", all_key_paths(BASE))
    # The whole path is far from every key; its last part still finds the key it meant.
    word = "section_that_does_not_exist.train_learning_rte"
    assert closest_matches(word, ["train_learning_rate", "buckets"]) == ["train_learning_rate"]


# --- reading JSON -------------------------------------------------------------------------------


def test_read_json_object_accepts_a_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "preset.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"prompt": "猫"}, ensure_ascii=False).encode())
    assert read_json_object(path) == {"prompt": "猫"}


def test_single_backslash_error_names_file_line_column_and_the_fix(tmp_path):
    path = tmp_path / "windows.json"
    path.write_text('{\n  "train_batch_size": 1,\n  "model": "C:\\models\\sd.safetensors"\n}\n')
    with pytest.raises(ConfigError) as caught:
        read_json_object(path)
    message = str(caught.value)
    assert str(path) in message
    assert "line 3, column" in message
    assert "\\\\" in message and "'/'" in message


def test_backslash_that_became_a_newline_is_caught(tmp_path):
    path = tmp_path / "windows.json"
    path.write_text('{"model": "C:\\new\\x.safetensors"}'.replace("\\x", "/x"))
    with pytest.raises(ConfigError, match="single backslash"):
        read_json_object(path)


@pytest.mark.parametrize("content, fragment", [
    ('{"a": 1,}', "no comma after the last item"),
    ('{"a": [1,\n 2,\n ]}', "no comma after the last item"),
    ('[1, 2]', "must be a JSON object .*not a list"),
    ('', "is empty"),
    ('{"a": 1, "a": 2}', "written twice"),
])
def test_other_json_mistakes(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=fragment):
        read_json_object(path)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_json_object(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('{"a": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_json_object(path)
