"""The RL loop and its helpers: `trainer.py` (the loop, read it first), `experience.py` (scored groups -> the actor
batch), `evaluation.py` (avg@n / pass@k on held-out prompts), `metrics_logger.py` (JSONL, TensorBoard, wandb, the
one-line summary) and `timing.py` (the per-step wall-clock breakdown). Checkpoint files are `megatron_rl.checkpoint`'s."""
