"""The parts a Stable Diffusion training run is assembled from. Each task or mode (difftrain.tasks.sd
for Full / LoRA, difftrain.modes for TrainTrain's other modes) picks parts and combines them through
their public methods; none reaches into another's insides.

| part         | module         | what it is                                                             |
|--------------|----------------|------------------------------------------------------------------------|
| data source  | data           | scan images and captions, hold some out, buckets, batches of an epoch  |
| base         | base_model     | where the frozen base comes from (model or checkpoint pointer), loaded |
| conditioning | conditioning   | VAE latents and text conditioning, cached; SDXL's size ids             |
| trainable    | trainable      | Full (the UNet) or LoRA adapters; their checkpoint files               |
| objective    | objective      | epsilon / v / rectified flow; TrainTrain's prediction-vs-prediction loss |
| outputs      | outputs        | the user's LoRA files, settings JSON, CSV log                          |
|              | samples        | sample images and the held-out loss                                   |
|              | reflow         | rectified-flow velocity, reflow inputs and pair training               |
| stack        | stack          | builds base + trainable + objective + conditioning in one order        |
"""
