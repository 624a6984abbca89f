"""Tiny offline models of the real architectures, in the real on-disk formats (diffusers' testing_utils role).

tiny (SD 1.5 / SDXL pipelines and their building blocks), scorers (PickScore, HPSv2, CLIP and aesthetic
checkpoints). Tests, the demo and `prefpipe tiny` load them through the same code path as the real weights.
"""
