"""Preference training: objectives (losses), conditioning, data and cache (data/), the run machinery (run,
unet, steps), the recipes (recipes/: Diffusion-DPO and its variants, D3PO), export and curves.

It uses prefpipe.core and prefpipe.models only: the trainer never runs a stage (the D3PO online rounds that
generate, label and train in turn are the stage `prefpipe/stages/rounds.py`). The entry point is
`trainer.recipes.train(TrainConfig(...))`, which `prefpipe train` calls.
"""
