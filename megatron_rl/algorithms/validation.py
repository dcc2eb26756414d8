"""Input checks shared by the advantage estimators, the losses and the global counts.

Each check raises ValueError naming the field and the fix, before any expensive work.
"""
from __future__ import annotations

import torch

__all__ = ["as_bool_mask", "check_shape", "check_finite"]


def as_bool_mask(mask: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """`mask` as a bool [batch, response_len] tensor; it must be bool or hold only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, response_len], got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor); found other values")
    return mask != 0


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Raise unless `tensor` is a floating tensor of exactly `shape` (`what` explains the expected layout)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_finite(name: str, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise if `tensor` holds NaN or +-inf where `mask` is True (everywhere when mask is None).

    Positions outside the mask (padding) are not data and are not checked; the losses never read them.
    """
    values = tensor.detach()
    bad = ~torch.isfinite(values)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf) at valid positions, first at index "
            f"{first} (value {values[first].item()}); fix the producer of {name} (a -inf log-prob means the "
            "sampled token had probability 0 under that model)"
        )
