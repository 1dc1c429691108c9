"""The one reader of JSON files a user wrote: configs, launcher base files, nested settings files.

Every door (train.py, train_j.py, the launcher, and any setting that names another JSON file) reads
through `read_json_object`, so they accept and refuse the same files with the same words. Standard
library only: the launcher reads its base config before it may import anything heavy.

What it guarantees, each as a ConfigError naming the file:
* syntax errors give line and column, show the line, and explain the single-backslash trap of
  Windows paths and the trailing comma;
* a key written twice in one object is refused with both line numbers (Python's json would keep the
  last one without a word);
* a UTF-8 byte-order mark (what Windows Notepad writes) is accepted;
* a Windows path whose single backslash silently became a tab or newline (``"C:\\new"``) is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

from difftrain.errors import ConfigError

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Characters a JSON escape after a single backslash turns into: \t \n \r \f \b.
_ESCAPED_CONTROL = re.compile(r"[\t\n\r\f\b]")
BACKSLASH_HINT = (
    "A single backslash starts an escape in JSON: write Windows paths with double backslashes "
    "('\\\\') or forward slashes ('/'), e.g. \"C:\\\\models\\\\x.safetensors\" or \"C:/models/x.safetensors\"."
)
# What a JSON value is called in a message, by the Python type json.loads gives it.
_JSON_TYPE_NAMES = {list: "list", str: "string", int: "number", float: "number", bool: "true/false",
                    type(None): "null"}


class _DuplicateKey(Exception):
    """Raised by the pairs hook; the reader then finds where the two copies are written."""


def read_json_object(path: Union[str, Path], what: str = "config file") -> dict[str, Any]:
    """Read the JSON object in `path`; every problem is a ConfigError a user can act on.

    `what` names the file in messages about the file itself ("config file", "optimizer settings
    file", ...). A BOM is accepted; NaN and Infinity parse (the schema refuses them by key name).
    """
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(_syntax_error_message(path, text, error)) from None
    except _DuplicateKey:
        raise ConfigError(_duplicate_key_message(path, text)) from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a {what}.") from None
    if not isinstance(data, dict):
        kind = _JSON_TYPE_NAMES.get(type(data), type(data).__name__)
        raise ConfigError(f"{path}: the top level must be a JSON object {{\"key\": value, ...}}, not a {kind}.")
    _refuse_mangled_windows_paths(data, path)
    return data


def _read_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist; check the path.") from None
    except IsADirectoryError:
        raise ConfigError(f"'{path}' is a folder, not a JSON {what}.") from None
    except ValueError:  # a NUL character, which no file system allows in a path
        raise ConfigError(f"{what} path {str(path)!r} contains a NUL character; check the command line.") from None
    except OSError as error:  # permissions, a name too long, a device that fails
        raise ConfigError(f"cannot read {what} '{path}': {error.strerror or error}.") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey()
    return result


def _syntax_error_message(path: Path, text: str, error: json.JSONDecodeError) -> str:
    lines = text.splitlines()
    shown = lines[error.lineno - 1] if 0 < error.lineno <= len(lines) else ""
    message = (f"{path}, line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})\n"
               f"    {shown}\n    {' ' * (error.colno - 1)}^")
    if not text.strip():
        message += "\nThe file is empty; it must hold a JSON object like {\"key\": value}."
    elif "escape" in error.msg:
        message += "\n" + BACKSLASH_HINT
    elif text[:error.pos].rstrip().endswith(",") and text[error.pos:error.pos + 1] in ("}", "]"):
        message += "\nJSON allows no comma after the last item of an object or list."
    return message


# A JSON string (escapes included) or a bracket or colon; numbers, literals and commas are skipped.
_KEY_SCAN_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]')


def _duplicate_key_message(path: Path, text: str) -> str:
    found = _first_duplicate_key(text)
    if found is None:  # cannot happen for text json.loads read; say what we know
        return f"{path}: a key is written twice in the same object; delete one of them."
    key, first_line, second_line = found
    return (f"{path}: the key {key!r} is written twice in the same object (line {first_line} and line "
            f"{second_line}); JSON would silently keep the last one. Delete one of them.")


def _first_duplicate_key(text: str) -> Optional[tuple[str, int, int]]:
    """The first key written twice in one object, with the lines of both copies."""
    tokens = list(_KEY_SCAN_TOKEN.finditer(text))
    # One entry per open bracket: the keys seen so far (key -> line) for an object, None for a list.
    open_containers: list[Optional[dict[str, int]]] = []
    for index, token in enumerate(tokens):
        symbol = token.group()
        if symbol == "{":
            open_containers.append({})
        elif symbol == "[":
            open_containers.append(None)
        elif symbol in "}]":
            if open_containers:
                open_containers.pop()
        elif symbol.startswith('"') and index + 1 < len(tokens) and tokens[index + 1].group() == ":":
            keys = open_containers[-1] if open_containers else None
            if keys is None:
                continue
            key = json.loads(symbol)
            line = text.count("\n", 0, token.start()) + 1
            if key in keys:
                return key, keys[key], line
            keys[key] = line
    return None


def _refuse_mangled_windows_paths(data: Any, path: Path, where: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _refuse_mangled_windows_paths(value, path, f"{where}.{key}" if where else key)
    elif isinstance(data, list):
        for position, value in enumerate(data):
            _refuse_mangled_windows_paths(value, path, f"{where}.{position}")
    elif isinstance(data, str) and _WINDOWS_DRIVE.match(data) and _ESCAPED_CONTROL.search(data):
        raise ConfigError(f"{path}: {where!r} is {data!r}: a Windows path with a tab or newline inside, which "
                          f"is what a single backslash before t, n, r, f or b turns into. {BACKSLASH_HINT}")
