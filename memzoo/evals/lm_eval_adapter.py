"""An lm-evaluation-harness model backed by a memzoo run, for users with local task data.

    pip install "memzoo[lm-eval]"      # lm_eval is an optional dependency
    lm_eval --model memzoo --model_args run_dir=runs/quickstart,max_length=1024 --tasks ...

or from Python: ``MemzooLM("runs/quickstart")`` passed to ``lm_eval.simple_evaluate``.

The three request kinds of lm-eval's ``LM`` interface, each taking objects with ``.args``:

- ``loglikelihood``: ``(context, continuation)`` -> ``(sum log p(continuation | context),
  is_greedy)``; the row is ``[BOS] context continuation`` cut from the left to ``max_length``.
- ``loglikelihood_rolling``: ``(text,)`` -> the log-likelihood of every token of the text
  (after BOS), in disjoint windows of ``max_length`` tokens; each later window is conditioned
  on the ``max_length - window`` tokens before it, as lm-eval's rolling windows are.
- ``generate_until``: ``(context, {"until": [...], "max_gen_toks": N, ...})`` -> greedy text
  (``temperature`` / ``do_sample`` honoured) cut at the first stop string.

Rows are right-padded to the next power of two (causal models do not see the padding), so a
few compiled shapes serve a whole task. Nothing is downloaded; the model is the run's own
checkpoint and tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # an optional dependency: the adapter works (and is tested) without it
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register
except ImportError:  # pragma: no cover - depends on the environment
    _LMBase = object

    def _register(*names):
        return lambda cls: cls


def _bucket(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


@_register("memzoo")
class MemzooLM(_LMBase):
    """lm-eval model for a memzoo run directory (parameters of the latest or a named step)."""

    def __init__(
        self,
        run_dir: str | Path,
        step: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        precision: str = "fp32",
        **kwargs: Any,
    ) -> None:
        if _LMBase is not object:
            super().__init__()
        from memzoo.api import load
        from memzoo.data import build_tokenizer

        self.model, self.cfg = load(
            run_dir, None if step is None else int(step), precision=precision
        )
        self.tokenizer = build_tokenizer(self.cfg.data)
        self.max_length = int(max_length or self.cfg.seq_len)
        if self.max_length < 2:
            raise ValueError(f"MemzooLM: max_length must be >= 2, got {self.max_length}")
        self.max_gen_toks = int(max_gen_toks)
        graphdef, state = nnx.split(self.model)

        @jax.jit
        def logprobs(state, tokens):
            logits, _ = nnx.merge(graphdef, state)(tokens)
            return jax.nn.log_softmax(logits, axis=-1)

        self._state, self._logprobs = state, logprobs

    # ----------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _score(self, ids: list[int], n_target: int) -> tuple[float, bool]:
        """Sum of log p of the last ``n_target`` tokens of ``ids`` (BOS-led, <= max_length + 1
        tokens) given the rest, and whether each was the argmax."""
        inputs, targets = ids[:-1], ids[1:]
        width = _bucket(len(inputs))
        row = np.zeros((1, width), np.int32)
        row[0, : len(inputs)] = inputs
        lp = np.asarray(self._logprobs(self._state, jnp.asarray(row))[0, : len(inputs)])
        pos = np.arange(len(inputs) - n_target, len(inputs))
        tgt = np.asarray(targets[-n_target:])
        total = float(lp[pos, tgt].sum())
        greedy = bool((lp[pos].argmax(-1) == tgt).all())
        return total, greedy

    def loglikelihood(self, requests: Iterable[Any]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            cont = self._encode(continuation)
            if not cont:
                raise ValueError(f"MemzooLM: continuation {continuation!r} encodes to no tokens")
            ids = [self.tokenizer.bos_id, *self._encode(context), *cont]
            ids = ids[-(self.max_length + 1) :]
            out.append(self._score(ids, min(len(cont), len(ids) - 1)))
        return out

    def loglikelihood_rolling(self, requests: Iterable[Any]) -> list[float]:
        out = []
        for req in requests:
            ids = [self.tokenizer.bos_id, *self._encode(req.args[0])]
            total, start = 0.0, 1
            while start < len(ids):
                end = min(len(ids), start + self.max_length)
                lo = max(0, end - self.max_length - 1)
                total += self._score(ids[lo:end], end - start)[0]
                start = end
            out.append(total)
        return out

    def generate_until(self, requests: Iterable[Any]) -> list[str]:
        from memzoo.generate import generate

        out = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", True) else 0.0
            ids = [self.tokenizer.bos_id, *self._encode(context)]
            ids = ids[-max(1, self.max_length - n_new) :]
            toks = generate(
                self.model, jnp.asarray([ids], jnp.int32), n_new, temperature=temperature
            )
            text = self.tokenizer.decode(np.asarray(toks[0, len(ids) :]).tolist())
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            out.append(text if cut < 0 else text[:cut])
        return out


__all__ = ["MemzooLM"]
