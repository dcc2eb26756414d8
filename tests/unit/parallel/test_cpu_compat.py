"""The megatron-core CPU compatibility layer is applied only when CUDA is unavailable, never on import.

Each check runs in a fresh interpreter: the patches are process-wide and must not leak into (or from) other tests.
The "CUDA machine" case replaces torch.cuda.is_available() by `lambda: True` before anything else runs: that is
the only thing the layer asks (it must not touch CUDA itself), so this is how a GPU machine looks to it.
"""
import os
import subprocess
import sys
import textwrap

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

ORIGINALS = """
import torch
import megatron.core.tensor_parallel.mappings as mappings
import megatron.core.transformer.moe.moe_utils as moe_utils
import megatron.core.tensor_parallel.random as mrandom
from megatron.core.optimizer import distrib_optimizer
def current():
    return {
        "current_device": torch.cuda.current_device, "Stream": torch.cuda.Stream, "Event": torch.cuda.Event,
        "record_stream": torch.Tensor.record_stream, "gather": mappings._gather_along_first_dim,
        "move": moe_utils.maybe_move_tensor_to_cpu, "rng": mrandom._get_cuda_rng_state,
        "distopt": distrib_optimizer.DistributedOptimizer.load_state_dict,
    }
originals = current()
def changed():
    now = current()
    return [k for k in originals if now[k] is not originals[k]]
"""


def _run(*parts: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "\n".join(textwrap.dedent(part) for part in parts)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_nothing_is_patched_on_a_cuda_machine_or_on_import():
    _run(
        """
        import torch
        torch.cuda.is_available = lambda: True  # what a GPU machine answers
        """,
        ORIGINALS,
        """
        import megatron_rl.actor.megatron_actor, megatron_rl.models.builder, megatron_rl.models.verify  # noqa: F401
        from megatron_rl.parallel import cpu_compat
        assert not cpu_compat.is_applied() and changed() == [], changed()   # importing patches nothing
        assert cpu_compat.apply_cpu_compat() is False                           # CUDA: nothing to do
        assert not cpu_compat.is_applied() and changed() == [], changed()
        modes = torch.overrides._get_current_function_mode_stack()
        assert not any(type(m).__name__ == "_CudaLiteralsToCpu" for m in modes), modes
        """
    )


def test_every_patch_is_active_without_cuda():
    _run(
        """
        import torch
        assert not torch.cuda.is_available()
        """,
        ORIGINALS,
        """
        from megatron_rl.parallel import cpu_compat
        assert cpu_compat.apply_cpu_compat() is True and cpu_compat.apply_cpu_compat() is True  # idempotent
        assert set(changed()) == set(originals), set(originals) - set(changed())  # every patch took effect
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"          # literal device="cuda" -> CPU
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"            # the optimizer's type assertion
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda.current_stream().wait_stream(stream)
        assert moe_utils.te_general_gemm is None                           # router GEMM falls back to torch
        assert isinstance(moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True), __import__("numpy").ndarray)
        """
    )
