"""Sweep files: parse ``SWEEP.yaml``, validate it, and expand it into named runs.

A sweep file (``configs/sweeps/*.yaml``)::

    name: mqar_zoo                      # sweeps/<name>/ (default: the file's stem)
    description: free text for the report
    base: configs/train/mqar_tiny.yaml  # run config: relative to this file, the repo, or cwd
    overrides: [steps=1000, model.n_layers=2]   # key=value, applied to every run
    grid:                               # the cartesian product of its axes, in order
      model: [transformer, gla]         # a config key with scalar values, or
      model.d_model: [64, 128]
      length:                           # a label whose values are mappings (set together)
        - {seq_len: 64, data.mqar_num_pairs: 4}
        - {seq_len: 128, data.mqar_num_pairs: 8, _name: long}   # _name: the name part
    runs:                               # explicit runs (mappings); with grid: runs x grid
      - {model: titans_lmm, model.gm_algorithm: gd}
    lr_sweep: [1e-3, 3e-3]              # best-of-N learning rates per cell (Zoology)
    select: {metric: mqar.accuracy, mode: max}  # how the best lr is picked
    evals:                              # run on each finished run's final checkpoint
      - task: mqar                      # mqar | niah | ppl
        overrides: ["seq_lens={seq_len}", "num_pairs={data.mqar_num_pairs}"]
        name: mqar                      # results in RUN_DIR/evals/<name>/ (default: task)
        when: {data.source: mqar}       # only runs whose resolved config matches

Eval overrides may name the run's resolved config in braces (``{seq_len}``,
``{data.mqar_num_pairs}``). Run names are built from the run's own settings (not the global
overrides): ``model=gla, model.d_model=128, seq_len=256`` -> ``gla_d128_T256``; with
``lr_sweep`` each cell gets a suffix ``_lr3e-3``. Names are deterministic, filesystem-safe and
unique. Every run's config is validated by ``load_config`` at expansion, so ``--dry-run``
catches a bad override before anything trains.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memzoo.config import CONFIG_ROOT, Config, ConfigError, load_config, parse_override

REPO_ROOT = CONFIG_ROOT.parent

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "grid",
    "runs",
    "lr_sweep",
    "select",
    "evals",
)
EVAL_KEYS = ("task", "overrides", "name", "when")
# The keys the sweep sets itself for every run.
RESERVED_KEYS = ("run_name", "output_dir")
# task -> (headline metric, better direction); the metric is a mean over the task's cells.
PRIMARY_METRICS = {
    "mqar": ("accuracy", "max"),
    "niah": ("string_match", "max"),
    "ppl": ("bpb", "min"),
}
RUN_METRICS = ("heldout_loss", "heldout_bpb", "final_loss")

# Short forms of common keys in run names (key -> prefix; "" = the value alone).
ABBREV = {
    "model": "",
    "model.memory": "",
    "model.titans_memory": "",
    "model.d_model": "d",
    "model.n_layers": "L",
    "model.num_heads": "H",
    "model.attn_heads": "AH",
    "model.pattern": "p",
    "model.chunk_size": "C",
    "model.expand_v": "ev",
    "seq_len": "T",
    "batch_size": "B",
    "steps": "S",
    "seed": "seed",
    "optim.lr": "lr",
    "optim.warmup_steps": "wu",
    "data.mqar_num_pairs": "kv",
    "data.mqar_vocab_size": "V",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
MAX_NAME = 120


class SweepError(ConfigError):
    """A problem in a sweep file, reported as one line (a ConfigError, so ``memzoo`` prints it
    without a traceback)."""


@dataclass
class EvalSpec:
    task: str
    overrides: list[str] = field(default_factory=list)
    name: str = ""
    when: dict[str, list[Any]] = field(default_factory=dict)

    def applies(self, cfg: Config) -> bool:
        """Whether this eval runs on a run with resolved config ``cfg`` (its ``when``)."""
        for key, wanted in self.when.items():
            have = config_value(cfg, key)
            if not any(_same(have, w) for w in wanted):
                return False
        return True

    def resolved_overrides(self, cfg: Config) -> list[str]:
        """The overrides with ``{key}`` placeholders filled from the run's config."""
        ns = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        out = []
        for item in self.overrides:
            try:
                out.append(string.Formatter().vformat(item, (), ns))
            except (KeyError, AttributeError, IndexError, ValueError) as e:
                raise SweepError(
                    f"eval {self.name}: override {item!r} names {e} which is not a config key"
                ) from None
        return out


@dataclass
class Select:
    metric: str = "heldout_loss"
    mode: str = "min"


