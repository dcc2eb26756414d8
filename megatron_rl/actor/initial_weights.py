"""Where the actor's starting weights come from: the HF folder `model_path`, or the megatron_rl checkpoint
`megatron_checkpoint` when one is set (a `convert-from-hf` output or a training checkpoint's step directory).

    weights = InitialWeights(config, arch)   # checks the source: before any process group, no tensor read
    weights.load(policy_chunks)              # collective; the same source for the KL reference
    weights.load(reference_chunks)
    weights.close()

The policy and the KL reference start from the same weights, so both go through `load`: the choice between the
two sources is made here, once. A checkpoint loads into any layout (Megatron's distributed checkpoints reshard:
`megatron_rl.checkpoint.model_ckpt.load_model_checkpoint`); an HF folder is read tensor by tensor, each rank
keeping its own slices (`megatron_rl.models.weight_transfer.load_hf_weights`).
"""
from __future__ import annotations

from megatron_rl.actor.config import ActorConfig
from megatron_rl.models.qwen_arch import QwenArch


class InitialWeights:
    def __init__(self, config: ActorConfig, arch: QwenArch):
        self.arch = arch
        self.checkpoint = config.megatron_checkpoint or None
        self._reader = None
        if self.checkpoint:
            from megatron_rl.checkpoint.model_ckpt import check_model_checkpoint

            check_model_checkpoint(self.checkpoint, arch, what=f"the config.json of actor.model_path ({config.model_path})")
        else:
            from megatron_rl.models.hf_io import HFCheckpointReader

            self._reader = HFCheckpointReader(config.model_path)
            self._reader.validate(arch)

    def describe(self) -> str:
        return f"megatron_rl checkpoint {self.checkpoint}" if self.checkpoint else f"HF folder {self._reader.dir}"

    def load(self, chunks: list) -> None:
        """Collective: fill this rank's model chunks (built, not yet wrapped in Float16Module / DDP)."""
        if self.checkpoint:
            from megatron_rl.checkpoint.model_ckpt import load_model_checkpoint

            load_model_checkpoint(chunks, self.checkpoint)
        else:
            from megatron_rl.models.weight_transfer import load_hf_weights

            load_hf_weights(chunks, self.arch, self._reader)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
