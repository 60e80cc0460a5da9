"""`lmjobs pretrain`: causal-LM pre-training on Ray Train with DeepSpeed ZeRO."""
