"""``KEY:VALUE`` overrides: parsing, typing and dot-path editing of JSON configs.

Used by the launcher (``train_json_edit.py``); the JSON files it edits are read by
``difftrain.jsonfile``. Standard library only, because the launcher must start in a fraction of a
second.

The rules, in short (docs/launcher.md has the long version with examples):

* ``KEY:VALUE`` splits on the FIRST colon, so values keep theirs (``model:C:/x.safetensors``).
* ``KEY`` is a dot-path into nested objects (``2nd pass.train_learning_rate``); a list element is
  reached by its index (``a.b.0``). ``+KEY:VALUE`` may create a key that does not exist yet.
* ``VALUE`` is typed: int, float, true/false, null/None, ``[lists]`` and ``{dicts}``; a value in
  quotes is a string as written; anything else is a string.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

from difftrain.errors import ConfigError, closest_matches

_INTEGER = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")
_DIGITS_WITH_LEADING_ZERO = re.compile(r"[+-]?0[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_KEYWORDS: dict[str, Any] = {
    "true": True, "True": True, "false": False, "False": False, "null": None, "None": None,
}
_QUOTES = "\"'"
# Deeper nesting than this on a command line is a mistake, and it keeps recursion bounded.
_MAX_NESTING = 64


class _Missing:
    """Marks "no value here" in a Change, distinct from a JSON null."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Override:
    """One ``KEY:VALUE`` edit: ``key`` is the dot-path as written, ``value`` already typed."""

    key: str
    value: Any
    create: bool
    text: str


@dataclass(frozen=True)
class Sweep:
    """One ``KEY:[v1,v2,...]`` sweep axis: the key and the values it takes, in order."""

    key: str
    values: tuple[Any, ...]
    create: bool
    text: str


@dataclass(frozen=True)
class Change:
    """What an override did: ``old`` is MISSING for a created key."""

    key: str
    old: Any
    new: Any

    @property
    def changed(self) -> bool:
        # 1 == 1.0 == True in Python, yet they are different JSON values, so compare the JSON.
        return self.old is MISSING or format_value(self.old) != format_value(self.new)


def format_value(value: Any) -> str:
    """Render a value the way it appears in the JSON file (strings quoted, so types show)."""
    if value is MISSING:
        return "(absent)"
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Values


def parse_value(text: str) -> Any:
    """Type a command-line value: int, float, bool, None, list, dict or string.

    Surrounding whitespace is dropped; quotes (``"..."`` or ``'...'``) around the whole value
    make it a string taken literally, which is how a number-like string (``"0001"``) is kept.
    A value that starts with ``[`` and ends with ``]`` (or ``{``/``}``) must parse as a list
    (dict): JSON, Python literals, or bare words (``[a.png, b.png]``); otherwise ConfigError.
    """
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in _QUOTES:
        return stripped[1:-1]
    if _looks_structured(stripped):
        return _parse_structured(stripped)
    return _parse_scalar(stripped)


def _looks_structured(text: str) -> bool:
    return len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("{", "}"))


def _parse_scalar(text: str) -> Any:
    """Type one unquoted, unstructured token (already stripped)."""
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    if _INTEGER.fullmatch(text):
        return int(text)
    if _DIGITS_WITH_LEADING_ZERO.fullmatch(text):
        # "007" is far more often an ID or a file-name stem than the number 7.
        return text
    if _FLOAT.fullmatch(text):
        number = float(text)
        if not math.isfinite(number):
            raise ConfigError(f"the number {text} is too large to store in JSON")
        return number
    return text


def _parse_structured(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_json_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        pass
    try:
        return _FlowParser(text).parse()
    except ConfigError as error:
        kind = "list" if text[0] == "[" else "dict"
        raise ConfigError(
            f"cannot read {text!r} as a {kind}: {error}. Write it as JSON, e.g. [1, 2] or "
            f'{{"key": "value"}}; to pass it as plain text instead, put it in quotes: \'"{text}"\''
        ) from None


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} does not fit in a float")
    return number


