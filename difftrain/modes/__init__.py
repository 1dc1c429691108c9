"""TrainTrain's modes beyond plain LoRA: each is a small task that picks Stable Diffusion parts
(difftrain.tasks.sd_parts) and owns its data and its loss (see each module).

| mode         | module                         | trains on                                   |
|--------------|--------------------------------|---------------------------------------------|
| ADDifT       | difftrain.modes.addift         | "original image" / "target image" pair      |
| Multi-ADDifT | difftrain.modes.addift         | a folder of pairs a.png / a<diff_target_name>.png |
| Difference   | difftrain.modes.difference     | copier LoRA (pass 1), then difference (pass 2) |
| iLECO        | difftrain.modes.ileco          | prompts only (random latents)               |

'LoRA' and 'Full' are difftrain.tasks.sd.SDTask. Which class trains which mode is written once, in
difftrain.registry.
"""
