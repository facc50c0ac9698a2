"""The sweep report: ``sweeps/<name>/results.csv``, ``report.md`` and ``plots/*.png``.

One row per run: its settings, parameters, tokens seen, final training loss, held-out loss /
bits per byte (``metrics.jsonl``), every eval metric flattened (``RUN_DIR/evals/<name>/
results.json``: the task's headline metric averaged over its cells as ``<eval>.<metric>`` and
every cell as ``<eval>.<metric>.<cell>``), training wall time (``status.json``) and tokens/s
(the median logged rate). With ``lr_sweep`` the best learning rate of each cell is marked.

Plots (matplotlib, Agg): accuracy vs model width per architecture, faceted by sequence length
(Zoology's figure; when ``model.d_model`` varies and an accuracy metric exists; otherwise a
bar per run and eval cell), the training loss curves overlaid, and a grid of the runs' NIAH
depth x length heatmaps.
``memzoo report SWEEP_DIR`` rebuilds all of it from the files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from memzoo.sweep.spec import Sweep, SweepError, expand, parse_sweep

PLOTS_DIR = "plots"
PLOT_TITLES = {  # every figure a report can draw, by file name
    "accuracy_vs_width.png": "Accuracy vs model width",
    "accuracy_by_run.png": "Accuracy per run",
    "loss_curves.png": "Training loss",
    "niah_heatmaps.png": "NIAH heatmaps",
}
BASE_COLUMNS = (
    "status",
    "params",
    "tokens_seen",
    "final_step",
    "final_loss",
    "heldout_loss",
    "heldout_bpb",
)
TAIL_COLUMNS = ("train_wall_s", "tokens_per_sec")
MAX_PANELS = 48


# ----------------------------------------------------------------------------- eval metrics


def _mean(xs: list[float]) -> float | None:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return sum(xs) / len(xs) if xs else None


def flatten_eval(name: str, task: str, record: dict[str, Any]) -> dict[str, float]:
    """An eval's results.json as flat columns: ``<name>.<metric>`` (mean over cells) and
    ``<name>.<metric>.<cell>`` per cell."""
    cells = record.get("cells") or []
    out: dict[str, float] = {}
    if task == "mqar":
        out[f"{name}.accuracy"] = _mean([c.get("accuracy") for c in cells])
        for c in cells:
            out[f"{name}.accuracy.T{c['seq_len']}.kv{c['num_pairs']}"] = c.get("accuracy")
    elif task == "niah":
        for metric in ("string_match", "exact_match"):
            out[f"{name}.{metric}"] = _mean([c.get(metric) for c in cells])
        for c in cells:
            for metric in ("string_match", "exact_match"):
                out[f"{name}.{metric}.L{c['length']}.d{c['depth']}"] = c.get(metric)
    elif task == "ppl":
        for metric in ("bpb", "loss"):
            out[f"{name}.{metric}"] = _mean([c.get(metric) for c in cells])
        for c in cells:
            length = c.get("length", c.get("seq_len"))
            for metric in ("bpb", "loss"):
                out[f"{name}.{metric}.L{length}"] = c.get(metric)
    else:  # an unknown task: the mean of every numeric field
        keys = {k for c in cells for k, v in c.items() if isinstance(v, (int, float))}
        for k in sorted(keys):
            out[f"{name}.{k}"] = _mean([c.get(k) for c in cells])
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- collection


def load_sweep_dir(path: str | Path, root: str | Path = "sweeps") -> tuple[Sweep, Path]:
    """(sweep, sweep_dir) for a sweep directory (its sweep.yaml copy) or a sweep file."""
    path = Path(path)
    if path.is_dir():
        spec = path / "sweep.yaml"
        if not spec.is_file():
            raise SweepError(
                f"{path} has no sweep.yaml: not a sweep directory (written by memzoo sweep)"
            )
        data = yaml.safe_load(spec.read_text()) or {}
        if isinstance(data, dict) and data.get("base") and not Path(data["base"]).is_file():
            data.pop("base")  # the report does not need the base config
        return parse_sweep(data, spec), path
    if path.is_file():
        from memzoo.sweep.spec import load_sweep

        sweep = load_sweep(path)
        return sweep, sweep.sweep_dir(root)
    raise SweepError(f"no sweep directory or sweep file at {path}")


_PARAMS_CACHE: dict[str, int | None] = {}


def count_params(cfg_dict: dict[str, Any]) -> int | None:
    """Parameters of a run's model from its resolved config (abstract init, no memory)."""
    key = json.dumps(cfg_dict.get("model"), sort_keys=True)
    if key in _PARAMS_CACHE:
        return _PARAMS_CACHE[key]
    try:
        import jax
        import numpy as np
        from flax import nnx

        from memzoo.config import config_from_dict
        from memzoo.models.lm import build_model

        cfg = config_from_dict(cfg_dict)
        abstract = nnx.eval_shape(lambda: build_model(cfg.model, seed=cfg.seed))
        leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        n = int(sum(int(np.prod(x.shape)) for x in leaves))
    except Exception:
        n = None
    _PARAMS_CACHE[key] = n
    return n


