"""Which parametrizations run in the default tier (`make test`) and which only in the full one
(`make test-full`, also run by CI).

The gradient-memory presets compile slowly on a CPU (an ATLAS layer takes 20-30 s), and the
same preset is checked at several levels (op, layer contract, model, training). The default
tier runs every check on a core set that covers each code path of the four Miras choices at
least once (linear and MLP memories, momentum, decay, the Omega window, Muon); the other
presets run every check in the full tier.
"""

from collections.abc import Iterable

import pytest

# Titans LMM (MLP memory, momentum, decay) and ATLAS (Muon, Omega window) as models; TTT-linear
# (a linear memory, plain GD). Moneta / Yaad / Memora (the lp, huber and normalised retention
# choices), OmegaNet, ATLAS++ and TTT-MLP are covered in the default tier by the layer
# contract's decode == parallel check and by the op test of the chunked form (odd lengths, a
# state carried from mid-chunk, packed documents); OmegaNet also by every op test.
CORE_GRADIENT_PRESETS = ("titans_lmm", "titans_mlp", "atlas", "ttt_linear")


def tier_marks(
    name: str, heavy: Iterable[str], core: Iterable[str] = CORE_GRADIENT_PRESETS
) -> list:
    """[slow] for a ``heavy`` name outside ``core``, else []."""
    return [pytest.mark.slow] if name in set(heavy) and name not in set(core) else []


def core_first(
    names: Iterable[str],
    heavy: Iterable[str],
    core: Iterable[str] = CORE_GRADIENT_PRESETS,
    group: str | None = None,
) -> list:
    """``names`` as pytest params; those in ``heavy`` but not in ``core`` are marked slow.
    ``group`` (a prefix) keeps each name's tests on one xdist worker (``--dist loadgroup``),
    so a module-level cache of its compiled functions is built once."""
    out = []
    for n in names:
        marks = tier_marks(n, heavy, core)
        if group is not None:
            marks.append(pytest.mark.xdist_group(f"{group}-{n}"))
        out.append(pytest.param(n, marks=marks, id=n))
    return out
