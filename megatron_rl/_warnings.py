"""Silence warnings that are expected in this project's supported set-ups and carry no information for users.

Only exact, known messages are filtered (a new or different warning still shows):
- megatron-core's notices that TE/Apex are absent (always true on CPU; the local fallbacks are what we test);
- SP being disabled for expert layers with expert-TP 1 (we enable SP for the dense part only when TP > 1);
- torch's renames of the all_gather_into_tensor / reduce_scatter_tensor collectives that megatron-core calls;
- CUDA_DEVICE_MAX_CONNECTIONS advice, and a deprecated cuda-graph default megatron-core sets itself.
"""
import warnings

_KNOWN = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"When using sequence parallelism it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
)


def silence_known_warnings() -> None:
    for message in _KNOWN:
        warnings.filterwarnings("ignore", message=message)