class _FlowParser:
    """Lenient reader for lists/dicts that shells mangled or users typed loosely.

    Accepts ``[a, 'b c', 1e-4, [1, 2]]`` and ``{key: value, 'k 2': [1]}``: elements are typed by
    the scalar rules, quotes protect text verbatim, no escapes are interpreted (so Windows paths
    survive). Needed because cmd.exe and bash strip the inner double quotes of ``["a","b"]``.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def parse(self) -> Any:
        value = self._value(terminators=",]}", depth=0)
        self._skip_spaces()
        if self.position != len(self.text):
            self._fail("unexpected text after the end")
        return value

    def _fail(self, what: str) -> None:
        raise ConfigError(f"{what} at character {self.position + 1}")

    def _skip_spaces(self) -> None:
        while self.position < len(self.text) and self.text[self.position].isspace():
            self.position += 1

    def _peek(self) -> str:
        return self.text[self.position] if self.position < len(self.text) else ""

    def _value(self, terminators: str, depth: int) -> Any:
        if depth > _MAX_NESTING:
            self._fail("nested too deeply")
        self._skip_spaces()
        opening = self._peek()
        if opening == "[":
            return self._list(depth)
        if opening == "{":
            return self._dict(depth)
        if opening and opening in _QUOTES:
            return self._quoted()
        token = self._bare(terminators)
        if not token:
            self._fail("missing value")
        return _parse_scalar(token)

    def _quoted(self) -> str:
        quote = self.text[self.position]
        end = self.text.find(quote, self.position + 1)
        if end < 0:
            self._fail(f"unclosed {quote}")
        value = self.text[self.position + 1:end]
        self.position = end + 1
        return value

    def _bare(self, terminators: str) -> str:
        start = self.position
        while self.position < len(self.text) and self.text[self.position] not in terminators:
            self.position += 1
        return self.text[start:self.position].strip()

    def _list(self, depth: int) -> list[Any]:
        self.position += 1
        items: list[Any] = []
        while True:
            self._skip_spaces()
            if self._peek() == "]":
                self.position += 1
                return items
            items.append(self._value(terminators=",]", depth=depth + 1))
            self._skip_spaces()
            separator = self._peek()
            if separator == ",":
                self.position += 1
            elif separator != "]":
                self._fail("expected ',' or ']'")

    def _dict(self, depth: int) -> dict[str, Any]:
        self.position += 1
        items: dict[str, Any] = {}
        while True:
            self._skip_spaces()
            if self._peek() == "}":
                self.position += 1
                return items
            key = self._quoted() if self._peek() in tuple(_QUOTES) else self._bare(":,}")
            if not key:
                self._fail("missing key")
            self._skip_spaces()
            if self._peek() != ":":
                self._fail(f"expected ':' after the key {key!r}")
            self.position += 1
            items[key] = self._value(terminators=",}", depth=depth + 1)
            self._skip_spaces()
            separator = self._peek()
            if separator == ",":
                self.position += 1
            elif separator != "}":
                self._fail("expected ',' or '}'")


# ---------------------------------------------------------------------------------------------
# KEY:VALUE arguments


def parse_override(text: str) -> Override:
    """Parse one ``KEY:VALUE`` (or ``+KEY:VALUE``) argument; raises ConfigError when malformed."""
    create = text.startswith("+")
    body = text[1:] if create else text
    key, colon, raw_value = body.partition(":")
    key = key.strip()
    if not colon:
        hint = ""
        if "=" in body:
            hint = f" Use a colon instead of '=': {body.replace('=', ':', 1)}"
        raise ConfigError(
            f"override {text!r} is not KEY:VALUE (no ':' found).{hint}".rstrip()
            + ("" if hint else " Example: --override train_learning_rate:0.0001")
        )
    if not key:
        raise ConfigError(f"override {text!r} has no key before the ':'")
    segments = key.split(".")
    if any(not segment.strip() for segment in segments):
        raise ConfigError(
            f"override {text!r}: the key {key!r} has an empty part; dot-paths look like "
            "'2nd pass.train_learning_rate' or 'list_key.0'"
        )
    return Override(key=key, value=parse_value(raw_value), create=create, text=text)


def parse_sweep(text: str) -> Sweep:
    """Parse one ``KEY:[v1,v2,...]`` sweep argument; the value must be a non-empty list."""
    override = parse_override(text)
    if not isinstance(override.value, list) or not override.value:
        raise ConfigError(
            f"sweep {text!r}: the value must be a non-empty list, e.g. "
            f"{'+' if override.create else ''}{override.key}:[0.0001,0.0002]"
        )
    return Sweep(key=override.key, values=tuple(override.value), create=override.create,
                 text=text)


# ---------------------------------------------------------------------------------------------
# Editing


def apply_overrides(
    config: dict[str, Any],
    overrides: Iterable[Union[str, Override]],
    source: str = "the config",
) -> tuple[dict[str, Any], list[Change]]:
    """Return a edited deep copy of ``config`` and one Change per key touched, in first-touch order.

    ``config`` itself is never modified. A later override of the same key wins; its Change then
    shows the original value and the final one. A key that does not exist is a ConfigError naming
    the closest existing keys, unless the override starts with ``+``. ``source`` names the
    config in messages (usually its file path).
    """
    edited = copy.deepcopy(config)
    originals: dict[tuple[Union[str, int], ...], tuple[str, Any]] = {}
    for item in overrides:
        override = parse_override(item) if isinstance(item, str) else item
        path, old = _assign(edited, override, source)
        originals.setdefault(path, (override.key, old))
    changes = [
        Change(key=key, old=old, new=_get(edited, path)) for path, (key, old) in originals.items()
    ]
    return edited, changes


def _get(config: Any, path: Sequence[Union[str, int]]) -> Any:
    # A later override may have replaced a parent object, so the path can be gone.
    for segment in path:
        if not isinstance(config, (dict, list)) or not _contains(config, segment):
            return MISSING
        config = config[segment]
    return config


def _assign(
    config: dict[str, Any], override: Override, source: str
) -> tuple[tuple[Union[str, int], ...], Any]:
    """Set one override in place; return the resolved path and the value it replaced."""
    segments = override.key.split(".")
    container: Any = config
    resolved: list[Union[str, int]] = []
    index = 0
    while True:
        step, consumed = _resolve_step(container, segments[index:], override, resolved, source)
        resolved.append(step)
        index += consumed
        is_last = index == len(segments)
        exists = _contains(container, step)
        if is_last:
            old = container[step] if exists else MISSING
            if isinstance(container, list) and not exists:
                container.append(override.value)
            else:
                container[step] = override.value
            return tuple(resolved), old
        if not exists:
            # Only reachable for +KEY (else _resolve_step raised): build the missing object.
            container[step] = {}
        child = container[step]
        if not isinstance(child, (dict, list)):
            where = ".".join(str(part) for part in resolved)
            raise ConfigError(
                f"override {override.text!r}: {where!r} in {source} is "
                f"{format_value(child)}, not an object or a list, so it has no "
                f"{segments[index]!r} inside"
            )
        container = child


def _contains(container: Any, step: Union[str, int]) -> bool:
    if isinstance(container, dict):
        return step in container
    return isinstance(step, int) and 0 <= step < len(container)


def _resolve_step(
    container: Any,
    remaining: list[str],
    override: Override,
    resolved: list[Union[str, int]],
    source: str,
) -> tuple[Union[str, int], int]:
    """Pick the next key (or index) of the path, and how many dot-separated segments it used."""
    where = ".".join(str(part) for part in resolved) or "the top level"
    if isinstance(container, list):
        segment = remaining[0].strip()
        if not _INTEGER.fullmatch(segment):
            raise ConfigError(
                f"override {override.text!r}: {where!r} in {source} is a list, so the next "
                f"part of the key must be an index (0 to {len(container) - 1}), not {segment!r}"
            )
        position = int(segment)
        if position < 0:
            position += len(container)
        appending = override.create and position == len(container) and len(remaining) == 1
        if not (0 <= position < len(container) or appending):
            raise ConfigError(
                f"override {override.text!r}: index {segment} is outside the list {where!r} "
                f"in {source}, which has {len(container)} element(s)"
                + ("" if override.create else "; to append, write +KEY.<length>:VALUE")
            )
        return position, 1
    # Prefer the plain segment, but let a key that itself contains dots be reached as well.
    for length in range(1, len(remaining) + 1):
        candidate = ".".join(remaining[:length])
        if candidate in container:
            return candidate, length
    if override.create:
        return remaining[0], 1
    raise ConfigError(_unknown_key_message(override, container, resolved, remaining, source))


def _unknown_key_message(
    override: Override,
    container: dict[str, Any],
    resolved: list[Union[str, int]],
    remaining: list[str],
    source: str,
) -> str:
    missing_part = remaining[0]
    parent = ".".join(str(part) for part in resolved)
    location = f"inside {parent!r}" if parent else "at the top level"
    message = f"unknown key {override.key!r} in {source}"
    if len(remaining) > 1 or parent:
        message += f" ({missing_part!r} does not exist {location})"
    message += "."
    suggestions = closest_matches(override.key, all_key_paths(container, parent), limit=5)
    if suggestions:
        message += " Closest existing keys: " + ", ".join(suggestions) + "."
    message += f" To add it as a new key, write '+{override.text}'."
    return message


def all_key_paths(config: Any, prefix: str = "") -> list[str]:
    """Every dot-path to a dict key in ``config`` (nested objects included, lists skipped)."""
    paths: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.append(path)
            paths.extend(all_key_paths(value, path))
    return paths
