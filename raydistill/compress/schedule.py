"""Sparsity schedules."""

from __future__ import annotations

from raydistill.compress.masks import check_sparsity

__all__ = ["cubic_sparsity"]


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def cubic_sparsity(step: int, *, initial_sparsity: float = 0.0, final_sparsity: float, begin_step: int = 0,
                   end_step: int, frequency: int = 1) -> float:
    """Zhu & Gupta (2017) gradual pruning schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))**3`` with ``t_0 = begin_step``,
    ``n * dt = end_step - begin_step`` and ``dt = frequency``. The value is held at ``s_i`` before
    ``t_0`` and at ``s_f`` from ``end_step`` on; in between it is evaluated at the last pruning step,
    ``t = t_0 + floor((step - t_0) / dt) * dt`` (so it changes only every ``frequency`` steps).
    """
    step = _int(step, "step")
    begin_step = _int(begin_step, "begin_step")
    end_step = _int(end_step, "end_step")
    frequency = _int(frequency, "frequency")
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")
    if end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step})")
    if step < begin_step:
        return s_i
    if step >= end_step:
        return s_f
    t = begin_step + ((step - begin_step) // frequency) * frequency
    if t == begin_step:
        return s_i
    frac = (t - begin_step) / (end_step - begin_step)
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3
