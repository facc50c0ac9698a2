"""``pl.CostEstimate`` for the chunked linear-recurrence kernels (regimes A and B), shared by
the Triton kernels: the conventional FLOP count of the chunked form (per token and head,
2*C*dk + 2*C*dv intra-chunk plus 4*dk*dv for the state read and update, times ``factor``) and
the bytes of every operand and result."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from jax.experimental import pallas as pl


def nbytes(arrays: Iterable[Any]) -> int:
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays))


def chunked(
    bh: int,
    t: int,
    dk: int,
    dv: int,
    chunk: int,
    operands: Iterable[Any],
    results: Iterable[Any],
    factor: float = 1.0,
) -> pl.CostEstimate:
    flops = factor * bh * t * (2 * chunk * (dk + dv) + 4 * dk * dv)
    return pl.CostEstimate(
        flops=int(flops), transcendentals=0, bytes_accessed=nbytes(operands) + nbytes(results)
    )
