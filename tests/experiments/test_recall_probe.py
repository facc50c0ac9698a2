"""experiments/recall_probe.py: the copying probe behind the NIAH readings (sections of a
recall row, and the scores an oracle, a uniform guesser and a pure copier get)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from experiment_scripts import load_script

from memzoo.data.passkey import recall_row
from memzoo.data.tokenizer import ByteTokenizer

rp = load_script("recall_probe")
TOK = ByteTokenizer()
IDS = rp.token_ids(TOK)


def _rows(n: int = 4, seq_len: int = 256) -> list[dict[str, np.ndarray]]:
    return [recall_row(TOK, seq_len, 3, i) for i in range(n)]


def _text(tokens: np.ndarray, labels: np.ndarray, which: int) -> str:
    return bytes(int(t) for t in tokens[labels == which]).decode()


def test_sections_split_a_row_into_pairs_their_verbatim_repeat_and_lookups():
    for row in _rows():
        full = np.concatenate([row["inputs"], row["targets"][-1:]])
        lab = rp.sections(full, IDS["newline"], IDS["dot"], IDS["special"])
        pairs, repeat, lookup = (_text(full, lab, s) for s in (rp.PAIRS, rp.REPEAT, rp.LOOKUP))
        records = [r.strip() + "." for r in pairs.split(".")[:-1]]
        assert len(records) >= 2 and repeat == pairs  # the repeat copies every pair, in order
        assert lookup, "a 256-token row has room for lookups after the repeat"
        asked = [r.strip() + "." for r in lookup.split(".") if r.strip()]
        assert all(q in records for q in asked), asked  # lookups are records of this row


def _logp(rows, correct_where) -> np.ndarray:
    """Log-probs that are certain of the target where ``correct_where(label)``, else uniform."""
    V = 259
    out = np.full((len(rows), len(rows[0]["targets"]), V), -math.log(V), np.float32)
    for b, row in enumerate(rows):
        full = np.concatenate([row["inputs"], row["targets"][-1:]])
        lab = rp.sections(full, IDS["newline"], IDS["dot"], IDS["special"])[1:]
        for t, y in enumerate(row["targets"]):
            if correct_where(int(lab[t])):
                out[b, t] = -1e4
                out[b, t, y] = 0.0
    return out


def test_scores_of_an_oracle_a_uniform_guess_and_a_copier():
    rows = _rows()
    oracle = rp.score(_logp(rows, lambda s: True), rows, IDS)
    assert oracle["pairs_loss"] == oracle["repeat_loss"] == oracle["lookup_loss"] == 0.0
    assert oracle["repeat_digit_acc"] == oracle["lookup_digit_acc"] == 1.0
    uniform = rp.score(_logp(rows, lambda s: False), rows, IDS)
    for k in ("pairs_loss", "repeat_loss", "lookup_loss"):
        assert uniform[k] == pytest.approx(math.log(259), rel=1e-5)
    # argmax of a uniform row is id 0, never a digit
    assert uniform["repeat_digit_acc"] == uniform["lookup_digit_acc"] == 0.0
    copier = rp.score(_logp(rows, lambda s: s in (rp.REPEAT, rp.LOOKUP)), rows, IDS)
    assert copier["pairs_loss"] == pytest.approx(math.log(259), rel=1e-5)
    assert copier["repeat_loss"] == 0.0 and copier["repeat_digit_acc"] == 1.0
    assert copier["value_digits"] > 0


def test_a_tokenizer_that_merges_the_dot_is_refused_by_name():
    class Merging(ByteTokenizer):
        def encode(self, text):
            return [1, 2] if text == "." else super().encode(text)

    with pytest.raises(SystemExit, match="encodes '.'"):
        rp.token_ids(Merging())


def test_a_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert rp.main([str(tmp_path / "nope")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
