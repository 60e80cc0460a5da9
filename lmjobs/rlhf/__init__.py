"""`lmjobs rlhf`: reward models, PPO / GRPO / RLOO / DPO on Ray actors (in progress: the numerics)."""
