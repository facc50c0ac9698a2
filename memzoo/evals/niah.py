"""Needle in a haystack, RULER-style (S-NIAH), with our own generator, wording and text.

Variants (``Settings.task``):

* ``niah_single_1``: a 7-digit number in a haystack of repeated filler sentences.
* ``niah_single_2``: a 7-digit number in natural text (the local corpus).
* ``niah_single_3``: a UUID in natural text.
* ``niah_multikey``: four needles with distinct keys, one key asked; the rest are distractors.
* ``niah_multivalue``: four needles sharing one key; all four values are expected.
* ``niah_multiquery``: four needles with distinct keys, all four asked and expected.

A prompt is ``[BOS] header haystack-with-needles question answer-prefix``; the model continues
with the value(s). Keys are adjective-noun pairs (``quiet-lantern``). A context length ``L``
is a budget in the model's tokens that includes the answer: the prompt is exactly
``L - max_new_tokens`` tokens and ``max_new_tokens`` is the longest answer of the cell (in
tokens) plus a small slack. Pieces (header, each haystack sentence, needles, question) are
tokenized separately and concatenated, so the budget is exact for every tokenizer; the
haystack is truncated at the token level at its end.

Depth: the first (target) needle is inserted at the haystack sentence boundary nearest to
``depth`` percent of the haystack; other needles go to seeded random boundaries. With
``random_depth`` the target depth is drawn uniformly per sample.

Scoring (RULER's): ``string_match`` is the fraction of expected values found
(case-insensitive) in the prediction; ``exact_match`` is 1 when the stripped prediction
starts with the single expected value, or, with several expected values, when all are present.
Both are averaged per cell over the samples.

The natural-text haystack is the docstrings of the interpreter's standard library (always
present locally), or the text files named by ``haystack_paths``; nothing is downloaded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # one-line user errors of the eval runner (a ValueError)
    from memzoo.evals.runner import EvalError
except ImportError:  # pragma: no cover - the runner is part of the package
    EvalError = ValueError

NAME = "niah"

TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
)

# task -> (haystack, value kind, needles, keys asked, values per key)
_VARIANTS: dict[str, tuple[str, str, int, int, int]] = {
    "niah_single_1": ("noise", "number", 1, 1, 1),
    "niah_single_2": ("text", "number", 1, 1, 1),
    "niah_single_3": ("text", "uuid", 1, 1, 1),
    "niah_multikey": ("text", "number", 4, 1, 1),
    "niah_multivalue": ("text", "number", 4, 1, 4),
    "niah_multiquery": ("text", "number", 4, 4, 1),
}

# Our own filler sentences for the repeated-noise haystack.
NOISE_SENTENCES = (
    "The lake is calm.",
    "The wind is soft.",
    "The road is long.",
    "Back and forth we walk.",
    "Round and round it goes.",
)

ADJECTIVES = (
    "amber", "bold", "brave", "bright", "calm", "clever", "crisp", "curious", "dusty", "eager",
    "fancy", "fierce", "gentle", "glossy", "golden", "grumpy", "happy", "hidden", "humble",
    "icy", "jolly", "lazy", "lively", "lucky", "mellow", "misty", "noble", "odd", "plain",
    "proud", "quiet", "rapid", "rusty", "shiny", "silent", "sleepy", "smooth", "sturdy",
    "sunny", "swift", "tame", "tiny", "vivid", "wild", "wise", "witty", "young", "zesty",
)  # fmt: skip

NOUNS = (
    "anchor", "badger", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "candle",
    "canyon", "castle", "cloud", "compass", "cottage", "crayon", "desert", "dragon", "falcon",
    "feather", "garden", "glacier", "hammer", "harbor", "helmet", "island", "kettle", "ladder",
    "lantern", "meadow", "mirror", "needle", "orchard", "otter", "pebble", "pepper", "pillow",
    "planet", "pocket", "rabbit", "ribbon", "saddle", "spoon", "teapot", "tiger", "tunnel",
    "violin", "wagon", "window",
)  # fmt: skip

_KIND_WORDS = {"number": ("number", "numbers"), "uuid": ("code", "codes")}
_ANSWER_SLACK = 2  # extra generated tokens beyond the longest expected answer


@dataclass
class Settings:
    """NIAH settings (``memzoo eval niah RUN_DIR key=value ...``).

    Attributes:
      task: one of ``TASKS``.
      lengths: comma-separated context lengths in model tokens (prompt + answer budget).
      depths: comma-separated needle depths in percent of the haystack (the grid's rows).
      random_depth: RULER's random-depth mode: one cell per length, depth drawn per sample.
      samples: prompts per cell.
      seed: generator seed (prompts are a deterministic function of seed, task and cell).
      haystack_paths: comma-separated local text files for the natural-text haystack;
        empty = the standard library's docstrings.
      haystack: ``auto`` (the task's own), ``noise`` or ``text`` to override the haystack.
      rope_interpolation: in a cell longer than the run's training ``seq_len``, multiply the
        attention layers' RoPE positions by ``seq_len / length`` (linear Position
        Interpolation, Chen et al. 2023, here without fine-tuning), so the rotation angles
        stay within those seen in training. Each cell records its ``rope_scale`` (null when
        off: the model's own).
    """

    task: str = "niah_single_1"
    lengths: str = "256,512,1024"
    depths: str = "0,25,50,75,100"
    random_depth: bool = False
    samples: int = 4
    seed: int = 0
    haystack_paths: str = ""
    haystack: str = "auto"
    rope_interpolation: bool = False


# --------------------------------------------------------------------------- settings / cells


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(float(x)) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"niah.{what}: expected comma-separated numbers, got {text!r}") from e
    if not out:
        raise ValueError(f"niah.{what}: empty")
    return out


def parse_lengths(s: Settings) -> list[int]:
    lengths = _ints(s.lengths, "lengths")
    if any(n < 1 for n in lengths):
        raise ValueError(f"niah.lengths: must be positive, got {s.lengths!r}")
    return lengths


def parse_depths(s: Settings) -> list[int]:
    depths = _ints(s.depths, "depths")
    if any(d < 0 or d > 100 for d in depths):
        raise ValueError(f"niah.depths: must be in [0, 100], got {s.depths!r}")
    return depths


def check_settings(s: Settings) -> None:
    if s.task not in _VARIANTS:
        raise ValueError(f"niah.task: unknown task {s.task!r} (expected one of {', '.join(TASKS)})")
    if s.haystack not in ("auto", "noise", "text"):
        raise ValueError(f"niah.haystack: expected auto, noise or text, got {s.haystack!r}")
    if int(s.samples) < 1:
        raise ValueError(f"niah.samples: must be >= 1, got {s.samples!r}")
    parse_lengths(s)
    parse_depths(s)


def cells(s: Settings) -> list[dict]:
    """One cell per (length, depth); in random-depth mode one per length (depth "random")."""
    check_settings(s)
    lengths = parse_lengths(s)
    if s.random_depth:
        return [{"length": n, "depth": "random"} for n in lengths]
    return [{"length": n, "depth": d} for d in parse_depths(s) for n in lengths]


# --------------------------------------------------------------------------- text sources


@functools.lru_cache(maxsize=4)
def _corpus_lines(paths: str, min_chars: int = 400_000) -> tuple[str, ...]:
    """Non-empty lines of natural text: the given files, else stdlib docstrings."""
    lines: list[str] = []
    if paths.strip():
        for p in [x.strip() for x in paths.split(",") if x.strip()]:
            path = Path(p).expanduser()
            if not path.is_file():
                raise ValueError(f"niah.haystack_paths: file {p!r} does not exist")
            text = path.read_text(encoding="utf-8", errors="replace")
            lines += [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"niah.haystack_paths: no text in {paths!r}")
        return tuple(lines)
    from memzoo.data.sources import stdlib_files

    root, rels = stdlib_files()
    # A fixed, machine-independent order that mixes packages (not alphabetical clumps).
    rels = sorted(rels, key=lambda r: hashlib.md5(r.encode()).hexdigest())
    total = 0
    for rel in rels:
        if rel.startswith(("test/", "idlelib/", "lib2to3/")):
            continue
        try:
            tree = ast.parse(Path(root, rel).read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for ln in doc.splitlines():
                ln = ln.strip()
                # prose-like lines only: words, not code or tables
                if len(ln) < 20 or ln.startswith((">>>", "...", "-", "=", "*", "|")):
                    continue
                if sum(c.isalpha() or c == " " for c in ln) < 0.85 * len(ln):
                    continue
                lines.append(ln)
                total += len(ln) + 1
        if total >= min_chars:
            break
    if not lines:  # pragma: no cover - every CPython has docstrings
        raise RuntimeError("niah: no natural text found in the standard library")
    return tuple(lines)


# --------------------------------------------------------------------------- generator


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def draw_value(rng: random.Random, kind: str) -> str:
    """A needle value: a 7-digit number (``kind`` "number") or a UUID4 string ("uuid")."""
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def draw_keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct adjective-noun keys ("quiet-lantern")."""
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def needle_text(key: str, value: str, kind: str) -> str:
    return f"One of the secret {_KIND_WORDS[kind][0]}s for {key} is: {value}."


def header_text(kind: str) -> str:
    return f"Remember the secret {_KIND_WORDS[kind][1]} hidden in this text.\n"


def question_text(kind: str, asked: list[str], n_values: int) -> str:
    one, many = _KIND_WORDS[kind]
    keys = _join(asked)
    if len(asked) == 1 and n_values == 1:
        return f"\nWhat is the secret {one} for {keys}? The secret {one} for {keys} is:"
    return f"\nWhat are all the secret {many} for {keys}? The secret {many} for {keys} are:"


def answer_text(expected: list[str]) -> str:
    return " " + ", ".join(expected) + "."


@dataclass
class Sample:
    """One prompt: its token ids, text, expected values and where the target needle went."""

    ids: list[int]
    expected: list[str]
    keys: list[str]
    asked: list[str]
    values: list[str]
    depth: float  # requested target depth in percent
    depth_actual: float  # where the target needle went, percent of the haystack (no needles)
    needle_token: int  # token index (in ids) where the target needle starts
    haystack_span: tuple[int, int]  # token span of the haystack incl. needles, in ids


def draw_needles(
    s: Settings, cell: dict, index: int
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(keys, values, asked keys, expected values) of sample ``index``; needle 0 is the target."""
    _, kind, n_needles, n_asked, n_values = _VARIANTS[s.task]
    rng = _rng("needles", s.task, s.seed, cell["length"], cell["depth"], index)
    if n_values > 1:  # one key, several values
        key = draw_keys(rng, 1)[0]
        values: list[str] = []
        while len(values) < n_needles:
            v = draw_value(rng, kind)
            if v not in values:
                values.append(v)
        return [key] * n_needles, values, [key], list(values)
    keys = draw_keys(rng, n_needles)
    values = []
    while len(values) < n_needles:
        v = draw_value(rng, kind)
        if v not in values:
            values.append(v)
    asked_idx = list(range(n_asked))
    return keys, values, [keys[i] for i in asked_idx], [values[i] for i in asked_idx]


def _haystack_units(s: Settings, rng: random.Random, encode, budget: int) -> list[list[int]]:
    """Token ids of whole haystack sentences (lines), at least ``budget`` tokens in all."""
    kind = _VARIANTS[s.task][0] if s.haystack == "auto" else s.haystack
    units: list[list[int]] = []
    total = 0
    if kind == "noise":
        cache = [list(encode(t + " ")) for t in NOISE_SENTENCES]
        i = 0
        while total < budget:
            units.append(cache[i % len(cache)])
            total += len(units[-1])
            i += 1
    else:
        lines = _corpus_lines(s.haystack_paths)
        j = rng.randrange(len(lines))
        for _ in range(10 * len(lines) + 10):
            if total >= budget:
                break
            units.append(list(encode(lines[j % len(lines)] + "\n")))
            total += len(units[-1])
            j += 1
        else:
            raise ValueError("niah: haystack text produced no tokens")
    return units


def _fit(units: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """Exactly ``budget`` tokens: whole sentences, the first one cut from its left.

    Returns the ids and the sentence boundaries (token offsets, 0 and ``budget`` included)
    where a needle may go; the cut is at the start so the haystack ends on a whole sentence.
    """
    total = sum(map(len, units))
    units = list(units)
    while units and total - len(units[0]) >= budget:
        total -= len(units.pop(0))
    if units:
        units[0] = units[0][total - budget :]
    ids: list[int] = []
    bounds = [0]
    for u in units:
        ids += u
        bounds.append(len(ids))
    assert len(ids) == budget
    return ids, sorted(set(bounds))


def _nearest(starts: list[int], target: float) -> int:
    return min(starts, key=lambda b: (abs(b - target), b))


def make_sample(
    s: Settings, cell: dict, index: int, encode, bos_id: int | None, prompt_tokens: int
) -> Sample:
    """Builds sample ``index`` of ``cell`` with exactly ``prompt_tokens`` prompt tokens."""
    check_settings(s)
    _, kind, _, _, n_values = _VARIANTS[s.task]
    keys, values, asked, expected = draw_needles(s, cell, index)
    rng = _rng("haystack", s.task, s.seed, cell["length"], cell["depth"], index)
    depth = rng.uniform(0, 100) if cell["depth"] == "random" else float(cell["depth"])
    head = ([bos_id] if bos_id is not None else []) + list(encode(header_text(kind)))
    sep = " " if (_VARIANTS[s.task][0] if s.haystack == "auto" else s.haystack) == "noise" else "\n"
    needles = [list(encode(needle_text(k, v, kind) + sep)) for k, v in zip(keys, values)]
    question = list(encode(question_text(kind, asked, n_values)))
    fixed = len(head) + sum(map(len, needles)) + len(question)
    budget = prompt_tokens - fixed
    if budget < 0:
        raise EvalError(
            f"niah: context length {cell['length']} is too short for task {s.task}: the "
            f"header, needles, question and answer alone take "
            f"{fixed + int(cell['length']) - prompt_tokens} tokens"
        )
    hay, bounds = _fit(_haystack_units(s, rng, encode, budget), budget)
    # positions in the haystack (token offsets) for each needle; target first
    positions = [_nearest(bounds, depth / 100.0 * budget)]
    positions += [rng.choice(bounds) for _ in needles[1:]]
    order = sorted(range(len(needles)), key=lambda i: (positions[i], i))
    ids = list(head)
    cursor = 0
    target_at = -1
    for i in order:
        ids += hay[cursor : positions[i]]
        cursor = positions[i]
        if i == 0:
            target_at = len(ids)
        ids += needles[i]
    ids += hay[cursor:]
    hay_end = len(ids)
    ids += question
    assert len(ids) == prompt_tokens, (len(ids), prompt_tokens)
    return Sample(
        ids=ids,
        expected=expected,
        keys=keys,
        asked=asked,
        values=values,
        depth=depth,
        depth_actual=100.0 * positions[0] / max(budget, 1),
        needle_token=target_at,
        haystack_span=(len(head), hay_end),
    )


def answer_budget(s: Settings, cell: dict, encode) -> int:
    """max_new_tokens of a cell: the longest expected answer in tokens plus a slack."""
    longest = 0
    for i in range(int(s.samples)):
        expected = draw_needles(s, cell, i)[3]
        longest = max(longest, len(encode(answer_text(expected))))
    return longest + _ANSWER_SLACK


def make_samples(s: Settings, cell: dict, encode, bos_id: int | None) -> tuple[list[Sample], int]:
    """All samples of a cell (equal lengths) and the cell's max_new_tokens."""
    max_new = answer_budget(s, cell, encode)
    prompt_tokens = int(cell["length"]) - max_new
    samples = [
        make_sample(s, cell, i, encode, bos_id, prompt_tokens) for i in range(int(s.samples))
    ]
    return samples, max_new


# --------------------------------------------------------------------------- scoring


def string_match(prediction: str, expected: list[str]) -> float:
    """Fraction of ``expected`` values that occur in ``prediction`` (case-insensitive)."""
    pred = prediction.lower()
    return sum(v.lower() in pred for v in expected) / len(expected)


def exact_match(prediction: str, expected: list[str]) -> float:
    """1.0 if the stripped prediction starts with the single value / contains all values."""
    if len(expected) == 1:
        return float(prediction.strip().lower().startswith(expected[0].lower()))
    return float(string_match(prediction, expected) == 1.0)


# --------------------------------------------------------------------------- task protocol


def _cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    ids = [int(t) for t in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def run_cell(ctx: Any, s: Settings, cell: dict) -> dict:
    """Generates and scores the samples of one cell; returns the cell's result dict."""
    tok = ctx.tokenizer
    samples, max_new = make_samples(s, cell, ctx.encode, getattr(tok, "bos_id", None))
    scale = None  # the model's own
    if s.rope_interpolation:
        from memzoo.models.lm import set_rope_scale

        base_scale = float(ctx.cfg.model.rope_scale)
        scale = base_scale * min(1.0, int(ctx.cfg.seq_len) / int(cell["length"]))
        set_rope_scale(ctx.model, scale)
    try:
        outs = ctx.generate([x.ids for x in samples], max_new)
    finally:
        if scale is not None:
            set_rope_scale(ctx.model, base_scale)
    eos = getattr(tok, "eos_id", None)
    examples = []
    sm, em = [], []
    for x, out in zip(samples, outs):
        pred = tok.decode(_cut_at_eos(list(out), eos))
        a, b = string_match(pred, x.expected), exact_match(pred, x.expected)
        sm.append(a)
        em.append(b)
        examples.append(
            {
                "expected": x.expected,
                "prediction": pred,
                "string_match": a,
                "exact_match": b,
                "depth": round(x.depth, 3),
                "depth_actual": round(x.depth_actual, 3),
            }
        )
    return {
        "task": s.task,
        "length": int(cell["length"]),
        "depth": cell["depth"],
        "samples": len(samples),
        "prompt_tokens": len(samples[0].ids),
        "max_new_tokens": max_new,
        "rope_scale": scale,
        "string_match": sum(sm) / len(sm),
        "exact_match": sum(em) / len(em),
        "examples": examples,
    }


def _matrix(s: Settings, results: list[dict], metric: str):
    lengths = sorted({int(r["length"]) for r in results})
    depths = sorted({r["depth"] for r in results}, key=lambda d: (isinstance(d, str), d))
    grid: dict[tuple[Any, int], float] = {
        (r["depth"], int(r["length"])): r[metric] for r in results
    }
    rows = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
    return rows, depths, lengths


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def _markdown(rows, depths, lengths) -> str:
    head = "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " | avg |"
    sep = "|" + "---|" * (len(lengths) + 2)
    lines = [head, sep]
    for d, row in zip(depths, rows):
        label = f"{d}%" if not isinstance(d, str) else d
        lines.append(
            f"| {label} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {_mean(row):.3f} |"
        )
    cols = [_mean([r[j] for r in rows]) for j in range(len(lengths))]
    allv = _mean([x for r in rows for x in r])
    lines.append("| avg | " + " | ".join(f"{x:.3f}" for x in cols) + f" | {allv:.3f} |")
    return "\n".join(lines)


def table(s: Settings, results: list[dict]) -> str:
    """Markdown tables (string_match, then exact_match): depth rows, length columns, averages."""
    out = [f"## NIAH {s.task} ({s.samples} samples per cell, seed {s.seed})", ""]
    for metric in ("string_match", "exact_match"):
        out += [f"### {metric}", "", _markdown(*_matrix(s, results, metric)), ""]
    return "\n".join(out)


def plots(s: Settings, results: list[dict], out_dir) -> list[Path]:
    """A depth x length heatmap of string_match (red = 0, green = 1)."""
    from memzoo.evals.runner import heatmap

    rows, depths, lengths = _matrix(s, results, "string_match")
    path = Path(out_dir) / f"heatmap_{s.task}.png"
    labels = [f"{d}%" if not isinstance(d, str) else d for d in depths]
    return [heatmap(rows, labels, lengths, f"NIAH {s.task} string_match", path, vmin=0, vmax=1)]
