"""TrainTrain's modes beyond plain LoRA: each owns its data and its loss (see each module).

| mode         | module                         | trains on                                   |
|--------------|--------------------------------|---------------------------------------------|
| ADDifT       | difftrain.modes.addift         | "original image" / "target image" pair      |
| Multi-ADDifT | difftrain.modes.addift         | a folder of pairs a.png / a<diff_target_name>.png |
| Difference   | difftrain.modes.difference     | copier LoRA (pass 1), then difference (pass 2) |
| iLECO        | difftrain.modes.ileco          | prompts only (random latents)               |

'LoRA' and 'Full' are difftrain.tasks.sd.SDTask.
"""


def mode_factory(mode: str):
    """The task class (or, for Difference, the two-run mode) that trains `mode`; None if not a mode here."""
    if mode in ("ADDifT", "Multi-ADDifT"):
        from difftrain.modes.addift import ADDifTTask

        return ADDifTTask
    if mode == "iLECO":
        from difftrain.modes.ileco import ILECOTask

        return ILECOTask
    if mode == "Difference":
        from difftrain.modes.difference import DifferenceMode

        return DifferenceMode
    return None
