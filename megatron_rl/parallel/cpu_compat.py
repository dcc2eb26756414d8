"""Run megatron-core 0.16.1 (local layer spec, no Transformer Engine / Apex) on a CPU-only torch.

megatron-core assumes CUDA in a handful of places. `apply_cpu_compat()` patches exactly those, and is called by
our entry points (`megatron_rl.parallel.state.initialize_parallel`, the model builders) only when
`torch.cuda.is_available()` is False. On a CUDA machine nothing here runs and megatron-core is used unmodified.

Each patch below names the CUDA-only call it avoids and the feature that reaches it:

| patch                          | needed by                         | avoids                                          |
|--------------------------------|-----------------------------------|-------------------------------------------------|
| `_patch_cuda_device_queries`   | every model                       | torch.cuda.current_device()/synchronize()       |
| `_patch_rng_tracker`           | every model (TP RNG tracker)      | CUDA generator state get/set                    |
| `_patch_streams_and_events`    | MoE dispatchers, DDP, schedules   | torch.cuda.Stream / Event objects               |
| `_patch_moe_router_gemm`       | any MoE router                    | NameError on `te_general_gemm` without TE       |
| `_patch_moe_split_sizes`       | MoE alltoall dispatcher, EP > 1   | split sizes left as tensors for all_to_all      |
| `_patch_uneven_gathers`        | MoE alltoall with TP/ETP > 1      | gloo's equal-size all_gather                    |
| `_patch_torch_norm_sp`         | sequence parallel (TP > 1)        | WrappedTorchNorm's assert on sequence_parallel  |
| `_patch_distopt_checkpoint`    | distributed-optimizer checkpoints | fused-Adam-only state paths (3 bugs, see there) |
| `_CudaLiteralsToCpu` (a mode)  | schedules, optimizer, clip_grads  | remaining literal device="cuda" / .cuda()       |

The feasibility runs (shared/feasibility) showed TP, TP+SP, PP, EP, DP, the distributed optimizer and
dist_checkpointing matching single-process references to ~1e-6 on CPU with these patches.
"""
from __future__ import annotations

import contextlib
import logging

import torch

_applied = False


def cpu_compat_needed() -> bool:
    """True when megatron-core must be adapted to run on CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Apply every patch once if CUDA is unavailable. Returns True when patches are (now) active."""
    global _applied
    if _applied:
        return True
    if not cpu_compat_needed():
        return False
    for patch in _PATCHES:
        patch()
    _applied = True
    return True


def is_applied() -> bool:
    return _applied


