"""Held-out loss and bits per byte, the quickstart's evaluation of a checkpoint.

bpb = sum_t nll_t / (ln 2 * number of UTF-8 bytes of the scored targets)
"""

from __future__ import annotations

import math
from typing import Any


def heldout_metrics(eval_step: Any, params: Any, batches: list[dict], tokenizer: Any) -> dict:
    """Mean held-out NLL per token and bits per byte over fixed held-out batches."""
    from memzoo.data import count_bytes

    if not batches:
        return {}
    nll, tokens, n_bytes = 0.0, 0.0, 0.0
    for batch in batches:
        s, n = eval_step(params, batch)
        nll += float(s)
        tokens += float(n)
        n_bytes += float(count_bytes(batch, tokenizer))
    return {
        "heldout_loss": nll / max(tokens, 1.0),
        "heldout_bpb": nll / (math.log(2) * max(n_bytes, 1.0)),
        "heldout_tokens": int(tokens),
    }