@dataclass
class Sweep:
    name: str
    base: Path | None = None
    overrides: list[str] = field(default_factory=list)
    axes: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    lr_sweep: list[float] = field(default_factory=list)
    select: Select = field(default_factory=Select)
    evals: list[EvalSpec] = field(default_factory=list)
    description: str = ""
    path: Path | None = None  # the sweep file, when read from one
    raw: dict[str, Any] = field(default_factory=dict)

    def sweep_dir(self, root: str | Path = "sweeps") -> Path:
        return Path(root) / self.name

    def runs_dir(self, root: str | Path = "sweeps") -> Path:
        return self.sweep_dir(root) / "runs"

    def setting_keys(self) -> list[str]:
        """The columns that describe a run: every key any axis sets (first-seen order)."""
        keys: list[str] = []
        for axis, values in self.axes:
            for v in values:
                if "_name" in v and axis not in v and axis not in keys:
                    keys.append(axis)
                for k in v:
                    if k != "_name" and k not in keys:
                        keys.append(k)
        if self.lr_sweep and "optim.lr" not in keys:
            keys.append("optim.lr")
        return keys


@dataclass
class Run:
    """One expanded run: its name, its own settings and the overrides that make its config."""

    name: str
    cell: str  # the name without the lr suffix: the best-of-N group
    index: int
    settings: dict[str, Any]  # the run's own settings (setting_keys columns), in order
    overrides: list[str]  # the sweep's overrides then the run's settings (no run_name/output_dir)
    lr: float | None = None
    cfg: Config | None = None  # the validated config (output_dir/run_name set), when validated

    def train_overrides(self, runs_dir: str | Path) -> list[str]:
        return [*self.overrides, f"output_dir={runs_dir}", f"run_name={self.name}"]


