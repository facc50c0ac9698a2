"""Run a sweep: every run an ordinary run directory under ``sweeps/<name>/runs/<run>/``.

Runs go one after another in this process (or ``max_parallel`` at a time, each in a worker
process running this same code for one run). A run whose final checkpoint has reached
``steps`` is skipped; an interrupted one is resumed (``train`` resumes from its checkpoint);
one that fails (an exception, or a worker's non-zero exit) is recorded in
``sweeps/<name>/status.json`` with its error and the sweep goes on. After a run has trained,
the sweep's evals run on its final checkpoint (skipped when ``RUN_DIR/evals/<name>/results.json``
is already there for that step and those settings). Then the report is rebuilt.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from memzoo.sweep.spec import (
    CONFIG_ROOT,
    PRIMARY_METRICS,
    EvalSpec,
    Run,
    Sweep,
    SweepError,
    expand,
    resolved_dict,
)

STATUS_FILE = "status.json"
SWEEP_FILE = "sweep.yaml"


# ----------------------------------------------------------------------------- status.json


def read_status(sweep_dir: str | Path) -> dict[str, Any]:
    """``sweeps/<name>/status.json``: {"sweep", "updated", "runs": {run: record}}."""
    path = Path(sweep_dir) / STATUS_FILE
    if not path.is_file():
        return {"runs": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"runs": {}}
    data.setdefault("runs", {})
    return data


@contextlib.contextmanager
def _locked(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / (STATUS_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # worker processes update the same file
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def update_status(sweep_dir: str | Path, run: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the run's record (read-modify-write under a file lock)."""
    sweep_dir = Path(sweep_dir)
    with _locked(sweep_dir):
        data = read_status(sweep_dir)
        rec = data["runs"].setdefault(run, {})
        rec.update(fields)
        rec["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        data["sweep"] = sweep_dir.name
        data["updated"] = rec["updated"]
        _write_atomic(sweep_dir / STATUS_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return rec


# ----------------------------------------------------------------------------- checks


def latest_checkpoint(run_dir: str | Path) -> int | None:
    """The highest committed checkpoint step of a run directory (orbax writes in-progress
    saves under temporary names, so a plain step-number directory is complete)."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = [int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and d.is_dir()]
    return max(steps) if steps else None


def is_finished(run_dir: str | Path, steps: int) -> bool:
    last = latest_checkpoint(run_dir)
    return last is not None and last >= steps


# Keys that may change between invocations of a run without changing what it computes
# (``steps`` may be raised to extend a finished run: under a decaying schedule train warns
# that this is not a fresh longer run); the report shows a run's own value.
DRIFT_IGNORED = (
    "train.",
    "sample.",
    "mesh.",
    "distributed.",
    "steps",
    "output_dir",
    "run_name",
    "model.impl",
    "model.kernel_",
    "model.remat",
)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(run_dir: str | Path, cfg: Any) -> list[str]:
    """Keys whose value in an existing run directory's config.yaml differs from ``cfg``
    (a sweep edited after its runs trained: skipping or resuming them would mix configs)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    from memzoo.config import Config

    # keys added to the config since the run was saved count as their defaults
    saved = {
        **flat_config(Config().to_dict()),
        **flat_config(yaml.safe_load(path.read_text()) or {}),
    }
    want = flat_config(cfg.to_dict())
    if not want.get("model.vocab_size"):
        want["model.vocab_size"] = saved.get("model.vocab_size")  # filled in by train
    return [
        k
        for k in sorted(set(saved) | set(want))
        if not k.startswith(DRIFT_IGNORED) and saved.get(k) != want.get(k)
    ]


def _expected_settings(ev: EvalSpec, overrides: list[str]) -> dict[str, Any]:
    from memzoo.evals.runner import load_task, parse_settings

    task = load_task(ev.task)
    return json.loads(json.dumps(dataclasses.asdict(parse_settings(task, overrides))))


def eval_up_to_date(run_dir: Path, ev: EvalSpec, overrides: list[str], step: int | None) -> bool:
    """Whether ``RUN_DIR/evals/<name>/results.json`` holds this eval at this step."""
    path = run_dir / "evals" / ev.name / "results.json"
    if not path.is_file():
        return False
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return res.get("step") == step and res.get("settings") == _expected_settings(ev, overrides)


# ----------------------------------------------------------------------------- one run

# Indirections so that tests can replace training or evaluation.


def train_run(cfg: Any) -> dict[str, Any]:
    from memzoo.train.loop import train

    return train(cfg)


def eval_run(task: str, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    from memzoo.evals.runner import run_eval

    return run_eval(task, run_dir, overrides, progress=False)


class SweepInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM (its checkpoint is saved): the sweep stops too."""


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _run_evals(sweep: Sweep, run: Run, run_dir: Path, step: int | None, say) -> list[str]:
    """Runs the sweep's evals on the run (skipping up-to-date ones); returns short summaries."""
    from memzoo.sweep.report import flatten_eval

    notes = []
    for ev in sweep.evals:
        if not ev.applies(run.cfg):
            continue
        overrides = ev.resolved_overrides(run.cfg)
        if eval_up_to_date(run_dir, ev, overrides, step):
            notes.append(f"{ev.name} up to date")
            continue
        t0 = time.perf_counter()
        evals_dir = run_dir / "evals"
        aside = evals_dir / f".{ev.task}.sweep-aside"
        own = evals_dir / ev.task
        moved = False
        if ev.name != ev.task and own.exists():  # keep another eval's results of this task
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(own, aside)
            moved = True
        try:
            res = eval_run(ev.task, run_dir, overrides)
            if ev.name != ev.task:
                target = evals_dir / ev.name
                shutil.rmtree(target, ignore_errors=True)
                os.replace(own, target)
        finally:
            if moved:
                shutil.rmtree(own, ignore_errors=True)
                os.replace(aside, own)
        metric = PRIMARY_METRICS.get(ev.task, ("", ""))[0]
        value = flatten_eval(ev.name, ev.task, res).get(f"{ev.name}.{metric}")
        shown = f" {metric} {value:.4g}" if isinstance(value, (int, float)) else ""
        notes.append(f"{ev.name}{shown} ({time.perf_counter() - t0:.1f} s)")
    return notes


def _wall(t_train: float | None, before: float) -> dict:
    """``train_wall_s`` of a run whose training raised: earlier sessions' time plus this one's
    (empty when the failure came after training, whose time is already recorded)."""
    if t_train is None:
        return {}
    return {"train_wall_s": round(before + time.perf_counter() - t_train, 3)}


def run_one(
    sweep: Sweep, run: Run, root: str | Path = "sweeps", say: Callable[[str], None] = print
) -> str:
    """Train (or skip / resume) one run, then its evals; returns trained | skipped | failed.

    Raises :class:`SweepInterrupted` when the run was stopped by a signal."""
    sweep_dir = sweep.sweep_dir(root)
    cfg = run.cfg
    if cfg is None:
        raise SweepError(f"run {run.name} was not validated (expand(..., validate=True))")
    run_dir = Path(cfg.run_dir)
    prev = read_status(sweep_dir)["runs"].get(run.name, {})
    outcome = "skipped"
    stage = "train"
    rec: dict[str, Any] = {}  # what training recorded; kept when an eval then fails
    t_train, before = None, 0.0  # set while training, for the wall time of a run that fails
    try:
        drift = config_drift(run_dir, cfg)
        if drift:
            shown = ", ".join(drift[:5]) + (f" and {len(drift) - 5} more" if len(drift) > 5 else "")
            raise SweepError(
                f"{run_dir} already holds this run with a different config (differs in: "
                f"{shown}); the sweep file changed after it trained: remove that run "
                "directory, or give the sweep another name"
            )
        if is_finished(run_dir, cfg.steps):
            step = latest_checkpoint(run_dir)
            say(f"skipped training (finished at step {step})")
        else:
            last = latest_checkpoint(run_dir)
            start = 0 if last is None else last
            verb = "resuming" if last else "training"
            say(f"{verb} (step {start} -> {cfg.steps})")
            update_status(sweep_dir, run.name, status="running", error=None, traceback=None)
            before = float(prev.get("train_wall_s") or 0.0) if last else 0.0
            t_train = time.perf_counter()
            summary = train_run(copy.deepcopy(cfg))
            wall = time.perf_counter() - t_train
            t_train = None
            rec = {
                "train_wall_s": round(before + wall, 3),
                "start_step": int(summary.get("start_step", start)),
                "final_step": int(summary.get("final_step", cfg.steps)),
                "params": summary.get("params"),
            }
            if summary.get("interrupted"):
                update_status(sweep_dir, run.name, status="interrupted", **rec)
                raise SweepInterrupted(
                    f"run {run.name} stopped by {summary['interrupted']} at step "
                    f"{rec['final_step']}; rerun the sweep to resume"
                )
            losses = summary.get("losses") or []
            shown = f", loss {losses[-1]:.4f}" if losses else ""
            if "heldout_loss" in summary:
                shown += f", heldout_loss {summary['heldout_loss']:.4f}"
            say(f"trained in {wall:.1f} s{shown}")
            outcome = "trained"
            step = latest_checkpoint(run_dir)
        stage = "eval"
        t0 = time.perf_counter()
        notes = _run_evals(sweep, run, run_dir, step, say)
        if notes:
            say("evals: " + "; ".join(notes))
        eval_wall = time.perf_counter() - t0
        update_status(
            sweep_dir,
            run.name,
            status="finished",
            error=None,
            traceback=None,
            stage=None,
            eval_wall_s=round(eval_wall, 3),
            outcome=outcome,
            **rec,
        )
        return outcome
    except SweepInterrupted:
        raise
    except KeyboardInterrupt:
        update_status(
            sweep_dir,
            run.name,
            status="interrupted",
            stage=stage,
            **{**rec, **_wall(t_train, before)},
        )
        raise
    except Exception as e:
        err = _one_line(e)
        update_status(
            sweep_dir,
            run.name,
            status="failed",
            stage=stage,
            error=err,
            traceback=traceback.format_exc()[-4000:],
            **{**rec, **_wall(t_train, before)},
        )
        say(f"FAILED ({stage}): {err}")
        return "failed"


# ----------------------------------------------------------------------------- the sweep


def write_sweep_copy(sweep: Sweep, root: str | Path) -> Path:
    """``sweeps/<name>/sweep.yaml``: the sweep with an absolute base (read by the report and
    by worker processes)."""
    sweep_dir = sweep.sweep_dir(root)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SWEEP_FILE
    _write_atomic(path, yaml.safe_dump(resolved_dict(sweep), sort_keys=False))
    return path


def select_runs(runs: list[Run], only: list[str] | None) -> list[Run]:
    if not only:
        return runs
    names = {r.name for r in runs}
    wanted = [n for item in only for n in item.split(",") if n]
    bad = [n for n in wanted if n not in names]
    if bad:
        raise SweepError(
            f"--only: no run named '{bad[0]}' in this sweep (see --dry-run without --only)"
        )
    return [r for r in runs if r.name in wanted]


def run_sweep(
    sweep: Sweep,
    root: str | Path = "sweeps",
    *,
    only: list[str] | None = None,
    max_parallel: int = 1,
    report: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (selected) run of the sweep; returns {"counts": {...}, "failed": [...]}."""
    runs = select_runs(expand(sweep, root), only)
    sweep_dir = sweep.sweep_dir(root)
    copy_path = write_sweep_copy(sweep, root)
    n = len(runs)
    say(f"sweep {sweep.name}: {n} runs -> {sweep.runs_dir(root)}")
    counts = {"trained": 0, "skipped": 0, "failed": 0}
    t0 = time.perf_counter()
    try:
        if max_parallel > 1 and n > 1:
            outcomes = _run_parallel(sweep, runs, root, copy_path, max_parallel, say)
        else:
            outcomes = {}
            for i, run in enumerate(runs, 1):
                prefix = f"[{i}/{n}] {run.name}: "
                outcomes[run.name] = run_one(sweep, run, root, lambda m, p=prefix: say(p + m))
    finally:
        if report:
            try:
                from memzoo.sweep.report import build_report

                out = build_report(sweep_dir)
                say(f"report: {out['report']}")
            except Exception as e:  # the report never hides the runs' own outcome
                say(f"report failed: {_one_line(e)}")
    for o in outcomes.values():
        counts[o] = counts.get(o, 0) + 1
    failed = [r for r, o in outcomes.items() if o == "failed"]
    say(
        f"sweep {sweep.name}: {n} runs: {counts['trained']} trained, {counts['skipped']} "
        f"already finished, {counts['failed']} failed ({time.perf_counter() - t0:.1f} s); "
        f"status: {sweep_dir / STATUS_FILE}"
    )
    for name in failed:
        rec = read_status(sweep_dir)["runs"].get(name, {})
        say(f"  failed: {name}: {rec.get('error')}")
    return {"counts": counts, "failed": failed, "outcomes": outcomes}


def _worker_command(copy_path: Path, root: str | Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "memzoo.sweep.cli",
        "sweep",
        str(copy_path),
        "--root",
        str(root),
        "--only",
        name,
        "--no-report",
    ]


def _run_parallel(
    sweep: Sweep, runs: list[Run], root, copy_path: Path, max_parallel: int, say
) -> dict[str, str]:
    """Up to ``max_parallel`` worker processes, one run each (output in RUN_DIR/sweep.log)."""
    sweep_dir = sweep.sweep_dir(root)
    n = len(runs)
    pending = list(enumerate(runs, 1))
    active: dict[str, tuple[subprocess.Popen, Any, int]] = {}
    outcomes: dict[str, str] = {}
    try:
        while pending or active:
            while pending and len(active) < max_parallel:
                i, run = pending.pop(0)
                run_dir = Path(run.cfg.run_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "sweep.log", "a")  # noqa: SIM115 (closed below)
                proc = subprocess.Popen(
                    _worker_command(copy_path, root, run.name),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                active[run.name] = (proc, log, i)
                say(f"[{i}/{n}] {run.name}: started (pid {proc.pid}, log {run_dir / 'sweep.log'})")
            time.sleep(0.5)
            for name, (proc, log, i) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del active[name]
                rec = read_status(sweep_dir)["runs"].get(name, {})
                status = rec.get("status")
                if rc != 0 and status != "failed":
                    err = f"worker exited with code {rc}; see {log.name}"
                    update_status(sweep_dir, name, status="failed", error=err)
                    status = "failed"
                outcome = "failed" if status == "failed" else rec.get("outcome", "trained")
                outcomes[name] = outcome
                shown = rec.get("error") if outcome == "failed" else status
                say(f"[{i}/{n}] {name}: {outcome} ({shown})")
    except KeyboardInterrupt:
        for proc, _log, _ in active.values():
            proc.terminate()  # SIGTERM: train saves a checkpoint and exits
        for proc, log, _ in active.values():
            proc.wait()
            log.close()
        raise
    return outcomes


# ----------------------------------------------------------------------------- commands


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def commands(
    sweep: Sweep,
    root: str | Path = "sweeps",
    prog: str = "memzoo",
    only: list[str] | None = None,
) -> list[str]:
    """One shell line per run (or per run named in ``only``): ``memzoo train ...`` then its
    ``memzoo eval ...`` commands."""
    runs = select_runs(expand(sweep, root), only)
    base = _display_path(sweep.base or CONFIG_ROOT / "base.yaml")
    lines = []
    for run in runs:
        run_dir = str(run.cfg.run_dir)
        parts = [shlex.join([prog, "train", base, *run.train_overrides(sweep.runs_dir(root))])]
        for ev in sweep.evals:
            if not ev.applies(run.cfg):
                continue
            parts.append(
                shlex.join([prog, "eval", ev.task, run_dir, *ev.resolved_overrides(run.cfg)])
            )
            if ev.name != ev.task:
                src, dst = f"{run_dir}/evals/{ev.task}", f"{run_dir}/evals/{ev.name}"
                parts.append(shlex.join(["rm", "-rf", dst]))
                parts.append(shlex.join(["mv", src, dst]))
        lines.append(" && ".join(parts))
    return lines


def dry_run_lines(
    sweep: Sweep, root: str | Path = "sweeps", only: list[str] | None = None
) -> list[str]:
    """The expanded runs (those named in ``only``, numbered as in the whole sweep), their
    status, the shared overrides and evals; every run's config is validated."""
    runs = expand(sweep, root)
    n = len(runs)
    width = len(str(n))
    picked = {r.name for r in select_runs(runs, only)}
    count = f"{len(picked)} of {n} runs" if only else f"{n} runs"
    lines = [
        f"sweep {sweep.name}: {count} -> {sweep.runs_dir(root)}"
        + (f" (base {_display_path(sweep.base)})" if sweep.base else "")
    ]
    for i, run in enumerate(runs, 1):
        if run.name not in picked:
            continue
        settings = " ".join(f"{k}={v}" for k, v in run.settings.items())
        status = " [finished]" if is_finished(run.cfg.run_dir, run.cfg.steps) else ""
        lines.append(f"[{i:>{width}}/{n}] {run.name}{status}  {settings}")
    if sweep.overrides:
        lines.append("every run: " + " ".join(sweep.overrides))
    for ev in sweep.evals:
        when = f" when {ev.when}" if ev.when else ""
        lines.append(f"eval {ev.name}: {ev.task} {' '.join(ev.overrides)}{when}".rstrip())
    if sweep.lr_sweep:
        lines.append(f"best lr per cell by {sweep.select.metric} ({sweep.select.mode})")
    lines.append(f"all {n} run configs validated")
    return lines