def _run_row(sweep: Sweep, run, run_dir: Path, rec: dict[str, Any]) -> dict[str, Any]:
    from memzoo.sweep.runner import DRIFT_IGNORED, flat_config, latest_checkpoint
    from memzoo.train.metrics import read_metrics

    row: dict[str, Any] = {"run": run.name, "cell": run.cell, **run.settings}
    cfg_dict: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        cfg_dict = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    saved = flat_config(cfg_dict)
    for key in run.settings:  # keys a sweep may change after a run trained: the run's own
        if key.startswith(DRIFT_IGNORED) and saved.get(key) is not None:
            row[key] = saved[key]
    last = latest_checkpoint(run_dir)
    status = rec.get("status")
    if status is None:
        steps = cfg_dict.get("steps")
        if not cfg_dict:
            status = "pending"
        elif last is not None and steps is not None and last >= steps:
            status = "finished"
        else:
            status = "incomplete"
    row["status"] = status
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    held = [m for m in metrics if "heldout_loss" in m]
    if train:
        row["final_loss"] = train[-1]["loss"]
        row["tokens_seen"] = train[-1].get("tokens_seen")
        rates = [m["tokens_per_sec"] for m in train if "tokens_per_sec" in m]
        if len(rates) > 1:
            rates = rates[1:]  # the first interval holds the compilation
        if rates:
            row["tokens_per_sec"] = statistics.median(rates)
    if held:
        row["heldout_loss"] = held[-1]["heldout_loss"]
        row["heldout_bpb"] = held[-1].get("heldout_bpb")
    row["final_step"] = last if last is not None else rec.get("final_step")
    if row.get("tokens_seen") is None and last and cfg_dict:
        row["tokens_seen"] = last * cfg_dict["batch_size"] * cfg_dict["seq_len"]
    row["params"] = rec.get("params") or (count_params(cfg_dict) if cfg_dict else None)
    row["train_wall_s"] = rec.get("train_wall_s")
    for ev in sweep.evals:
        path = run_dir / "evals" / ev.name / "results.json"
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                row.update(flatten_eval(ev.name, ev.task, json.loads(path.read_text())))
    if rec.get("error"):
        row["error"] = rec["error"]
    return row


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _rank(vr: tuple[float, dict[str, Any]], sign: float) -> tuple[float, float]:
    value, row = vr
    held = _number(row.get("heldout_loss"))
    return (sign * value, -held if held is not None else -math.inf)


def mark_best(sweep: Sweep, rows: list[dict[str, Any]]) -> None:
    """With lr_sweep: ``best_lr`` = True on the best run of each cell by the select metric."""
    if not sweep.lr_sweep:
        return
    metric, mode = sweep.select.metric, sweep.select.mode
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    for group in by_cell.values():
        scored = [(_number(r.get(metric)), r) for r in group]
        scored = [(v, r) for v, r in scored if v is not None and r.get("status") == "finished"]
        for r in group:
            r["best_lr"] = False
        if scored:  # ties: the lower held-out loss, then the first listed lr
            sign = 1.0 if mode == "max" else -1.0
            best = max(scored, key=lambda vr, sign=sign: _rank(vr, sign))
            best[1]["best_lr"] = True


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def read_results_csv(path: Path) -> dict[str, dict[str, Any]]:
    """A results.csv (as ``memzoo report`` writes it) as {run name: row}, values typed."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "run" not in reader.fieldnames:
            raise SweepError(f"{path}: not a sweep results.csv (it has no 'run' column)")
        return {r["run"]: {k: _csv_value(v or "") for k, v in r.items()} for r in reader}


def _pick(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The first candidate row that finished, else the first that started, else the first."""
    done = [c for c in candidates if c.get("status") == "finished"]
    started = [c for c in candidates if c.get("status") not in (None, "pending")]
    return (done or started or candidates)[0]


