"""Hyperparameter campaigns: Ray Tune over fine-tuning jobs (`lmjobs tune`)."""
