"""lmjobs: the jobs (pre-training, fine-tuning, tuning, RLHF, evaluation) and the CLI."""