def _csv_rows(sweep: Sweep, runs: list, path: Path, what: str) -> dict[str, dict[str, Any]]:
    table = read_results_csv(path)
    if table and not {r.name for r in runs} & set(table):
        raise SweepError(
            f"--merge {what}: none of its {len(table)} runs is a run of sweep {sweep.name!r}"
        )
    rows = {}
    for r in runs:
        if r.name in table:  # the settings come from the sweep file, the figures from the csv
            row = {**table[r.name], "run": r.name, "cell": r.cell, **r.settings, "_dir": None}
            if row.get("status") is None:
                row["status"] = "pending"
            rows[r.name] = row
    return rows


def _merge_source(sweep: Sweep, runs: list, source: Path) -> dict[str, dict[str, Any]]:
    """{run: row} from another copy of this sweep: a results.csv, or a sweep directory (its
    run directories, and its results.csv for runs that have none there, as ``--publish``
    leaves them)."""
    from memzoo.sweep.runner import read_status

    if not source.is_dir():
        if not source.is_file():
            raise SweepError(f"--merge {source}: no such results.csv or sweep directory")
        return _csv_rows(sweep, runs, source, str(source))
    table, runs_dir = source / "results.csv", source / "runs"
    if not runs_dir.is_dir() and not table.is_file():
        raise SweepError(f"--merge {source}: a sweep directory needs runs/ or results.csv")
    rows = _csv_rows(sweep, runs, table, str(source)) if table.is_file() else {}
    status = read_status(source)["runs"]
    for r in runs:
        run_dir = runs_dir / r.name
        if run_dir.is_dir():
            row = {**_run_row(sweep, r, run_dir, status.get(r.name, {})), "_dir": run_dir}
            rows[r.name] = _pick([row, rows[r.name]]) if r.name in rows else row
    return rows


