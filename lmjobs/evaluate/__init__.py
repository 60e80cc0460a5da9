"""`lmjobs eval`: perplexity, in-context (zero/few-shot) tasks, task metrics of fine-tuned heads and
generation samples, scored by a Ray Data actor pool, with reports across models and checkpoints."""
