"""The shape of another program's vocabulary: one row per key it writes or reads.

Each row says what the key becomes in our schema (`difftrain.config`), or why it has no effect
here, or why it is refused. A front door translates a file through its program's table once; the
engine only ever sees our schema. The docs table is generated from the same rows, so the docs and
the behaviour cannot drift apart.

Imports only the standard library and `difftrain.errors`: the launcher translates without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional

from difftrain.errors import ConfigError, did_you_mean

Status = Literal["implemented", "no effect", "refused"]
STATUSES: tuple[Status, ...] = ("implemented", "no effect", "refused")

# A conversion gets the value and where it came from (for messages) and returns our settings.
Convert = Callable[[Any, str], dict[str, Any]]


@dataclass(frozen=True)
class Row:
    """One key of the other program.

    name: its spelling there, exactly.
    status: 'implemented' (`convert` gives our settings), 'no effect' (accepted; `meaning` is the
        line printed when the key is given), 'refused' (`meaning` is the reason in the error).
    meaning: what it does here, or why it does nothing, or why it is refused (docs and messages).
    targets: our schema keys it sets (docs; `convert` sets them).
    """

    name: str
    status: Status
    meaning: str
    targets: tuple[str, ...] = ()
    convert: Optional[Convert] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.name}: status {self.status!r} is not one of {STATUSES}")
        if (self.status == "implemented") != (self.convert is not None):
            raise ValueError(f"{self.name}: an implemented key needs a conversion, and only it")


@dataclass
class Translation:
    """Our settings from one file, and the lines the user should read about it."""

    settings: dict[str, Any]
    notes: list[str]
    written_as: dict[str, str] = field(default_factory=dict)  # our key -> the key the file used


class Vocabulary:
    """The rows of one program, looked up by their exact spelling."""

    def __init__(self, program: str, rows: Iterable[Row]):
        self.program = program
        self.rows: dict[str, Row] = {}
        for row in rows:
            if row.name in self.rows:
                raise ValueError(f"{program}: key {row.name!r} is in the table twice")
            self.rows[row.name] = row

    def __contains__(self, name: object) -> bool:
        return name in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, name: str) -> Row:
        return self.rows[name]

    def unknown_key(self, key: str, where: str, also_known: Iterable[str] = ()) -> ConfigError:
        """The error for a key neither this table nor `also_known` has, with close spellings."""
        hint = did_you_mean(key, [*self.rows, *sorted(also_known)])
        return ConfigError(f"{where}: unknown key '{key}'.{hint} The README's {self.program} table lists "
                           "every key of this vocabulary.")

    def apply(self, key: str, value: Any, where: str, notes: list[str]) -> dict[str, Any]:
        """Our settings for one key (a no-effect key adds its note; a refused key raises)."""
        row = self.rows[key]
        if row.status == "refused":
            raise ConfigError(f"{where}: '{key}' is not supported: {row.meaning}")
        if row.status == "no effect":
            if value is False:
                return {}  # a switch left off asks for nothing, so there is nothing to report
            notes.append(f"note: {where}: '{key}' has no effect here: {row.meaning}")
            return {}
        assert row.convert is not None
        return row.convert(value, f"{where}: '{key}'")

    def markdown(self) -> str:
        """The docs table: one line per key, in table order."""
        lines = [f"| {self.program} key | Status | In difftrain |", "|---|---|---|"]
        for row in self.rows.values():
            targets = ", ".join(f"`{target}`" for target in row.targets)
            text = f"{targets}: {row.meaning}" if targets else row.meaning
            lines.append(f"| `{row.name}` | {row.status} | {_cell(text)} |")
        return "\n".join(lines) + "\n"


# ---- values as other programs store them (numbers often as strings) --------------------------------

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def merge_settings(settings: dict[str, Any], given_by: dict[str, str], new: dict[str, Any], key: str,
                   where: str) -> None:
    """Add what the user's `key` translates to (`new`) to `settings`, refusing a setting that another of
    their keys already gave: two spellings of one setting in one file is a mistake to point at, not a
    silent last-one-wins. `given_by` remembers which key gave each setting."""
    for name, value in new.items():
        if name in settings and given_by[name] != key:
            raise ConfigError(f"{where}: '{key}' and '{given_by[name]}' set the same setting '{name}'; keep one "
                              "of them.")
        settings[name] = value
        given_by[name] = key


def as_int(value: Any, where: str) -> int:
    """A whole number from an int, an integral float, or a string of either ("16", "16.0")."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}; write e.g. 16.")
    if isinstance(value, int):
        return value
    number = as_float(value, where)
    if not number.is_integer():
        raise ConfigError(f"{where}: expected a whole number, got {value!r}; write e.g. {int(number)}.")
    return int(number)


def as_float(value: Any, where: str) -> float:
    """A finite number from an int, a float or a string ("1e-4", " 0.5 ")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}; write e.g. 0.0001.")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}; write e.g. 0.0001.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: {value!r} is not a finite number.")
    return number


def as_bool(value: Any, where: str) -> bool:
    """true/false from a JSON boolean, 0/1, or the words true/false/yes/no/on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}.")


def as_text(value: Any, where: str) -> str:
    """A string; a number is taken as its JSON spelling (a name like 42 stays '42')."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected text, got {value!r}.")


def _cell(text: str) -> str:
    # A '|' would end the Markdown cell early.
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["Row", "STATUSES", "Status", "Translation", "Vocabulary", "as_bool", "as_float", "as_int", "as_text"]
