"""The one equality rule for tensors: bit-identical (NaN equals the same NaN, -0.0 differs
from 0.0), used by ``tfz.verify`` and ``tfz.diff_checkpoints`` alike."""

from __future__ import annotations

import torch

__all__ = ["bit_equal", "bits"]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A flat integer view of ``t``'s bytes: equal views <=> identical bits.

    Example:
        >>> import torch
        >>> bool((bits(torch.tensor([float("nan")])) == bits(torch.tensor([float("nan")]))).all())
        True
    """
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.reshape(-1)
    int_dtype = _INT_OF_SIZE.get(flat.element_size())
    if int_dtype is None:  # complex128 and other wide types
        return flat.contiguous().view(torch.uint8)
    return flat.view(int_dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits.

    Example:
        >>> import torch
        >>> nan = torch.tensor([float("nan"), 1.0])
        >>> bit_equal(nan, nan.clone()), torch.equal(nan, nan.clone())
        (True, False)
    """
    return a.shape == b.shape and a.dtype == b.dtype and \
        torch.equal(bits(a.detach()), bits(b.detach()))
