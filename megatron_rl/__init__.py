"""megatron_rl: a Megatron-Core RLVR trainer (LUSPO / LSPO / GSPO / DAPO / GRPO) for Qwen models."""
from megatron_rl._warnings import silence_known_warnings

__version__ = "0.1.0"

silence_known_warnings()
