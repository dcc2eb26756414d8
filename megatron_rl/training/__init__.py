"""Pieces of the RL loop in megatron_rl/trainer.py: experience building, timing, metric logging, checkpoints."""
