"""Ablation sweeps: a grid of runs from one sweep file, evaluated and reported together.

``memzoo sweep SWEEP.yaml [--dry-run] [--print-commands] [--max-parallel N]`` and
``memzoo report SWEEP_DIR``; the file format is documented in :mod:`memzoo.sweep.spec`.
"""

from memzoo.sweep.spec import Run, Sweep, SweepError, expand, load_sweep, parse_sweep

__all__ = ["Run", "Sweep", "SweepError", "expand", "load_sweep", "parse_sweep"]
