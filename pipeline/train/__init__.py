"""Bounded LoRA update: the GRPO recipe, its bounds and stop rules, KL, rewards, the job file."""
