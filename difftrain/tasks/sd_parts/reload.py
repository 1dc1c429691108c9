"""EveryDream2's load_settings_every_epoch: the run's train.json read again as each epoch starts.

EveryDream2 updates its settings with the file's keys at every epoch's start, but only what its
loop reads afresh then changes anything: the loss settings. Those apply here too, from the epoch
that reads them on, in training, validation and samples alike (they share one objective). A
changed key of any other kind gets one note: it waits for the next start. A resumed run reads
the file again at its first epoch, so it continues with what the file says then.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from difftrain.config import Config, validate_config_dict
from difftrain.errors import ConfigError
from difftrain.log import say

RELOADED = ("loss_function", "min_snr_gamma", "pyramid_noise_discount", "min_timestep", "max_timestep",
            "noise_offset", "embedding_perturbation")


class EpochSettingsReload:
    """A before_batch part: on the first micro-batch of each epoch, re-read config.reload_settings_from
    and rebuild the objective in place (`objective`'s holders keep the same object)."""

    def __init__(self, config: Config, objective: Any, make_objective: Callable[[Config], Any],
                 read_settings: Callable[[str], dict[str, Any]]):
        self.config, self.objective = config, objective
        self.make_objective, self.read_settings = make_objective, read_settings
        self.epoch: Optional[int] = None
        self.last_read: Optional[dict[str, Any]] = None  # what the file said at the previous epoch

    def __call__(self, global_step: int, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        path = self.config.reload_settings_from
        try:
            settings = self.read_settings(path)
        except ConfigError as error:
            # A half-saved edit must not end a long run: EveryDream2 also carries on with what it had.
            say(f"warning: load_settings_every_epoch: {error} Epoch {epoch} keeps the settings it had.")
            return
        self._note_waiting_keys(settings, path)
        self.last_read = settings
        changed = {key: settings[key] for key in RELOADED if key in settings
                   and settings[key] != getattr(self.config, key)}
        if not changed:
            return
        try:
            updated = validate_config_dict({**self.config.model_dump(), **changed}, path)
            fresh = self.make_objective(updated)
        except ConfigError as error:
            say(f"warning: load_settings_every_epoch: {error} Epoch {epoch} keeps the settings it had.")
            return
        vars(self.objective).update(vars(fresh))
        self.config = updated
        say(f"load_settings_every_epoch: from epoch {epoch} on, "
            + ", ".join(f"{key} {value!r}" for key, value in changed.items()) + f" ({path}).")

    def _note_waiting_keys(self, settings: dict[str, Any], path: str) -> None:
        """One note per other key the file changed since the previous epoch read it."""
        if self.last_read is None:
            return
        for key, value in settings.items():
            if key not in RELOADED and value != self.last_read.get(key):
                say(f"note: load_settings_every_epoch: {key} changed in {path}; only the loss settings "
                    f"({', '.join(RELOADED)}) change during a run, {key} applies at the next start.")


__all__ = ["EpochSettingsReload", "RELOADED"]
