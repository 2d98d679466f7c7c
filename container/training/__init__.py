"""The training job: `python -m container.training` (the image's `train`) runs `job.main`.

Importing the package imports nothing, so that `launch` can read its two torch-free modules on a
laptop: `metrics` (the metric lines and the regexes that scrape them) and `hyperparameters` (the
job's schema). The others are the job itself and import torch.
"""
