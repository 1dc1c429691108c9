"""A run's settings as a TrainTrain JSON (TrainTrain's save_as_json): its key names and spellings,
so TrainTrain (and train_j.py) load the file back as a preset.

Built from the vocabulary table in ``difftrain.vocab.traintrain``: each implemented key that sets
one of our settings is written with that setting's value; the keys whose values TrainTrain
spells differently (the image size, the block list, VAE and text encoder "None", the "2nd pass"
section) are spelled back here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difftrain.vocab.traintrain import BLOCKS, IMAGE_SIZE, PER_PASS, ROWS, SECOND_PASS

if TYPE_CHECKING:
    from difftrain.config import Config

# TrainTrain's drop-downs write "None" for "the model's own VAE / text encoder".
_NONE_WHEN_EMPTY = frozenset({"vae", "te"})
_SPELLED_HERE = frozenset({IMAGE_SIZE, BLOCKS, SECOND_PASS, "use_2nd_pass_settings"})


def _their_value(key: str, value: Any) -> Any:
    if key in _NONE_WHEN_EMPTY and not value:
        return "None"
    return list(value) if isinstance(value, tuple) else value


def _image_size(config: "Config") -> str:
    if config.image_height_width:
        height, width = config.image_height_width
        return f"{height},{width}"
    return str(config.resolution)


def _blocks(config: "Config") -> list[str]:
    """TrainTrain lists the blocks it trains, BASE for the text encoder; our empty list is all."""
    from difftrain.models.lora import BLOCK_NAMES

    if config.network_blocks:
        return list(config.network_blocks)
    return [block for block in BLOCK_NAMES if block != "BASE" or config.network_train_text_encoder]


def traintrain_settings(config: "Config") -> dict[str, Any]:
    """The TrainTrain JSON object of ``config`` (keys in TrainTrain's order)."""
    settings: dict[str, Any] = {}
    for row in ROWS:
        if row.name == IMAGE_SIZE:
            settings[row.name] = _image_size(config)
        elif row.name == BLOCKS:
            settings[row.name] = _blocks(config)
        elif row.status == "implemented" and len(row.targets) == 1 and row.name not in _SPELLED_HERE:
            settings[row.name] = _their_value(row.name, getattr(config, row.targets[0]))
    if config.second_pass:
        theirs = {row.name: row.targets[0] for row in ROWS
                  if row.name in PER_PASS and row.status == "implemented" and len(row.targets) == 1}
        section = {key: _their_value(key, config.second_pass[ours]) for key, ours in theirs.items()
                   if ours in config.second_pass}
        if "network_blocks" in config.second_pass:
            section[BLOCKS] = _blocks(config.model_copy(update=config.second_pass))
        section["use_2nd_pass_settings"] = bool(config.use_2nd_pass_settings)
        settings[SECOND_PASS] = section
    return settings
