"""NIAH generator, scoring and task module (no model needed, except the end-to-end test)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from memzoo.data import ByteTokenizer
from memzoo.evals import niah

TOK = ByteTokenizer()
PNG = b"\x89PNG\r\n\x1a\n"


def _samples(task: str, length: int, depth, samples: int = 2, seed: int = 0, **kw):
    s = niah.Settings(task=task, samples=samples, seed=seed, **kw)
    return niah.make_samples(s, {"length": length, "depth": depth}, TOK.encode, TOK.bos_id)


def _oracle_answer(prompt: str) -> str:
    """Reads the prompt like a perfect model: the values of the asked key(s), in order."""
    found: dict[str, list[str]] = {}
    for key, value in re.findall(r"for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.", prompt):
        found.setdefault(key, []).append(value)
    question = prompt[prompt.rindex("What ") :]
    asked = re.findall(r"([a-z]+-[a-z]+)", question.split("?")[0])
    return " " + ", ".join(v for k in asked for v in found[k]) + "."


class StandIn:
    """A stand-in eval context: byte tokenizer, generate answers like an oracle or wrongly."""

    def __init__(self, wrong: bool = False) -> None:
        self.tokenizer = TOK
        self.cfg = None
        self.wrong = wrong
        self.calls: list[tuple[int, int]] = []

    def encode(self, text: str) -> list[int]:
        return TOK.encode(text)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        assert len({len(p) for p in prompt_ids}) == 1
        self.calls.append((len(prompt_ids[0]), max_new_tokens))
        out = []
        for ids in prompt_ids:
            ans = " 0000000." if self.wrong else _oracle_answer(TOK.decode(ids))
            new = TOK.encode(ans) + [TOK.eos_id]
            assert len(new) <= max_new_tokens + 1
            out.append((new + [TOK.pad_id] * max_new_tokens)[:max_new_tokens])
        return out


@pytest.mark.parametrize("task", niah.TASKS)
def test_deterministic_given_seed(task):
    a, _ = _samples(task, 1024, 50)
    b, _ = _samples(task, 1024, 50)
    c, _ = _samples(task, 1024, 50, seed=1)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.ids for x in a] != [x.ids for x in c]
    assert a[0].ids != a[1].ids  # samples differ within a cell


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey"])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_needle_at_requested_depth(task, depth):
    xs, _ = _samples(task, 2048, depth, samples=3)
    for x in xs:
        # nearest sentence / line boundary: within a few percent at this length
        assert abs(x.depth_actual - depth) <= 6.0, (x.depth_actual, depth)
        lo, hi = x.haystack_span
        assert x.ids[x.needle_token :][:20] == TOK.encode("One of the secret numbers")[:20]
        if task == "niah_multikey":
            continue  # distractor needles shift the raw position
        frac = 100.0 * (x.needle_token - lo) / (hi - lo)
        assert abs(frac - depth) <= 6.0, (frac, depth)
        text = TOK.decode(x.ids)
        needle = niah.needle_text(x.asked[0], x.expected[0], "number")
        char_frac = text.index(needle) / len(text)
        assert abs(char_frac - depth / 100.0) <= 0.12


def test_random_depth_mode():
    s = niah.Settings(random_depth=True, lengths="256,512")
    assert niah.cells(s) == [{"length": 256, "depth": "random"}, {"length": 512, "depth": "random"}]
    xs, _ = _samples("niah_single_1", 1024, "random", samples=4)
    depths = [x.depth for x in xs]
    assert len(set(depths)) == 4 and all(0 <= d <= 100 for d in depths)


@pytest.mark.parametrize("task", niah.TASKS)
@pytest.mark.parametrize("length", [700, 1024, 1500])
def test_prompt_fits_budget_exactly(task, length):
    xs, max_new = _samples(task, length, 25)
    for x in xs:
        assert len(x.ids) + max_new == length
        assert x.ids[0] == TOK.bos_id
        assert max_new >= len(TOK.encode(niah.answer_text(x.expected)))
        assert TOK.decode(x.ids).rstrip().endswith(":")


@pytest.mark.parametrize(
    "task,n_needles,n_expected",
    [
        ("niah_single_1", 1, 1),
        ("niah_single_2", 1, 1),
        ("niah_single_3", 1, 1),
        ("niah_multikey", 4, 1),
        ("niah_multivalue", 4, 4),
        ("niah_multiquery", 4, 4),
    ],
)
def test_variants_needles_and_values(task, n_needles, n_expected):
    xs, _ = _samples(task, 1200, 50, samples=3)
    for x in xs:
        text = TOK.decode(x.ids)
        kind = "code" if task == "niah_single_3" else "number"
        assert text.count(f"One of the secret {kind}s for ") == n_needles
        assert len(x.values) == len(set(x.values)) == n_needles
        assert len(x.expected) == n_expected
        for k, v in zip(x.keys, x.values):
            assert niah.needle_text(k, v, "uuid" if kind == "code" else kind) in text
        if task == "niah_multivalue":
            assert len(set(x.keys)) == 1 and x.expected == x.values
        else:
            assert len(set(x.keys)) == n_needles
        for k in x.keys:
            assert re.fullmatch(r"[a-z]+-[a-z]+", k)
        if task == "niah_single_3":
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                x.expected[0],
            )
        else:
            assert all(re.fullmatch(r"[1-9][0-9]{6}", v) for v in x.values)
    # noise haystack vs natural text
    noise = TOK.decode(xs[0].ids)
    assert ("The lake is calm." in noise) == (task == "niah_single_1")


def test_haystack_paths(tmp_path):
    f = tmp_path / "essay.txt"
    f.write_text("Zebras graze on the quiet plain every morning.\n" * 50)
    xs, _ = _samples("niah_single_2", 512, 50, haystack_paths=str(f))
    assert "Zebras graze" in TOK.decode(xs[0].ids)
    with pytest.raises(ValueError, match="haystack_paths"):
        _samples("niah_single_2", 512, 50, haystack_paths=str(tmp_path / "missing.txt"))


def test_too_short_and_bad_settings():
    with pytest.raises(ValueError, match="too short"):
        _samples("niah_multiquery", 300, 50)
    with pytest.raises(ValueError, match="niah.task"):
        niah.cells(niah.Settings(task="niah_nope"))
    with pytest.raises(ValueError, match="niah.depths"):
        niah.cells(niah.Settings(depths="0,150"))


def test_scoring_known_strings():
    assert niah.string_match(" 1234567.", ["1234567"]) == 1.0
    assert niah.exact_match(" 1234567.", ["1234567"]) == 1.0
    assert niah.exact_match("the number is 1234567", ["1234567"]) == 0.0
    assert niah.string_match("the number is 1234567", ["1234567"]) == 1.0
    assert niah.string_match(" 7654321", ["1234567"]) == 0.0
    assert niah.exact_match("", ["1234567"]) == 0.0
    # case-insensitive (uuids)
    u = "f37a5e0c-05ff-420a-b702-5c9c765531b4"
    assert niah.string_match(" " + u.upper(), [u]) == 1.0
    assert niah.exact_match(" " + u.upper(), [u]) == 1.0
    # partial credit for several values
    vals = ["1111111", "2222222", "3333333", "4444444"]
    assert niah.string_match("1111111, 3333333", vals) == 0.5
    assert niah.exact_match("1111111, 3333333", vals) == 0.0
    assert niah.exact_match("4444444 3333333 2222222 1111111", vals) == 1.0


@pytest.mark.parametrize("task", niah.TASKS)
def test_run_cell_with_stand_in(task):
    s = niah.Settings(task=task, samples=3)
    cell = {"length": 1024, "depth": 75}
    good = niah.run_cell(StandIn(), s, cell)
    assert good["string_match"] == 1.0 and good["exact_match"] == 1.0
    assert good["samples"] == 3 and good["prompt_tokens"] + good["max_new_tokens"] == 1024
    bad = niah.run_cell(StandIn(wrong=True), s, cell)
    assert bad["string_match"] == 0.0 and bad["exact_match"] == 0.0


def _fake_results(s):
    return [
        {**c, "string_match": (i % 3) / 2, "exact_match": (i % 2) / 1}
        for i, c in enumerate(niah.cells(s))
    ]


def test_table_and_plot(tmp_path):
    s = niah.Settings(lengths="256,512", depths="0,50,100")
    cells = niah.cells(s)
    assert len(cells) == 6 and {c["depth"] for c in cells} == {0, 50, 100}
    results = _fake_results(s)
    md = niah.table(s, results)
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| depth \\ length | 256 | 512 | avg |")
    labels = [ln.split("|")[1].strip() for ln in lines[2:6]]
    assert labels == ["0%", "50%", "100%", "avg"]
    assert "string_match" in md and "exact_match" in md
    paths = niah.plots(s, results, tmp_path)
    assert paths and all(Path(p).read_bytes()[:8] == PNG for p in paths)


def test_stand_in_sees_equal_lengths():
    ctx = StandIn()
    out = niah.run_cell(ctx, niah.Settings(samples=4), {"length": 512, "depth": 0})
    assert ctx.calls == [(out["prompt_tokens"], out["max_new_tokens"])]
    assert SimpleNamespace(**out).examples[0]["depth_actual"] == 0.0


def test_rope_interpolation_scales_long_cells_only(tiny_run):
    from flax import nnx

    from memzoo.data import build_tokenizer
    from memzoo.evals.runner import EvalContext, load_run
    from memzoo.layers.attention import Attention

    model, cfg, run_dir = load_run(tiny_run)
    ctx = EvalContext(model, cfg, build_tokenizer(cfg.data), run_dir, 3)

    def scales():
        return {m.rope_scale for _, m in nnx.iter_graph(model) if isinstance(m, Attention)}

    seen = []
    generate = ctx.generate
    ctx.generate = lambda ids, n: seen.append(scales()) or generate(ids, n)
    s = niah.Settings(samples=1, rope_interpolation=True)
    long = niah.run_cell(ctx, s, {"length": 256, "depth": 50})
    assert cfg.seq_len == 32 and long["rope_scale"] == 32 / 256
    assert seen == [{32 / 256}] and scales() == {1.0}  # restored after the cell
    off = niah.run_cell(ctx, niah.Settings(samples=1), {"length": 256, "depth": 50})
    assert off["rope_scale"] is None and seen[-1] == {1.0}
    cfg.seq_len = 512  # a cell no longer than training keeps the model's scale
    short = niah.run_cell(ctx, s, {"length": 256, "depth": 50})
    assert short["rope_scale"] == 1.0 and seen[-1] == {1.0}


def test_end_to_end_through_runner(tmp_path):
    from tiny_runs import QUICKSTART, TINY_DATA, TINY_HYBRID

    from memzoo.config import load_config
    from memzoo.evals import run_eval
    from memzoo.train.loop import train

    cfg = load_config(
        QUICKSTART,
        [*TINY_HYBRID, *TINY_DATA, f"output_dir={tmp_path}", "steps=3", "run_name=niah"],
    )
    train(cfg)
    run_dir = tmp_path / "niah"
    out = run_eval(
        "niah", run_dir, ["lengths=256,320", "depths=0,100", "samples=1"], progress=False
    )
    ev = run_dir / "evals" / "niah"
    import json

    record = json.loads((ev / "results.json").read_text())
    assert len(record["cells"]) == 4
    for c in record["cells"]:
        assert 0.0 <= c["string_match"] <= 1.0 and 0.0 <= c["exact_match"] <= 1.0
        assert c["prompt_tokens"] + c["max_new_tokens"] == c["length"]
    assert "| depth \\ length | 256 | 320 | avg |" in (ev / "table.md").read_text()
    assert out["plots"] and all(Path(p).read_bytes()[:8] == PNG for p in out["plots"])
