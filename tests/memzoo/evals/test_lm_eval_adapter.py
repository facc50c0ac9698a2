"""The lm-evaluation-harness adapter, exercised with lm-eval's request shape (objects with
``.args``) so it runs without the optional dependency."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from memzoo.evals.lm_eval_adapter import MemzooLM
from memzoo.generate import generate


def req(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def lm(tiny_run):
    return MemzooLM(tiny_run, max_length=24)


@jax.jit
def _logits(state, graphdef, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def manual_logprobs(lm, ids):
    graphdef, state = nnx.split(lm.model)
    logits = _logits(state, graphdef, np.asarray([ids[:-1]], np.int32))
    lp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    return lp[np.arange(len(ids) - 1), ids[1:]], lp.argmax(-1)


def test_loglikelihood_matches_a_manual_forward(lm):
    ctx, cont = "def main", "():"
    (ll, greedy), (ll2, _) = lm.loglikelihood([req(ctx, cont), req(ctx, " x")])
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(ctx), *lm.tokenizer.encode(cont)]
    lp, am = manual_logprobs(lm, ids)
    n = len(lm.tokenizer.encode(cont))
    assert ll == pytest.approx(float(lp[-n:].sum()), rel=1e-5, abs=1e-5)
    assert greedy == bool((am[-n:] == np.asarray(ids[-n:])).all())
    assert ll < 0 and ll2 < 0 and ll != ll2


def test_loglikelihood_truncates_long_contexts_from_the_left(lm):
    ctx = "import os\n" * 20  # far longer than max_length
    ((ll, _),) = lm.loglikelihood([req(ctx, "x")])
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(ctx), *lm.tokenizer.encode("x")]
    lp, _ = manual_logprobs(lm, ids[-25:])
    assert ll == pytest.approx(float(lp[-1]), rel=1e-5, abs=1e-5)


def test_rolling_scores_every_token_once(lm):
    text = "for i in range(10):\n    print(i)\n" * 2  # > max_length tokens: several windows
    (total,) = lm.loglikelihood_rolling([req(text)])
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(text)]
    assert len(ids) > 2 * lm.max_length
    expect, start = 0.0, 1
    while start < len(ids):
        end = min(len(ids), start + lm.max_length)
        lo = max(0, end - lm.max_length - 1)
        lp, _ = manual_logprobs(lm, ids[lo:end])
        expect += float(lp[-(end - start) :].sum())
        start = end
    assert total == pytest.approx(expect, rel=1e-5)
    # a short text is one window: the plain sum of its token log-probs
    (short,) = lm.loglikelihood_rolling([req("abc")])
    lp, _ = manual_logprobs(lm, [lm.tokenizer.bos_id, *lm.tokenizer.encode("abc")])
    assert short == pytest.approx(float(lp.sum()), rel=1e-5)


def test_generate_until_is_greedy_and_stops(lm):
    ctx = "def "
    ids = [lm.tokenizer.bos_id, *lm.tokenizer.encode(ctx)]
    full = generate(lm.model, np.asarray([ids], np.int32), 8)
    text = lm.tokenizer.decode(np.asarray(full[0, len(ids) :]).tolist())
    (plain,) = lm.generate_until([req(ctx, {"until": [], "max_gen_toks": 8})])
    assert plain == text
    stop = text[2:4] if len(text) >= 4 else None
    if stop:
        (cut,) = lm.generate_until([req(ctx, {"until": [stop], "max_gen_toks": 8})])
        assert cut == text[: text.find(stop)]


def test_errors(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError):
        MemzooLM(tmp_path / "missing")
    with pytest.raises(ValueError, match="max_length"):
        MemzooLM(tiny_run, max_length=1)
