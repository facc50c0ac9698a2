"""Evaluations of trained runs: ``memzoo eval TASK RUN_DIR [key=value ...] [--step N]``.

Tasks (``TASKS``): ``ppl`` (held-out loss / perplexity / bits per byte at several context
lengths), ``mqar`` (multi-query associative recall), ``niah`` (RULER-style needle in a
haystack). The runner (``memzoo.evals.runner.run_eval``) loads the run, builds its tokenizer,
runs every cell of the task's grid under a progress bar and writes ``results.json``,
``table.md`` and the task's plots into ``RUN_DIR/evals/<TASK>/``.

Task-module protocol::

    # memzoo/evals/<name>.py
    NAME: str                                  # "ppl", "mqar", "niah"
    @dataclass
    class Settings: ...                        # typed fields with defaults; `key=value` CLI overrides set them (unknown key -> one-line error naming it, with a did-you-mean hint)
    def cells(s: Settings) -> list[dict]       # the grid: one dict of cell settings per cell (JSON-serialisable)
    def run_cell(ctx: EvalContext, s: Settings, cell: dict) -> dict   # metrics for one cell (JSON-serialisable floats/ints/strings)
    def table(s: Settings, results: list[dict]) -> str               # Markdown table; results = [{**cell, **metrics}, ...]
    def plots(s: Settings, results: list[dict], out_dir: Path) -> list[Path]   # PNGs written (may be [])

``EvalContext`` (``memzoo.evals.runner``) gives a task the model, config, tokenizer, run
directory and step, plus ``logits``, ``generate``, ``encode`` and ``nll`` helpers; ``heatmap``
and ``line_plot`` draw the shared plots; tasks raise ``EvalError`` for one-line user errors.
"""

from memzoo.evals.runner import (
    TASKS,
    EvalContext,
    EvalError,
    heatmap,
    line_plot,
    load_task,
    parse_settings,
    run_eval,
)

__all__ = [
    "TASKS",
    "EvalContext",
    "EvalError",
    "heatmap",
    "line_plot",
    "load_task",
    "parse_settings",
    "run_eval",
]
