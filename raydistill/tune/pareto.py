"""The quality / compression Pareto front (pure functions, no Ray).

The docstrings below speak of accuracy; any objective ``-key`` is ``key`` minimised (a causal LM's
front is over ``-perplexity``: :data:`raydistill.tune.report.PERPLEXITY`).

A point ``p`` is *dominated* when another point ``q`` is at least as good in both objectives and
strictly better in one: ``q.accuracy >= p.accuracy and q.compression_ratio >= p.compression_ratio``
with at least one ``>``.  The front is every point no other point dominates.

Ties: two points with *equal* (accuracy, compression_ratio) do not dominate each other, so **both are
kept** (two different configs that reach the same trade-off are both worth seeing; the front is
reported sorted, equal points adjacent).  Points whose accuracy or compression ratio is missing or
NaN (e.g. a trial that errored before its first report) take no part: they are neither on the front
nor able to dominate anything.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

OBJECTIVES = ("accuracy", "compression_ratio")  # both maximised
# the fronts over size and speed (issue 12): "-key" means key is minimised
SIZE_OBJECTIVES = ("accuracy", "-model_bytes")
LATENCY_OBJECTIVES = ("accuracy", "-latency_ms_b256")


def _value(p: Any, key: str) -> float | None:
    """The objective's value, maximised; a ``-key`` objective is ``key`` minimised (its value negated)."""
    if key.startswith("-"):
        v = _value(p, key[1:])
        return None if v is None else -v
    v = p.get(key) if isinstance(p, Mapping) else getattr(p, key, None)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def dominates(a: Any, b: Any, objectives: Sequence[str] = OBJECTIVES) -> bool:
    """True when ``a`` is >= ``b`` in every objective and > in at least one (all maximised)."""
    av = [_value(a, k) for k in objectives]
    bv = [_value(b, k) for k in objectives]
    if any(v is None for v in av + bv):
        return False
    return all(x >= y for x, y in zip(av, bv)) and any(x > y for x, y in zip(av, bv))


def pareto_indices(points: Sequence[Any], objectives: Sequence[str] = OBJECTIVES) -> list[int]:
    """Indices of the non-dominated points, sorted by the last objective ascending, then the first
    descending (for the default objectives: compression_ratio up, accuracy down).

    ``points`` are mappings or objects with the objective attributes; all objectives are maximised.
    Equal points are all kept.  O(n^2), which is nothing for a search's few hundred trials.
    """
    valid = [i for i, p in enumerate(points) if all(_value(p, k) is not None for k in objectives)]
    front = [
        i for i in valid
        if not any(dominates(points[j], points[i], objectives) for j in valid if j != i)
    ]
    # Along the front, raising one objective lowers the other: sort by the second ascending.
    last = objectives[-1]
    first = objectives[0]
    front.sort(key=lambda i: (_value(points[i], last), -_value(points[i], first), i))
    return front


def pareto_front(points: Sequence[Any], objectives: Sequence[str] = OBJECTIVES) -> list[Any]:
    """The non-dominated points themselves (see :func:`pareto_indices`)."""
    return [points[i] for i in pareto_indices(points, objectives)]