def collect(
    sweep: Sweep, sweep_dir: Path, merge: list[str | Path] | tuple = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, columns) of the sweep's runs as they are on disk.

    ``merge``: other copies of the sweep (a sweep directory from another machine, or a
    published results.csv). A run takes its row from the first place it finished, in the
    order here first, then the merge sources; where it finished nowhere, from the first
    place it started. Rows from a csv have no run directory (``_dir`` None): no loss curve
    or NIAH heatmap is drawn for them. With ``merge`` a ``source`` column says where each
    row came from (empty: this directory).
    """
    from memzoo.sweep.runner import read_status

    status = read_status(sweep_dir)["runs"]
    runs = expand(sweep, sweep_dir.parent, validate=False)
    rows = []
    for r in runs:
        run_dir = sweep_dir / "runs" / r.name
        rows.append({**_run_row(sweep, r, run_dir, status.get(r.name, {})), "_dir": run_dir})
    sources = [(str(m), _merge_source(sweep, runs, Path(m))) for m in merge]
    for i, row in enumerate(rows):
        row["source"] = ""
        candidates = [row, *(dict(t[row["run"]], source=s) for s, t in sources if row["run"] in t)]
        rows[i] = _pick(candidates)
    mark_best(sweep, rows)
    metric_cols: list[str] = []
    for r in rows:
        for ev in sweep.evals:
            for k in r:
                if k.startswith(ev.name + ".") and k not in metric_cols:
                    metric_cols.append(k)
    # means first (eval.metric), then per-cell columns, each in first-seen order
    metric_cols.sort(key=lambda c: c.count(".") > 1)
    cols = ["run", *sweep.setting_keys(), *BASE_COLUMNS, *metric_cols, *TAIL_COLUMNS]
    if sweep.lr_sweep:
        cols += ["cell", "best_lr"]
    cols.append("error")
    if merge:
        cols.append("source")
    return rows, cols


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", ":", "-.")


def series_styles(labels: list[str], plt) -> dict[str, dict[str, Any]]:
    """A distinct (colour, marker, line style) per series: ten colours, then the next marker
    and line style for each further ten, so 20+ lines stay apart where colours alone do not."""
    cmap = plt.get_cmap("tab10")
    return {
        lab: {
            "color": cmap(i % 10),
            "marker": _MARKERS[(i // 10) % len(_MARKERS)],
            "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)],
        }
        for i, lab in enumerate(labels)
    }


def _shared_legend(fig, axes, fontsize: float) -> None:
    """One legend right of the figure for the lines of every panel (each label once)."""
    handles = {}
    for ax in axes.flat:
        h, n = ax.get_legend_handles_labels()
        handles.update(zip(n, h))
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside right upper",
        fontsize=fontsize,
        frameon=False,
    )


def _label(row: dict[str, Any], keys: list[str], named: Collection[str] = ()) -> str:
    """The row's values of ``keys``; a key in ``named`` shows as ``name=value`` (its last
    dotted part), for settings only some runs change, whose bare values would not say which."""
    parts = [
        f"{k.rsplit('.', 1)[-1]}={row[k]}" if k in named else str(row[k])
        for k in keys
        if row.get(k) is not None
    ]
    return " ".join(parts) or "all runs"


def _set_by_some(keys: list[str], rows: list[dict[str, Any]]) -> set[str]:
    """The keys some rows leave unset: series labels name them (``_label``'s ``named``)."""
    return {k for k in keys if any(r.get(k) is None for r in rows)}


def accuracy_metric(sweep: Sweep, cols: list[str]) -> str | None:
    means = [c for c in cols if c.count(".") == 1]
    if sweep.select.metric in means and "acc" in sweep.select.metric:
        return sweep.select.metric
    acc = [c for c in means if c.endswith(".accuracy")]
    return acc[0] if acc else None


def plot_accuracy_vs_width(
    sweep: Sweep, rows: list[dict[str, Any]], cols: list[str], out: Path
) -> Path | None:
    """Zoology's figure: accuracy vs d_model, a line per architecture, a panel per length."""
    metric = accuracy_metric(sweep, cols)
    width, facet = "model.d_model", "seq_len"
    keys = sweep.setting_keys()
    if metric is None or width not in keys:
        return None
    pts = [r for r in rows if _number(r.get(metric)) is not None and _number(r.get(width))]
    if sweep.lr_sweep:
        pts = [r for r in pts if r.get("best_lr")]
    if len({r[width] for r in pts}) < 2:
        return None
    facets = sorted({r.get(facet) for r in pts}, key=lambda v: (v is None, v or 0))
    # series: the other settings, less those fixed by the facet (set together with seq_len)
    others = [k for k in keys if k not in (width, facet, "optim.lr")]
    dependent = [
        k
        for k in others
        if all(len({r.get(k) for r in pts if r.get(facet) == f}) == 1 for f in facets)
    ]
    series_keys = [k for k in others if k not in dependent]
    named = _set_by_some(series_keys, pts)
    labels = sorted({_label(r, series_keys, named) for r in pts})
    plt = _pyplot()
    styles = series_styles(labels, plt)
    widths = sorted({r[width] for r in pts})
    ncol = len(facets)
    legend_w = 1.8 if len(labels) > 1 else 0.0
    fig, axes = plt.subplots(
        1,
        ncol,
        figsize=(3.4 * ncol + legend_w + 0.6, 3.4),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, f in zip(axes[0], facets):
        sub = [r for r in pts if r.get(facet) == f]
        for lab in labels:
            line = sorted(
                (r for r in sub if _label(r, series_keys, named) == lab), key=lambda r: r[width]
            )
            if line:
                ax.plot(
                    [r[width] for r in line],
                    [r[metric] for r in line],
                    label=lab,
                    **styles[lab],
                )
        extra = ", ".join(f"{k} {sub[0].get(k)}" for k in dependent if k in sub[0]) if sub else ""
        title = f"{facet} {f}" if f is not None else sweep.name
        ax.set_title(title + (f"\n{extra}" if extra else ""), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("model width (d_model)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(metric + (" (best lr)" if sweep.lr_sweep else ""))
    if len(labels) > 1:
        _shared_legend(fig, axes, fontsize=7)
    return _save(plt, fig, out / "accuracy_vs_width.png")


def plot_accuracy_by_run(
    sweep: Sweep, rows: list[dict[str, Any]], cols: list[str], out: Path
) -> Path | None:
    """For a sweep without a width axis (an ablation, a ratio study): one group of horizontal
    bars per run, one bar per cell of its accuracy eval (e.g. ``T128.kv8``), in sweep order."""
    metric = accuracy_metric(sweep, cols)
    if metric is None:
        return None
    cells = [c for c in cols if c.startswith(metric + ".")]
    series = cells or [metric]
    pts = [r for r in rows if any(_number(r.get(c)) is not None for c in series)]
    if sweep.lr_sweep:
        pts = [r for r in pts if r.get("best_lr")]
    if not pts:
        return None
    plt = _pyplot()
    n, k = len(pts), len(series)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.22 * n * max(k, 2)), layout="constrained")
    height = 0.8 / k
    cmap = plt.get_cmap("tab10")
    for j, c in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        vals = [_number(r.get(c)) for r in pts]
        label = c[len(metric) + 1 :] if c != metric else metric
        ax.barh(ys, [v or 0.0 for v in vals], height=height, color=cmap(j % 10), label=label)
        for y, v in zip(ys, vals):
            if v is not None:
                ax.text(v + 0.01, y, f"{100 * v:.1f}%", va="center", fontsize=6)
    ax.set_yticks(range(n), [r["run"] for r in pts], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(metric + (" (best lr)" if sweep.lr_sweep else ""))
    ax.grid(True, axis="x", alpha=0.3)
    if k > 1:
        fig.legend(fontsize=7, frameon=False, loc="outside lower center", ncol=min(k, 4))
    ax.set_title(sweep.name, fontsize=9)
    return _save(plt, fig, out / "accuracy_by_run.png")


def loss_curve_panels(
    sweep: Sweep, rows: list[dict[str, Any]]
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Group runs for the loss figure: panel title -> [(series label, row)], panels in
    (width, length) order. A panel per width and length the rows vary over; in a panel a run
    is named by the settings that vary inside panels (the architecture, say), so one legend
    serves every panel. Runs are named in full where those settings do not tell them apart."""
    keys = [k for k in sweep.setting_keys() if not (sweep.lr_sweep and k == "optim.lr")]

    def varies(k: str) -> bool:
        return len({r.get(k) for r in rows}) > 1

    panel_keys = [k for k in ("model.d_model", "seq_len") if k in keys and varies(k)]
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(tuple(r.get(k) for k in panel_keys), []).append(r)
    series_keys = [  # settings that vary inside a panel (not those tied to its length)
        k
        for k in keys
        if k not in panel_keys and any(len({r.get(k) for r in rs}) > 1 for rs in cells.values())
    ]
    named = _set_by_some(series_keys, rows)

    def label(r: dict[str, Any]) -> str:
        return _label(r, series_keys, named)

    unique = all(len({label(r) for r in rs}) == len(rs) for rs in cells.values())
    by_name = not (panel_keys and series_keys and unique)
    panels = {}
    for cell in sorted(cells, key=lambda c: [(v is None, _number(v) or 0) for v in c]):
        title = " ".join(f"{k} {v}" for k, v in zip(panel_keys, cell))
        panels[title] = [
            ((r["run"] if by_name else label(r)) + _stopped(r), r) for r in cells[cell]
        ]
    return panels


def _stopped(row: dict[str, Any]) -> str:
    """A label suffix for a run not (yet) at its steps: interrupted, failed or still running,
    its ``steps`` setting would otherwise name a length its curve never reached. The step is
    the curve's last (``_last_step``, set by the loss figure) or else the last checkpoint's."""
    last = row.get("_last_step")
    step = _number(last if last is not None else row.get("final_step"))
    steps = _number(row.get("steps"))
    short = row.get("status") in ("interrupted", "failed", "incomplete", "running")
    if not short or step is None or (steps is not None and step >= steps):
        return ""
    return f" (to step {int(step)})"


def plot_loss_curves(
    sweep: Sweep, rows: list[dict[str, Any]], sweep_dir: Path, out: Path
) -> Path | None:
    """Training loss per run, overlaid; panels as ``loss_curve_panels`` groups them."""
    from memzoo.train.metrics import read_metrics

    chosen = [r for r in rows if r.get("best_lr")] if sweep.lr_sweep else rows
    chosen = chosen or rows
    curves = {}
    for r in chosen:
        run_dir = r.get("_dir", sweep_dir / "runs" / r["run"])
        m = [x for x in read_metrics(run_dir) if "loss" in x] if run_dir is not None else []
        if m:
            curves[r["run"]] = ([x["step"] for x in m], [x["loss"] for x in m])
    if not curves:
        return None
    panels = loss_curve_panels(
        sweep, [{**r, "_last_step": curves[r["run"]][0][-1]} for r in chosen if r["run"] in curves]
    )
    labels = list(dict.fromkeys(lab for members in panels.values() for lab, _ in members))
    plt = _pyplot()
    styles = series_styles(labels, plt)
    ncol = min(len(panels), 3)
    nrow = -(-len(panels) // ncol)
    legend = len(labels) <= 40
    side = 2.6 if legend and len(labels) > 8 else 0.0
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=((7.5 if ncol == 1 else 4.2 * ncol) + side, 4.2 if nrow == 1 else 3.4 * nrow),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    lo = min(min(c[1]) for c in curves.values())
    hi = max(max(c[1]) for c in curves.values())
    log_scale = lo > 0 and hi / lo > 10
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, members) in zip(axes.flat, panels.items()):
        for lab, row in members:
            steps, losses = curves[row["run"]]
            ax.plot(steps, losses, label=lab, linewidth=1.2, **dict(styles[lab], marker=None))
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss")
    fig.suptitle(f"{sweep.name}: training loss" + (" (best lr per cell)" if sweep.lr_sweep else ""))
    if legend:
        if len(labels) > 8 or len(panels) > 1:
            _shared_legend(fig, axes, fontsize=6 if len(labels) > 8 else 8)
        else:
            axes[0][0].legend(fontsize=8)
    return _save(plt, fig, out / "loss_curves.png")


def _niah_matrix(record: dict[str, Any]) -> tuple[list[list[float]], list[Any], list[Any]]:
    cells = record.get("cells") or []
    depths = sorted(
        {c["depth"] for c in cells}, key=lambda d: (isinstance(d, str), str(d).zfill(8))
    )
    lengths = sorted({int(c["length"]) for c in cells})
    val = {(c["depth"], int(c["length"])): c.get("string_match") for c in cells}
    m = [[val.get((d, n), float("nan")) for n in lengths] for d in depths]
    return m, depths, lengths


def niah_panels(
    sweep: Sweep, rows: list[dict[str, Any]], sweep_dir: Path
) -> list[tuple[str, list[list[float]], list[Any], list[Any]]]:
    """(title, string_match[depth][length], depths, lengths) per run and NIAH eval. A title
    names the run and the checkpoint step the eval read, which need not be the run's last
    (an eval kept from before the run was extended, say)."""
    niah = [ev for ev in sweep.evals if ev.task == "niah"]
    chosen = [r for r in rows if r.get("best_lr")] if sweep.lr_sweep else rows
    panels = []
    for r in chosen or rows:
        run_dir = r.get("_dir", sweep_dir / "runs" / r["run"])
        for ev in niah:
            path = run_dir / "evals" / ev.name / "results.json" if run_dir is not None else None
            if path is not None and path.is_file():
                rec = json.loads(path.read_text())
                title = r["run"] if len(niah) == 1 else f"{r['run']} ({ev.name})"
                if rec.get("step") is not None:
                    title += f"\nat step {rec['step']}"
                panels.append((title, *_niah_matrix(rec)))
    return panels


def plot_niah_grid(
    sweep: Sweep, rows: list[dict[str, Any]], sweep_dir: Path, out: Path
) -> Path | None:
    panels = niah_panels(sweep, rows, sweep_dir)
    if not panels:
        return None
    panels = panels[:MAX_PANELS]
    import numpy as np

    plt = _pyplot()
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol + 0.8, 2.7 * nrow), squeeze=False)
    im = None
    for ax, (title, m, depths, lengths) in zip(axes.flat, panels):
        arr = np.asarray(m, np.float64)
        im = ax.imshow(arr, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        labels = [f"{d}%" if not isinstance(d, str) else d for d in depths]
        ax.set_yticks(range(len(depths)), labels, fontsize=7)
        ax.set_title(title, fontsize=8)
        if arr.size <= 48:
            for i in range(arr.shape[0]):
                for j in range(arr.shape[1]):
                    if np.isfinite(arr[i, j]):
                        ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("context length", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth", fontsize=8)
    fig.suptitle(f"{sweep.name}: NIAH string_match", fontsize=10)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    return _save(plt, fig, out / "niah_heatmaps.png", tight=False)


def _save(plt, fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.savefig(path, dpi=100)
    else:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown


def _fmt(v: Any, col: str = "") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, int) and col in ("params", "tokens_seen"):
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.3g}{unit}"
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if col.endswith(("accuracy", "match")):
            return f"{100 * v:.1f}%"
        if col in ("train_wall_s",):
            return f"{v:.1f}"
        if col == "tokens_per_sec":
            return f"{v:,.0f}"
        if col == "optim.lr":
            from memzoo.sweep.spec import format_number

            return format_number(v)
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _eval_label(ev) -> str:
    over = " ".join(ev.overrides)
    name = ev.name if ev.name == ev.task else f"{ev.name} ({ev.task})"
    return f"{name} `{over}`" if over else name


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def markdown(
    sweep: Sweep,
    rows: list[dict[str, Any]],
    cols: list[str],
    plots: list[Path],
    sweep_dir: Path,
    merge: list[str | Path] | tuple = (),
) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    shown = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    out = [f"# Sweep `{sweep.name}`", ""]
    if sweep.description:
        out += [sweep.description, ""]
    src = sweep.raw.get("base") if sweep.raw else None
    if src:
        from memzoo.sweep.runner import _display_path

        src = _display_path(Path(src))
    out += [
        f"{len(rows)} runs ({shown}); base config `{src or 'configs/base.yaml'}`; "
        f"overrides for every run: `{' '.join(sweep.overrides) or '-'}`; evals: "
        f"{', '.join(_eval_label(e) for e in sweep.evals) or 'none'}.",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `memzoo report {sweep_dir}"
        f"{''.join(f' --merge {m}' for m in merge)}`; every "
        "metric of every run (per eval cell too) is in [results.csv](results.csv).",
        "",
    ]
    merged: dict[str, int] = {}
    for r in rows:
        if r.get("source"):
            merged[r["source"]] = merged.get(r["source"], 0) + 1
    if merged:
        out += [
            "Merged rows (column `source`): "
            + ", ".join(f"{n} from `{s}`" for s, n in merged.items())
            + ". Runs whose row comes from a csv have no run directory here, so they have no "
            "loss curve or NIAH heatmap below.",
            "",
        ]
    if sweep.lr_sweep:
        out += [
            f"Learning rates {', '.join(_fmt(x, 'optim.lr') for x in sweep.lr_sweep)} per cell; "
            f"the best by `{sweep.select.metric}` ({sweep.select.mode}) is marked **bold** ★.",
            "",
        ]
    evals = {e.name for e in sweep.evals}
    means = [c for c in cols if c.count(".") == 1 and c.split(".")[0] in evals]
    settings = sweep.setting_keys()
    header_cols = [
        *settings,
        "status",
        "params",
        "tokens_seen",
        "final_loss",
        "heldout_loss",
        "heldout_bpb",
        *means,
        "train_wall_s",
        "tokens_per_sec",
    ]
    names = {
        "tokens_seen": "tokens",
        "final_loss": "final loss",
        "heldout_loss": "heldout loss",
        "heldout_bpb": "heldout bpb",
        "train_wall_s": "wall (s)",
        "tokens_per_sec": "tok/s",
    }
    body = []
    started = [r for r in rows if r["status"] != "pending"]
    for r in started:
        name = r["run"]
        if r.get("best_lr"):
            name = f"**{name}** ★"
        body.append([name, *(_fmt(r.get(c), c) for c in header_cols)])
    out += ["## Results", ""]
    out += _table(["run", *(names.get(c, c) for c in header_cols)], body)
    out.append("")
    if len(started) < len(rows):
        out += [f"{len(rows) - len(started)} runs not started yet are not shown.", ""]
    if sweep.lr_sweep:
        cells: dict[str, list[dict]] = {}
        for r in rows:
            cells.setdefault(r["cell"], []).append(r)
        m = sweep.select.metric
        body = []
        for cell, group in cells.items():
            best = next((r for r in group if r.get("best_lr")), None)
            tried = ", ".join(
                f"{_fmt(r.get('optim.lr'), 'optim.lr')}: {_fmt(r.get(m), m)}" for r in group
            )
            body.append(
                [
                    cell,
                    _fmt(best.get("optim.lr"), "optim.lr") if best else "-",
                    _fmt(best.get(m), m) if best else "-",
                    tried,
                ]
            )
        out += ["## Best learning rate per cell", ""]
        out += _table(["cell", "best lr", m, "all lrs"], body)
        out.append("")
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            rel = p.relative_to(sweep_dir).as_posix()
            out += [f"### {PLOT_TITLES.get(p.name, p.stem)}", "", f"![{p.stem}]({rel})", ""]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        out += ["## Failed runs", ""]
        out += [f"- `{r['run']}`: {r.get('error') or 'see status.json'}" for r in failed]
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry point


def write_csv(rows: list[dict[str, Any]], cols: list[str], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return path


RUN_RECORDS = ("config.yaml", "metrics.jsonl", "evals/*/results.json")
STATUS_KEYS = ("status", "params", "final_step", "train_wall_s", "error")  # what _run_row reads


def publish(
    sweep: Sweep, sweep_dir: Path, rows: list[dict[str, Any]], plots: list[Path], dest: Path
) -> Path:
    """Copy a built report to ``dest`` (e.g. ``experiments/results/sweeps/<name>``) with what
    rebuilds it: report.md, results.csv, plots/, sweep.yaml, and, for every run with a run
    directory, its records (``RUN_RECORDS``; no checkpoints) and its status.json entry.
    Records already in ``dest`` stay, so ``--merge dest`` later brings back every run's row,
    loss curve and heatmaps."""
    import shutil

    from memzoo.sweep.runner import SWEEP_FILE, _display_path, _write_atomic, read_status
    from memzoo.sweep.spec import resolved_dict

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.csv"):
        shutil.copyfile(sweep_dir / name, dest / name)
    spec = resolved_dict(sweep)
    if spec.get("base"):  # the repo-relative path, not this machine's
        spec["base"] = _display_path(Path(spec["base"]))
    _write_atomic(dest / SWEEP_FILE, yaml.safe_dump(spec, sort_keys=False))
    (dest / PLOTS_DIR).mkdir(exist_ok=True)
    for name in PLOT_TITLES:
        (dest / PLOTS_DIR / name).unlink(missing_ok=True)
    for p in plots:
        shutil.copyfile(p, dest / PLOTS_DIR / p.name)
    status = read_status(dest)
    for r in rows:
        src = r.get("_dir")
        if src is None or r["status"] in ("pending", "running") or not src.is_dir():
            continue
        if status["runs"].get(r["run"], {}).get("status") == "finished" != r["status"]:
            continue  # never replace a published finished run by a worse copy
        target = dest / "runs" / r["run"]
        if src.resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            for pattern in RUN_RECORDS:
                for f in src.glob(pattern):
                    out = target / f.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, out)
        status["runs"][r["run"]] = {k: r[k] for k in STATUS_KEYS if r.get(k) is not None}
    if status["runs"]:
        status["sweep"] = sweep_dir.name
        status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_atomic(dest / "status.json", json.dumps(status, indent=1, sort_keys=True) + "\n")
    return dest


def build_report(
    path: str | Path,
    root: str | Path = "sweeps",
    merge: list[str | Path] | tuple = (),
    publish_to: str | Path | None = None,
) -> dict[str, Any]:
    """(Re)build results.csv, report.md and the plots of a sweep directory (or sweep file).

    ``merge``: rows for runs not finished here from other copies of the sweep (``collect``).
    ``publish_to``: then copy the report and the run records there (``publish``).
    """
    sweep, sweep_dir = load_sweep_dir(path, root)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    merge = list(merge)
    if publish_to is not None and Path(publish_to).resolve() == sweep_dir.resolve():
        raise SweepError(f"--publish {publish_to} is the sweep directory itself")
    for m in merge:  # its own results.csv: rows would outlive the runs they came from
        if Path(m).resolve() == (sweep_dir / "results.csv").resolve():
            raise SweepError(
                f"--merge {m} is the results.csv this report rewrites; copy it elsewhere first"
            )
    rows, cols = collect(sweep, sweep_dir, merge)
    csv_path = write_csv(rows, cols, sweep_dir / "results.csv")
    out = sweep_dir / PLOTS_DIR
    plots = [
        p
        for p in (
            plot_accuracy_vs_width(sweep, rows, cols, out)
            or plot_accuracy_by_run(sweep, rows, cols, out),
            plot_loss_curves(sweep, rows, sweep_dir, out),
            plot_niah_grid(sweep, rows, sweep_dir, out),
        )
        if p is not None
    ]
    for name in set(PLOT_TITLES) - {p.name for p in plots}:  # a figure this build no longer draws
        (out / name).unlink(missing_ok=True)  # (e.g. per-run bars once a second width ran)
    md = sweep_dir / "report.md"
    md.write_text(markdown(sweep, rows, cols, plots, sweep_dir, merge).rstrip("\n") + "\n")
    built = {"report": md, "csv": csv_path, "plots": plots, "rows": rows, "columns": cols}
    if publish_to is not None:
        built["published"] = publish(sweep, sweep_dir, rows, plots, Path(publish_to))
    return built
