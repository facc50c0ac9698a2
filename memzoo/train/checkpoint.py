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