# --------------------------------------------------------------------------------------------------------------
# Device queries and RNG
# --------------------------------------------------------------------------------------------------------------
def _patch_cuda_device_queries():
    """`torch.cuda.current_device()` is passed as `device=` throughout megatron (rotary embeddings, TP mappings,
    p2p communication, router, experts); on CPU it must name the CPU. synchronize/empty_cache become no-ops."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None


def _patch_rng_tracker():
    """megatron's CudaRNGStatesTracker (TP-consistent dropout / init) saves and restores *CUDA* generator states.
    On CPU the CPU generator plays that role. fork() then warns on every use that 'the CPU RNG state changed
    within a GPU RNG context' — expected here, since both are the same generator — so that logger is quietened."""
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------------------
# Streams and events
# --------------------------------------------------------------------------------------------------------------
class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoOpStream:
    """CPU ops are synchronous: every stream is the same (default) stream, every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


def _patch_streams_and_events():
    """The MoE alltoall dispatcher (DtoH side stream), DDP's overlapped grad reduction and the pipeline schedules
    create torch.cuda.Stream/Event objects and call Tensor.record_stream. Replace them by no-op equivalents."""
    default = _NoOpStream()
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda *a, **k: default
    torch.cuda.default_stream = lambda *a, **k: default
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, stream: None


# --------------------------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------------------------
def _patch_moe_router_gemm():
    """megatron-core 0.16.1 bug: moe_utils.RouterGatingLinearFunction reads the module global `te_general_gemm`,
    which is only bound when the Transformer Engine import succeeds -> NameError in every MoE router forward
    without TE. Binding it to None selects the plain torch matmul path that the code already has."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_split_sizes():
    """The alltoall token dispatcher turns its per-rank split sizes into numpy arrays via
    maybe_move_tensor_to_cpu(as_numpy=True), which only converts *CUDA* tensors. On CPU they stay tensors and
    torch.distributed.all_to_all_single(output_split_sizes=<tensor>) raises TypeError (EP > 1 only)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_gathers():
    """With TP (or expert-TP) > 1 the alltoall dispatcher all-gathers / reduce-scatters *uneven* token counts
    along dim 0. NCCL accepts uneven list all_gather; gloo requires equal sizes ("ProcessGroupGloo::allgather:
    invalid tensor size"). Gather padded-to-max then unpad; reduce-scatter as all-reduce then slice."""
    from megatron.core.tensor_parallel import mappings

    gather_even = mappings._gather_along_first_dim
    reduce_scatter_even = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather_even(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter_even(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(s) for s in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


# --------------------------------------------------------------------------------------------------------------
# Norms under sequence parallelism
# --------------------------------------------------------------------------------------------------------------
def _patch_torch_norm_sp():
    """WrappedTorchNorm (the norm of the local spec without Apex) asserts `not config.sequence_parallel`.
    The torch norm itself is fine under SP; what SP needs is that its weight gradients are all-reduced over TP,
    which finalize_model_grads does for params tagged `.sequence_parallel = True` (as Apex/TE norms are)."""
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


# --------------------------------------------------------------------------------------------------------------
# Distributed optimizer checkpoints with torch.optim.AdamW (no Apex/TE fused Adam)
# --------------------------------------------------------------------------------------------------------------
def _patch_distopt_checkpoint():
    """Three problems of DistributedOptimizer's non-Apex/TE path in megatron-core 0.16.1:

    a) sharded_state_dict(is_loading=True) on a fresh optimizer asserts every param already has a 'step':
       initialise the states with the dummy step megatron provides for exactly this purpose.
    b) _set_main_param_and_optimizer_states copies into fp32 main params that are views of leaf params outside
       no_grad (autograd error) and expects a per-param 'step' in the checkpoint (KeyError for
       fully_reshardable). Copy under no_grad, only keys the checkpoint carries, never the per-param 'step'
       (it is restored from param_groups; the per-param value is the dummy).
    c) load_state_dict assigns ONE shared `step` tensor to every param state; foreach AdamW then increments that
       shared tensor once per param per step -> wrong bias correction after a resume (silently different
       updates). Give each param its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    DistributedOptimizer = distrib_optimizer.DistributedOptimizer
    original_sharded_state_dict = DistributedOptimizer.sharded_state_dict
    original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states
    original_load_state_dict = DistributedOptimizer.load_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not distrib_optimizer.HAVE_APEX_OR_TE and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, destination in destinations.items():
                if key in tensors and key != "step":
                    destination.copy_(tensors[key])

    def load_state_dict(self, state_dict):
        result = original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict


# --------------------------------------------------------------------------------------------------------------
# The remaining literal device="cuda"
# --------------------------------------------------------------------------------------------------------------
def _is_cuda_device(value) -> bool:
    return (isinstance(value, str) and value.startswith("cuda")) or (
        isinstance(value, torch.device) and value.type == "cuda"
    )


class _CudaLiteralsToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites the literal CUDA placements left in megatron-core to CPU, process-wide.

    Found in 0.16.1: schedules.py (total_num_tokens), clip_grads.py, optimizer.py (found_inf, _scale_one),
    grad_scaler.py, param_and_grad_buffer.py, tensor_parallel/data.py, rope pin_memory under CP.
    Handles device= keyword arguments, Tensor.cuda(), Tensor.to("cuda"), pin_memory, and Tensor.type() strings
    (the optimizer asserts `param.type() == 'torch.cuda.FloatTensor'`).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if kwargs:
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = {**kwargs, "device": torch.device("cpu")}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu")) + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _enter_cuda_literals_mode():
    _CudaLiteralsToCpu().__enter__()  # stays active for the life of the process


# Order matters only for the mode, which is entered last so the patches above run unintercepted.
_PATCHES = (
    _patch_cuda_device_queries,
    _patch_rng_tracker,
    _patch_streams_and_events,
    _patch_moe_router_gemm,
    _patch_moe_split_sizes,
    _patch_uneven_gathers,
    _patch_torch_norm_sp,
    _patch_distopt_checkpoint,
    _enter_cuda_literals_mode,
)
