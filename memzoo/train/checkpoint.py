"""Checkpoints with orbax: async, keep the last K, atomic, parameters-only restore.

Each step directory holds three items: ``params`` (what evaluation needs), ``opt`` (optimiser
state and step counter) and ``data`` (the data iterator's state, JSON), so a resumed run
continues with exactly the next batch. orbax writes to a temporary directory and renames it
when the save completes, so an interrupted save never becomes the latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict, force=False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
            ),
            force=force,
        )

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, dict]:
        """Restore everything at ``step`` into the structure (and shardings) of the templates."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt=ocp.args.StandardRestore(_abstract(opt_state)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_params(
    directory: Path, params_template: Any, step: int | None = None
) -> tuple[Any, int]:
    """Parameters only (no optimiser state), for evaluation. Returns (params, step)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {directory}; available: {sorted(steps)}"
            )
        out = manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_template))),
        )
        return out["params"], step
    finally:
        manager.close()


def complete_steps(directory: Path) -> list[int]:
    """The steps with a complete checkpoint in ``directory`` (sorted; [] when it is missing),
    read from the directory names without opening a manager: orbax renames a step's
    directory to ``<step>`` only once its save is complete."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "params").is_dir()
    )


def leaf_key(path: tuple) -> str:
    """A parameter's dotted name from a pytree key path (``layers.0.mixer.q.kernel``)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(p for p in parts if p != "value")


def saved_param_shapes(step_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape from a checkpoint's metadata, without reading the arrays
    (empty when the metadata cannot be read)."""
    import logging

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "metadata file does not exist" for the item directory
    try:
        meta = ocp.StandardCheckpointer().metadata(Path(step_dir).absolute() / "params")
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself will say
        return {}
    finally:
        absl.setLevel(level)
    meta = getattr(meta, "item_metadata", meta)
    return {leaf_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(meta)}


def shape_mismatch(template: Any, saved: dict[str, tuple[int, ...]]) -> str | None:
    """How the parameter tree ``template`` differs from ``saved`` shapes, in one line (the
    first difference and how many more); None when they agree."""
    wanted = {leaf_key(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(template)}
    problems = [f"{k} missing in the checkpoint" for k in wanted if k not in saved]
    problems += [f"{k} not in the model" for k in saved if k not in wanted]
    problems += [
        f"{k} is {wanted[k]} in the config but {saved[k]} in the checkpoint"
        for k in wanted
        if k in saved and wanted[k] != saved[k]
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def resolve_init_from(path: str | Path) -> tuple[Path, int]:
    """(checkpoints directory, step) for ``train.init_from``: a run directory (its latest
    complete checkpoint) or a ``RUN/checkpoints/STEP`` directory."""
    path = Path(path).expanduser()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        directory, step = path.parent, int(path.name)
        if not (path / "params").is_dir():
            raise FileNotFoundError(f"train.init_from: no checkpoint at {path}")
        return directory, step
    directory = path / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(
            f"train.init_from: {path} is neither a run directory (with checkpoints/) nor a "
            "checkpoints/STEP directory"
        )
    steps = complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"train.init_from: no complete checkpoint in {directory}")
    return directory, steps[-1]