# ----------------------------------------------------------------------------- helpers


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def config_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key in a resolved config."""
    target: Any = cfg
    for part in key.split("."):
        if not hasattr(target, part):
            raise SweepError(f"'{key}' is not a config key")
        target = getattr(target, part)
    return target


def format_number(v: float | int) -> str:
    """Short, exact-enough text for a number in a run name: 0.003 -> 3e-3, 128 -> 128."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if v == 0:
        return "0"
    if v.is_integer() and abs(v) < 1e6:
        return str(int(v))
    if abs(v) < 0.1 or abs(v) >= 1e6:
        mant, _, exp = f"{v:.3e}".partition("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{v:.4g}"


def _rle(pattern: str) -> str:
    """MMMA -> 3M1A; M -> M (a layer pattern in a run name)."""
    runs = [(m.group(0)[0], len(m.group(0))) for m in re.finditer(r"(.)\1*", pattern)]
    if len(runs) == 1 and runs[0][1] == 1:
        return pattern
    return "".join(f"{n}{ch}" for ch, n in runs)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip(".-") or "x"


def _value_slug(key: str, value: Any) -> str:
    if isinstance(value, (bool, int, float)):
        return format_number(value)
    if value is None:
        return "none"
    text = str(value)
    if key == "model.pattern" and text and set(text) <= {"M", "A"}:
        return _rle(text)
    if key == "model.pattern":
        text = "+".join(p.strip() for p in text.split(","))
    return _safe(text.replace(":", "-"))


def setting_slug(key: str, value: Any) -> str:
    """One name part: ``model.d_model=128`` -> ``d128``, ``model=gla`` -> ``gla``."""
    prefix = ABBREV.get(key)
    val = _value_slug(key, value)
    if prefix is None:
        leaf = key.rsplit(".", 1)[-1]
        leaf = leaf[3:] if leaf.startswith("gm_") else leaf
        return f"{_safe(leaf)}-{val}"
    return f"{prefix}{val}"


def override_text(key: str, value: Any) -> str:
    """``key=value`` whose value reads back (via ``parse_override``) as ``value``."""
    if isinstance(value, bool):
        raw = "true" if value else "false"
    elif value is None:
        raw = "null"
    elif isinstance(value, (int, float)):
        raw = repr(value)
    else:
        raw = str(value)
        if parse_override(f"{key}={raw}")[1] != value:
            raw = json.dumps(raw)
    return f"{key}={raw}"


def _short_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


# ----------------------------------------------------------------------------- parsing


def _err(where: str, msg: str) -> SweepError:
    return SweepError(f"sweep {where}: {msg}")


def _resolve_base(base: str, sweep_path: Path | None, where: str) -> Path:
    p = Path(base).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [sweep_path.parent / p] if sweep_path is not None else []
        candidates += [REPO_ROOT / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise _err(where, f"base config '{base}' not found (tried {tried})")


def _check_setting_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise _err(where, f"setting key {key!r} must be a non-empty string")
    if key in RESERVED_KEYS:
        raise _err(where, f"'{key}' is set by the sweep itself (sweeps/<name>/runs/<run>)")
    return key


def _check_scalar(key: str, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list, tuple)):
        raise _err(where, f"value of '{key}' must be a scalar, got {value!r}")
    return value


def _mapping_value(v: dict, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, val in v.items():
        if k == "_name":
            if not isinstance(val, str) or not val.strip():
                raise _err(where, f"_name must be a non-empty string, got {val!r}")
            out[k] = _safe(val)
            continue
        _check_setting_key(k, where)
        out[k] = _check_scalar(k, val, where)
    return out


def _parse_overrides(items: Any, where: str, *, config: bool = True) -> list[str]:
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise _err(where, f"must be a list of key=value strings, got {items!r}")
    out = []
    for it in items:
        if isinstance(it, dict) and len(it) == 1:  # YAML `- key: value`
            ((k, v),) = it.items()
            it = override_text(str(k), v)
        if not isinstance(it, str):
            raise _err(where, f"override {it!r} is not a key=value string")
        try:
            key, _ = parse_override(it)
        except ConfigError as e:
            raise _err(where, str(e)) from None
        if config:
            _check_setting_key(key, where)
        out.append(it)
    return out


def _parse_axes(data: dict, where: str) -> list[tuple[str, list[dict[str, Any]]]]:
    axes: list[tuple[str, list[dict[str, Any]]]] = []
    runs = data.get("runs")
    if runs is not None:
        if not isinstance(runs, list) or not runs:
            raise _err(where, "runs must be a non-empty list of mappings of key: value")
        vals = []
        for i, r in enumerate(runs):
            if not isinstance(r, dict):
                raise _err(where, f"runs[{i}] must be a mapping of key: value, got {r!r}")
            vals.append(_mapping_value(r, f"{where} runs[{i}]"))
        axes.append(("runs", vals))
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise _err(where, "grid must be a non-empty mapping of key: [values]")
        for key, values in grid.items():
            if not isinstance(key, str) or not key:
                raise _err(where, f"grid key {key!r} must be a string")
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise _err(where, f"grid.{key} is an empty list")
            vals = []
            for v in values:
                if isinstance(v, dict):
                    vals.append(_mapping_value(v, f"{where} grid.{key}"))
                else:
                    _check_setting_key(key, f"{where} grid")
                    vals.append({key: _check_scalar(key, v, f"{where} grid")})
            axes.append((key, vals))
    if not axes:
        raise _err(where, "no runs: give a grid (key: [values]) and/or runs (a list)")
    # A key set by two axes would make the product ambiguous.
    owner: dict[str, str] = {}
    for axis, vals in axes:
        for v in vals:
            for k in v:
                if k != "_name" and owner.setdefault(k, axis) != axis:
                    raise _err(where, f"'{k}' is set by both '{owner[k]}' and '{axis}'")
    return axes


def _parse_lrs(value: Any, where: str) -> list[float]:
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise _err(where, f"lr_sweep must be a non-empty list of learning rates, got {value!r}")
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise _err(where, f"lr_sweep value {v!r} is not a number") from None
        if not (f > 0 and math.isfinite(f)):
            raise _err(where, f"lr_sweep value {v!r} must be > 0")
        out.append(f)
    if len({format_number(f) for f in out}) != len(out):
        raise _err(where, f"lr_sweep has duplicate values: {value!r}")
    return out


def _parse_evals(value: Any, where: str) -> list[EvalSpec]:
    from memzoo.evals.runner import TASKS

    if value is None:
        return []
    if not isinstance(value, list):
        raise _err(where, "evals must be a list of {task: ..., overrides: [...]}")
    out: list[EvalSpec] = []
    for i, e in enumerate(value):
        w = f"{where} evals[{i}]"
        if isinstance(e, str):
            e = {"task": e}
        if not isinstance(e, dict) or "task" not in e:
            raise _err(w, f"an eval needs a task (one of {', '.join(TASKS)}), got {e!r}")
        bad = [k for k in e if k not in EVAL_KEYS]
        if bad:
            raise _err(w, f"unknown key '{bad[0]}'; eval keys: {', '.join(EVAL_KEYS)}")
        task = str(e["task"])
        if task not in TASKS:
            close = difflib.get_close_matches(task, TASKS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err(w, f"unknown eval task '{task}'{hint}; tasks: {', '.join(TASKS)}")
        name = str(e.get("name") or task)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise _err(w, f"eval name '{name}' may hold only letters, digits, _ and -")
        when = e.get("when") or {}
        if not isinstance(when, dict):
            raise _err(w, f"when must be a mapping of config key: value(s), got {when!r}")
        when = {str(k): (v if isinstance(v, list) else [v]) for k, v in when.items()}
        for k in when:
            try:
                config_value(Config(), k)
            except SweepError:
                raise _err(w, f"when: '{k}' is not a config key") from None
        spec = EvalSpec(
            task, _parse_overrides(e.get("overrides"), f"{w}.overrides", config=False), name, when
        )
        if any(s.name == name for s in out):
            raise _err(w, f"two evals are named '{name}'; give one a different name:")
        out.append(spec)
    return out


def _parse_select(value: Any, evals: list[EvalSpec], where: str) -> Select:
    if value is None:
        if evals:
            metric, mode = PRIMARY_METRICS.get(evals[0].task, ("heldout_loss", "min"))
            return Select(f"{evals[0].name}.{metric}", mode)
        return Select()
    if isinstance(value, str):
        value = {"metric": value}
    if not isinstance(value, dict) or "metric" not in value:
        raise _err(where, "select must be {metric: NAME, mode: max|min}")
    bad = [k for k in value if k not in ("metric", "mode")]
    if bad:
        raise _err(where, f"select: unknown key '{bad[0]}' (keys: metric, mode)")
    metric = str(value["metric"])
    head = metric.split(".", 1)[0]
    names = [e.name for e in evals]
    if metric not in RUN_METRICS and ("." not in metric or head not in names):
        raise _err(
            where,
            f"select.metric '{metric}' is neither one of {', '.join(RUN_METRICS)} nor "
            f"EVAL.METRIC for an eval of this sweep ({', '.join(names) or 'none'})",
        )
    mode = value.get("mode")
    if mode is None:
        mode = "max" if any(w in metric for w in ("acc", "match")) else "min"
    if mode not in ("max", "min"):
        raise _err(where, f"select.mode must be max or min, got {mode!r}")
    return Select(metric, mode)


def parse_sweep(data: Any, path: str | Path | None = None, name: str | None = None) -> Sweep:
    """A :class:`Sweep` from the mapping of a sweep file (``path`` resolves ``base``)."""
    path = Path(path) if path is not None else None
    where = str(path) if path is not None else "<mapping>"
    if not isinstance(data, dict):
        raise _err(where, "a sweep file must hold a mapping at the top level")
    for k in data:
        if k not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(k), TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err(where, f"unknown key '{k}'{hint}; keys: {', '.join(TOP_LEVEL_KEYS)}")
    sname = str(data.get("name") or name or (path.stem if path is not None else ""))
    if not sname or not _NAME_RE.match(sname):
        raise _err(where, f"name {sname!r} must be letters, digits, _ . + - (a directory name)")
    base = data.get("base")
    base_path = _resolve_base(str(base), path, where) if base else None
    overrides = _parse_overrides(data.get("overrides"), f"{where} overrides")
    axes = _parse_axes(data, where)
    lrs = _parse_lrs(data.get("lr_sweep"), where)
    if lrs:
        for axis, vals in axes:
            if any("optim.lr" in v for v in vals):
                raise _err(where, f"optim.lr is set by '{axis}' and by lr_sweep; keep one")
    evals = _parse_evals(data.get("evals"), where)
    select = _parse_select(data.get("select"), evals, where)
    desc = data.get("description") or ""
    return Sweep(
        name=sname,
        base=base_path,
        overrides=overrides,
        axes=axes,
        lr_sweep=lrs,
        select=select,
        evals=evals,
        description=str(desc).strip(),
        path=path,
        raw=copy.deepcopy(data),
    )


def load_sweep(path: str | Path) -> Sweep:
    """Read and parse a sweep file (one-line :class:`SweepError` on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise SweepError(f"sweep {path}: not valid YAML: {first}") from None
    return parse_sweep(data, path)


def resolved_dict(sweep: Sweep) -> dict[str, Any]:
    """The sweep file's mapping with ``name`` set and ``base`` made absolute (a copy that can
    be re-read from anywhere: ``sweeps/<name>/sweep.yaml``)."""
    data = copy.deepcopy(sweep.raw) if sweep.raw else {}
    data["name"] = sweep.name
    if sweep.base is not None:
        data["base"] = str(sweep.base)
    return data


# ----------------------------------------------------------------------------- expansion


def _combos(axes: list[tuple[str, list[dict[str, Any]]]]) -> list[list[tuple[str, dict]]]:
    out: list[list[tuple[str, dict]]] = [[]]
    for axis, vals in axes:
        out = [[*c, (axis, v)] for c in out for v in vals]
    return out


def _cell_name(parts: list[tuple[str, dict]]) -> str:
    slugs = []
    for _axis, v in parts:
        if "_name" in v:
            slugs.append(v["_name"])
        else:
            slugs += [setting_slug(k, val) for k, val in v.items()]
    name = "_".join(s for s in slugs if s) or "base"
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 7].rstrip("_-.") + "-" + _short_hash(name)
    return name


def expand(sweep: Sweep, root: str | Path = "sweeps", *, validate: bool = True) -> list[Run]:
    """The sweep's runs in order (axes in file order, runs first; lrs innermost).

    With ``validate`` each run's config is resolved by ``load_config`` (errors name the run)
    and its evals' settings are checked, so a bad override fails here, not hours later.
    """
    where = str(sweep.path) if sweep.path is not None else sweep.name
    cells = []
    for parts in _combos(sweep.axes):
        settings: dict[str, Any] = {}
        for axis, v in parts:
            if "_name" in v and axis not in v:
                settings[axis] = v["_name"]
            settings.update({k: val for k, val in v.items() if k != "_name"})
        over = [override_text(k, val) for k, val in settings.items() if k in _config_keys(parts)]
        cells.append((_cell_name(parts), settings, [*sweep.overrides, *over]))

    names = [c[0] for c in cells]
    if len(set(names)) != len(names):  # equal slugs for different settings: add a hash
        seen: dict[str, dict] = {}
        for n, s, _ in cells:
            if n in seen and seen[n] == s:
                raise _err(where, f"two runs have the same settings ({n}); remove one")
            seen.setdefault(n, s)
        dup = {n for n in names if names.count(n) > 1}
        cells = [(f"{n}-{_short_hash(s)}" if n in dup else n, s, o) for n, s, o in cells]

    runs: list[Run] = []
    runs_dir = sweep.runs_dir(root)
    for cell, settings, over in cells:
        if not sweep.lr_sweep:
            runs.append(Run(cell, cell, len(runs), settings, over))
            continue
        for lr in sweep.lr_sweep:
            name = f"{cell}_lr{format_number(lr)}"
            s = {**settings, "optim.lr": lr}
            runs.append(Run(name, cell, len(runs), s, [*over, f"optim.lr={lr!r}"], lr=lr))
    if validate:
        _validate_runs(sweep, runs, runs_dir, where)
    return runs


def _config_keys(parts: list[tuple[str, dict]]) -> set[str]:
    return {k for _a, v in parts for k in v if k != "_name"}


@contextlib.contextmanager
def _cached_config_files():
    """Within the block, ``load_config`` parses each YAML file once (validating a big sweep
    resolves the same base and model files thousands of times; pure-Python YAML is slow)."""
    import memzoo.config as config_module

    original = getattr(config_module, "_read_yaml", None)
    if original is None:  # pragma: no cover - the config module changed: no cache
        yield
        return
    cache: dict[tuple[str, int], dict[str, Any]] = {}

    def cached(path: Path) -> dict[str, Any]:
        path = Path(path)
        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError:
            return original(path)
        if key not in cache:
            cache[key] = original(path)
        return copy.deepcopy(cache[key])  # callers modify what they get

    config_module._read_yaml = cached
    try:
        yield
    finally:
        config_module._read_yaml = original


def _validate_runs(sweep: Sweep, runs: list[Run], runs_dir: Path, where: str) -> None:
    with _cached_config_files():
        _validate_runs_inner(sweep, runs, runs_dir, where)


def _validate_runs_inner(sweep: Sweep, runs: list[Run], runs_dir: Path, where: str) -> None:
    from memzoo.evals.runner import EvalError, load_task, parse_settings

    cell_cfg: dict[str, Config] = {}
    for run in runs:
        if run.cell in cell_cfg:  # lr_sweep: the cell's config with another lr
            cfg = copy.deepcopy(cell_cfg[run.cell])
            cfg.optim.lr = float(run.lr)  # lr values were checked when parsing
            cfg.run_name = run.name
        else:
            try:
                cfg = load_config(sweep.base, run.train_overrides(runs_dir))
            except ConfigError as e:
                raise _err(where, f"run {run.name}: {e}") from None
            cell_cfg[run.cell] = cfg
        run.cfg = cfg
        for ev in sweep.evals:
            if not ev.applies(cfg):
                continue
            try:
                overrides = ev.resolved_overrides(cfg)
                task = load_task(ev.task)
                task.cells(parse_settings(task, overrides))
            except (EvalError, ValueError) as e:
                raise _err(where, f"run {run.name}: eval {ev.name}: {e}") from None
