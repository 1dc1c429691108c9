"""Command lines of the two front doors, generated from the one schema in `difftrain.config`.

`train.py` (EveryDream2 style): `[CONFIG.json | --config CONFIG.json] [--key value ...]`, the JSON is
read first and flags win. `train_j.py` (TrainTrain style): `CONFIG.json [--models-dir R] ...` with
TrainTrain's defaults for keys the JSON leaves out. Both end in `difftrain.engine.run`.

Nothing here imports torch, so `--help` and config mistakes answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from typing import Any, Optional, Sequence

from difftrain import log
from difftrain.config import ALIASES, FIELD_NAMES, Config
from difftrain.errors import ConfigError, exit_on_user_error
from difftrain.vocab.table import FALSE_WORDS, TRUE_WORDS


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _flag_kind(annotation: Any) -> str:
    """'bool', 'list', 'object' or 'scalar', looking through Optional[...]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return "bool"
    if typing.get_origin(annotation) is list:
        return "list"
    if isinstance(annotation, type) and issubclass(annotation, (dict,)) or \
            typing.get_origin(annotation) is dict or hasattr(annotation, "model_fields"):
        return "object"
    return "scalar"


def add_schema_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (`--key` and `--key-with-dashes`), plus its identifier-like aliases."""
    aliases_of: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        if alias.isidentifier():
            aliases_of.setdefault(name, []).append(alias)
    group = parser.add_argument_group("settings (every key of the config schema; flags win over the JSON)")
    for name in FIELD_NAMES:
        field = Config.model_fields[name]
        spellings = [name, *aliases_of.get(name, [])]
        options = []
        for spelling in spellings:
            options.append(f"--{spelling}")
            if "_" in spelling:
                options.append(f"--{spelling.replace('_', '-')}")
        kind = _flag_kind(field.annotation)
        default_text = json.dumps(field.default.model_dump() if hasattr(field.default, "model_dump")
                                  else field.default)
        help_text = f"{field.description} (default: {default_text})".replace("%", "%%")
        if kind == "bool":
            group.add_argument(*options, dest=name, nargs="?", const=True, type=parse_bool,
                               default=argparse.SUPPRESS, metavar="BOOL", help=help_text)
        elif kind == "list":
            group.add_argument(*options, dest=name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif kind == "object":
            group.add_argument(*options, dest=name, type=_json_object(name), default=argparse.SUPPRESS,
                               metavar="JSON", help=help_text)
        else:
            group.add_argument(*options, dest=name, default=argparse.SUPPRESS, help=help_text)


def add_everydream2_flags(parser: argparse.ArgumentParser) -> None:
    """EveryDream2's flags that are not also our keys, translated by difftrain.vocab.everydream2."""
    from difftrain.vocab.everydream2 import TERMS

    group = parser.add_argument_group("EveryDream2 flags (translated; see docs/everydream2.md)")
    for term in TERMS:
        if term.status in ("legacy", "front door") or term.key in FIELD_NAMES or term.key in ALIASES:
            continue
        help_text = f"EveryDream2's --{term.key}: {term.meaning}".replace("%", "%%")
        options = [f"--{term.key}"] + ([f"--{term.key.replace('_', '-')}"] if "_" in term.key else [])
        if term.kind == "bool":
            group.add_argument(*options, dest=term.key, nargs="?", const=True, type=parse_bool,
                               default=argparse.SUPPRESS, metavar="BOOL", help=help_text)
        elif term.kind == "list":
            group.add_argument(*options, dest=term.key, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(*options, dest=term.key, type=_scalar(term.kind), default=argparse.SUPPRESS,
                               help=help_text)


def _scalar(kind: str):
    return {"int": int, "float": float}.get(kind, str)


def _json_object(name: str):
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"--{name} expects a JSON object: {error.msg}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"--{name} expects a JSON object like '{{\"size\": 64}}'")
        return value
    return parse


class UserErrorParser(argparse.ArgumentParser):
    """argparse, but its usage errors use our exit code and house style."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        log.say(f"{self.prog}: error: {message}. Run with --help for every option.", level=logging.ERROR)
        raise SystemExit(2)


def build_parser(door: str) -> argparse.ArgumentParser:
    if door == "train_j":
        parser = UserErrorParser(
            prog="train_j.py",
            description="Train from a TrainTrain-style JSON config (LoRA, ADDifT, Multi-ADDifT, "
                        "Difference, iLECO, or any difftrain config). Keys the JSON leaves out take "
                        "TrainTrain's defaults.")
        parser.add_argument("config_path", metavar="CONFIG.json", help="the JSON config")
    else:
        parser = UserErrorParser(
            prog="train.py",
            description="Train from EveryDream2-style flags and/or a JSON config (--config is read "
                        "first, then flags win).")
        parser.add_argument("config_path", nargs="?", metavar="CONFIG.json",
                            help="a JSON config (same as --config)")
        parser.add_argument("--config", dest="config_flag", metavar="CONFIG.json",
                            help="a JSON config read before the flags")
    add_schema_flags(parser)
    if door != "train_j":
        add_everydream2_flags(parser)
    return parser


def config_from_argv(argv: Sequence[str], door: str) -> Config:
    """Parse a command line of `door` ('train' or 'train_j') into a validated Config."""
    parser = build_parser(door)
    namespace = vars(parser.parse_args(list(argv)))
    path = namespace.pop("config_path", None)
    flag_path = namespace.pop("config_flag", None)
    if path and flag_path:
        raise ConfigError(f"two configs given ('{path}' and --config '{flag_path}'); pass one.")
    if door == "train_j":  # TrainTrain's vocabulary, translated at this door (difftrain/vocab/traintrain.py)
        from difftrain.vocab import traintrain

        return traintrain.load(path or flag_path, flags=namespace)
    from difftrain.vocab import everydream2  # EveryDream2's vocabulary, translated at this door

    return everydream2.load(path or flag_path, flags=namespace)


def main(argv: Optional[Sequence[str]] = None, door: str = "train") -> int:
    program = "train_j.py" if door == "train_j" else "train.py"
    log.setup()
    with exit_on_user_error(program):
        config = config_from_argv(sys.argv[1:] if argv is None else argv, door)
        from difftrain.tracking import check_output_folders

        check_output_folders(config)  # before minutes of model loading, and before writing anything
        if config.gpu_id:
            from difftrain.gpu_choice import choose_gpu

            note = choose_gpu(config.gpu_id)  # before anything starts CUDA
            if note:
                log.say(note)
        from difftrain.engine import run  # torch is imported only once the config is known good

        return run(config, program=program)
