"""Command line: ``memzoo train CONFIG [key=value ...]``, ``memzoo eval RUN_DIR``,
``memzoo eval ppl|mqar|niah RUN_DIR [key=value ...]``, ``memzoo generate RUN_DIR --prompt TEXT``,
``memzoo models``, ``memzoo config CONFIG``, ``memzoo sweep SWEEP.yaml [--dry-run]
[--print-commands] [--max-parallel N]``, ``memzoo report SWEEP_DIR``,
``memzoo compile CONFIG [key=value ...] topology=v5e:16x16 [--json PATH]``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# `memzoo train` after SIGTERM / SIGINT: the checkpoint is saved and rerunning resumes
EXIT_SIGTERM, EXIT_SIGINT = 143, 130


def _cmd_train(args: argparse.Namespace) -> int:
    from memzoo.config import load_config
    from memzoo.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if summary.get("interrupted"):  # checkpoint saved; a distinct status: 128 + signal number
        return {"SIGTERM": EXIT_SIGTERM, "SIGINT": EXIT_SIGINT}.get(summary["interrupted"], 0)
    out = {k: summary[k] for k in ("final_step", "heldout_loss", "heldout_bpb") if k in summary}
    print(json.dumps({"run_dir": summary["run_dir"], **out}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from memzoo.evals.runner import TASKS, EvalError

    pos = list(args.targets)
    if pos[0] in TASKS and not (len(pos) == 1 and Path(pos[0], "config.yaml").is_file()):
        if len(pos) < 2:
            raise EvalError(f"eval {pos[0]} needs a RUN_DIR: memzoo eval {pos[0]} RUN_DIR")
        return _cmd_eval_task(pos[0], pos[1], pos[2:], args)
    if len(pos) > 1:
        if "=" not in pos[0]:
            from memzoo.evals.runner import load_task

            load_task(pos[0])  # unknown task: one-line error with a hint
        raise EvalError(
            f"unexpected arguments {' '.join(pos[1:])!r}: use memzoo eval RUN_DIR, or "
            f"memzoo eval TASK RUN_DIR [key=value ...] with TASK one of {', '.join(TASKS)}"
        )
    args.run_dir = pos[0]
    return _cmd_eval_heldout(args)


def _cmd_eval_task(task: str, run: str, overrides: list[str], args: argparse.Namespace) -> int:
    from memzoo.evals.runner import run_eval

    res = run_eval(task, run, overrides, step=args.step)
    print(f"{task} eval of {res['run_dir']} @ step {res['step']} -> {res['out_dir']}")
    print(res["table"], end="" if res["table"].endswith("\n") else "\n")
    if args.json:  # a later eval of the same task overwrites out_dir; this copy stays
        shutil.copyfile(Path(res["out_dir"]) / "results.json", args.json)
    return 0


def _cmd_eval_heldout(args: argparse.Namespace) -> int:
    import jax

    from memzoo.data import build_tokenizer, heldout_batches
    from memzoo.evals.runner import load_run
    from memzoo.evaluate import heldout_metrics
    from memzoo.train.step import make_eval_step

    model, cfg, _ = load_run(args.run_dir, args.step)
    tok = build_tokenizer(cfg.data)
    batches = heldout_batches(
        cfg.data, tok, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=args.batches
    )
    from flax import nnx

    graphdef, params = nnx.split(model)
    res = heldout_metrics(
        make_eval_step(graphdef),
        params,
        [{k: jax.numpy.asarray(v) for k, v in b.items()} for b in batches],
        tok,
    )
    result = {"run_dir": str(args.run_dir), "step": model.restored_step, **res}
    for key in ("max_new_tokens", "temperature", "top_k"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(cfg.sample, key))
    if args.max_new_tokens > 0:
        prompt = args.prompt if args.prompt is not None else cfg.sample.prompt
        result["sample"] = _continue(model, tok, prompt, args)
    print(
        f"{args.run_dir} @ step {result['step']}: heldout_loss {result['heldout_loss']:.4f} "
        f"nats/token, heldout_bpb {result['heldout_bpb']:.4f} "
        f"({result['heldout_tokens']} tokens)"
    )
    if "sample" in result:
        print("sample:\n" + result["sample"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _continue(model, tok, prompt: str, args: argparse.Namespace) -> str:
    """The prompt followed by the model's continuation (sampling settings from ``args``)."""
    import numpy as np

    import memzoo

    ids = [tok.bos_id] + tok.encode(prompt)
    out = memzoo.generate(
        model,
        np.asarray([ids], np.int32),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    return prompt + tok.decode([int(t) for t in out[0, len(ids) :]])


def _cmd_generate(args: argparse.Namespace) -> int:
    import memzoo
    from memzoo.data import build_tokenizer

    model, cfg = memzoo.load(args.run_dir, args.step)
    print(_continue(model, build_tokenizer(cfg.data), args.prompt, args))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import yaml

    from memzoo.config import CONFIG_ROOT, available_models

    for name in available_models():
        data = yaml.safe_load((CONFIG_ROOT / "models" / f"{name}.yaml").read_text()) or {}
        sizes = ", ".join(data.get("sizes", {}))
        memory, pattern = data.get("memory", "-"), data.get("pattern", "M")
        print(f"{name:20s} memory={memory:18s} pattern={pattern:6s} sizes: {sizes}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from memzoo.config import load_config
    from memzoo.train.loop import config_summary

    print(config_summary(load_config(args.config, args.overrides)), end="")
    return 0


def _add_sampling(p: argparse.ArgumentParser, default_tokens: int | None) -> None:
    dflt = " (default: the run's sample config)" if default_tokens is None else ""
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--max-new-tokens", type=int, default=default_tokens, help="0 = no sample" + dflt
    )
    p.add_argument("--temperature", type=float, default=None if default_tokens is None else 0.0)
    p.add_argument("--top-k", type=int, default=None if default_tokens is None else 0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run from a config")
    p.add_argument("config", help="run config, e.g. configs/train/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.d_model=256")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a run: held-out bpb + sample, or a task (ppl, mqar, niah)",
        description="memzoo eval RUN_DIR: held-out loss / bits per byte and a sample. "
        "memzoo eval TASK RUN_DIR [key=value ...]: run an eval task (ppl, mqar, niah) and write "
        "RUN_DIR/evals/TASK/{results.json,table.md,*.png}. RUN_DIR may also be a checkpoint "
        "directory RUN_DIR/checkpoints/STEP.",
    )
    p.add_argument("targets", nargs="+", metavar="ARG", help="[TASK] RUN_DIR [key=value ...]")
    p.add_argument("--batches", type=int, default=8, help="held-out batches to score")
    p.add_argument("--prompt", default=None, help="prompt for the sample (default: config)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    _add_sampling(p, None)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", required=True)
    _add_sampling(p, 128)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("models", help="list model configs and their sizes")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("config", help="print the resolved config without training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_config)
    from memzoo.sweep.cli import add_subcommands

    add_subcommands(sub)
    from memzoo.compile import add_subcommand as add_compile

    add_compile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `memzoo eval TASK RUN --step 3 key=value`: positionals after an option
        if args.command != "eval" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.targets = [*args.targets, *extra]
    from memzoo.config import ConfigError
    from memzoo.evals.runner import EvalError
    from memzoo.train.loop import TrainingError

    try:
        return args.func(args)
    except (ConfigError, TrainingError, FileNotFoundError, EvalError) as e:
        msg = " ".join(str(e).split()) if isinstance(e, EvalError) else e
        print(f"memzoo: error: {msg}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
