"""The parallel layout of a Megatron world (TP x PP x CP x DP for dense parts, ETP x EP x EDP for experts) and
its validation against a world size and a model architecture.

Everything here is arithmetic: it runs before any process group or model exists, so a layout that cannot work
fails in milliseconds with a message naming the setting to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from megatron_rl.errors import FieldError


class ModelShape(Protocol):
    """The architecture facts a layout is checked against (megatron_rl.models.qwen_arch.QwenArch has them); a
    protocol, so that this layer needs nothing from the model layer above it (docs/design.md, layers)."""

    model_type: str
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_layers: int
    moe: Any  # None for dense models; else num_experts, expert_ffn_hidden_size, moe_layers


class ParallelLayoutError(ValueError):
    """A parallel layout that does not fit the world size or the model (the message names the setting)."""


class ParallelLayoutFieldError(ParallelLayoutError, FieldError):
    """A layout field out of range on its own (reported under the full config key, e.g. actor.layout.tp)."""


@dataclass(frozen=True)
class ParallelLayout:
    """tp: tensor parallel; pp: pipeline parallel; cp: context parallel; ep: expert parallel;
    etp: tensor parallel inside each expert (1 is the usual choice for fine-grained MoE such as Qwen3-MoE);
    vpp: virtual pipeline stages per rank (interleaved 1F1B) or None;
    sequence_parallel: None = on exactly when tp > 1 (Megatron requires it for MoE with TP)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int | None = None
    sequence_parallel: bool | None = None

    def __post_init__(self):
        def need(cond: bool, field: str, problem: str) -> None:
            if not cond:
                raise ParallelLayoutFieldError(field, problem, "parallel")

        for name in ("tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                 f"must be a positive integer, got {value!r}")
        need(self.vpp is None or (isinstance(self.vpp, int) and self.vpp >= 1), "vpp",
             f"must be a positive integer or null, got {self.vpp!r}")
        need(self.vpp is None or self.vpp == 1 or self.pp > 1, "vpp",
             f"{self.vpp} needs pp > 1 (virtual stages interleave pipeline stages)")
        need(not (self.sequence_parallel and self.tp == 1), "sequence_parallel", "true needs tp > 1")

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    def megatron_sizes(self) -> dict[str, int | None]:
        """The parallel sizes under the keyword names both TransformerConfig and initialize_model_parallel take."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp if (self.vpp or 1) > 1 else None,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )

    @property
    def model_parallel_size(self) -> int:
        """Ranks spanned by one replica of the dense part: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int, key: str = "parallel", world: str = "world size") -> int:
        """DP size for `world_size`, after checking both the dense and the expert decompositions divide it.
        key / world: how messages name the layout and the world size (the config: actor.layout, resources.actor_ranks)."""
        if world_size % self.model_parallel_size:
            raise ParallelLayoutError(
                f"{key}.tp x {key}.pp x {key}.cp = {self.tp}x{self.pp}x{self.cp} = {self.model_parallel_size} does not "
                f"divide {world}={world_size}; change the number of GPUs/ranks or the parallel sizes"
            )
        expert_span = self.etp * self.ep * self.pp
        if world_size % expert_span:
            raise ParallelLayoutError(
                f"{key}.etp x {key}.ep x {key}.pp = {self.etp}x{self.ep}x{self.pp} = {expert_span} does not divide "
                f"{world}={world_size}; change {key}.ep / {key}.etp or the number of GPUs/ranks"
            )
        return world_size // self.model_parallel_size

    def validate_for_arch(self, arch: ModelShape, key: str = "parallel") -> None:
        """Check every size the model's shapes impose; raise naming the first that does not divide. key: how the
        messages name the layout (the config says "actor.layout")."""

        def need(cond: bool, msg: str):
            if not cond:
                raise ParallelLayoutError(msg)

        need(arch.num_attention_heads % self.tp == 0,
             f"{key}.tp={self.tp} does not divide num_attention_heads={arch.num_attention_heads}")
        need(arch.num_kv_heads % self.tp == 0,
             f"{key}.tp={self.tp} does not divide num_key_value_heads (query groups)={arch.num_kv_heads}")
        has_dense_mlp = arch.moe is None or not all(arch.moe.moe_layers)  # an all-MoE model never builds it
        need(not has_dense_mlp or arch.ffn_hidden_size % self.tp == 0,
             f"{key}.tp={self.tp} does not divide intermediate_size={arch.ffn_hidden_size}")
        need(arch.vocab_size % self.tp == 0,
             f"{key}.tp={self.tp} does not divide vocab_size={arch.vocab_size} (vocab-parallel embedding)")
        stages = self.pp * (self.vpp or 1)
        need(arch.num_layers % stages == 0,
             f"pipeline stages {key}.pp x {key}.vpp = {stages} do not divide num_hidden_layers={arch.num_layers}")
        need(arch.num_layers // stages >= 1, "more pipeline stages than layers")
        if arch.moe is None:
            need(self.ep == 1, f"{key}.ep={self.ep} needs a MoE model; {arch.model_type} has no experts")
            need(self.etp == 1, f"{key}.etp={self.etp} needs a MoE model; {arch.model_type} has no experts")
        else:
            need(arch.moe.num_experts % self.ep == 0,
                 f"{key}.ep={self.ep} does not divide num_experts={arch.moe.num_experts}")
            need(arch.moe.expert_ffn_hidden_size % self.etp == 0,
                 f"{key}.etp={self.etp} does not divide moe_intermediate_size={arch.moe.expert_ffn_hidden_size}")

    def validate(self, world_size: int, arch: ModelShape | None = None, key: str = "parallel",
                 world: str = "world size") -> int:
        """Validate against the world (and the model when given); return the data-parallel size."""
        if arch is not None:  # the model's constraints first: they name the one setting that can never work
            self.validate_for_arch(arch, key)
        return self.data_parallel_size(world_size, key, world)

    def describe(self, world_size: int) -> str:
        dp = self.data_parallel_size(world_size)
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"CP={self.cp}", f"DP={dp}"]
        if self.ep > 1 or self.etp > 1:
            parts += [f"EP={self.ep}", f"ETP={self.etp}"]
        if self.vpp:
            parts.append(f"VPP={self.vpp}")
        if self.use_sequence_parallel:
            parts.append("SP")
        return " x ".join(parts[:4]) + ("" if len(parts) == 4 else ", " + ", ".join(parts[4:]))
