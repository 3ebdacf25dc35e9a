"""Confidence intervals for evaluation metrics: a percentile bootstrap over evaluation items (LM blocks,
classification examples), and its paired form for the difference between two models scored on the same
items.

Perplexity is a ratio (``exp(sum NLL / sum tokens)``), so blocks are resampled whole, with their token
counts. With more than ``MAX_GROUPS`` items, consecutive items are summed into that many groups first (a
block bootstrap: each resample costs ``n_boot x MAX_GROUPS`` regardless of the evaluation set's size).
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
MAX_GROUPS = 1024


def _grouped(*cols: np.ndarray) -> list[np.ndarray]:
    cols = [np.asarray(c, dtype=np.float64).ravel() for c in cols]
    n = len(cols[0])
    if n <= MAX_GROUPS:
        return cols
    edges = np.linspace(0, n, MAX_GROUPS + 1).astype(np.int64)
    return [np.add.reduceat(c, edges[:-1]) for c in cols]


def _resample_sums(cols: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Each column's sum over ``n_boot`` resamples (with replacement) of the same item indices."""
    m = len(cols[0])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(np.float64)  # (n_boot, m)
    return [counts @ c for c in cols]


def _interval(samples: np.ndarray, level: float) -> list[float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples[np.isfinite(samples)], [a, 1.0 - a]) if np.isfinite(samples).any() else \
        (math.nan, math.nan)
    return [float(lo), float(hi)]


def perplexity_ci(nll: np.ndarray, tokens: np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
                  seed: int = 0) -> list[float]:
    """95% interval of ``exp(sum nll / sum tokens)`` over resampled blocks (``nll``: each block's summed
    negative log-likelihood in nats, ``tokens``: its scored tokens)."""
    nll, tokens = _grouped(nll, tokens)
    if len(nll) == 0:
        return [math.nan, math.nan]
    s, n = _resample_sums([nll, tokens], n_boot, seed)
    return _interval(np.exp(np.minimum(s / np.maximum(n, 1.0), 50.0)), level)


def mean_ci(values: np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> list[float]:
    """95% interval of the mean of ``values`` (e.g. per-example correctness: accuracy)."""
    v, = _grouped(values)
    ones, = _grouped(np.ones(len(np.asarray(values).ravel())))
    if len(v) == 0:
        return [math.nan, math.nan]
    s, n = _resample_sums([v, ones], n_boot, seed)
    return _interval(s / n, level)


def paired_perplexity_change(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, *, level: float = 0.95,
                             n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Relative perplexity change of model A against model B (``ppl_A / ppl_B - 1``) scored on the same
    blocks, with its paired bootstrap interval: both models' sums come from the same resampled blocks, so
    block-to-block difficulty cancels and the interval is much narrower than the two separate ones."""
    a, b, n = _grouped(nll_a, nll_b, tokens)
    tot = max(float(n.sum()), 1.0)
    change = math.exp((float(a.sum()) - float(b.sum())) / tot) - 1.0
    sa, sb, sn = _resample_sums([a, b, n], n_boot, seed)
    return {"change": change, "ci95": _interval(np.expm1((sa - sb) / np.maximum(sn, 1.0)), level)}


def paired_mean_difference(x_a: np.ndarray, x_b: np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
                           seed: int = 0) -> dict:
    """``mean(A) - mean(B)`` over the same items (e.g. accuracy points) with its paired bootstrap interval."""
    a, b = np.asarray(x_a, np.float64).ravel(), np.asarray(x_b, np.float64).ravel()
    d, ones = _grouped(a - b, np.ones(len(a)))
    s, n = _resample_sums([d, ones], n_boot, seed)
    return {"change": float((a - b).mean()) if len(a) else math.nan, "ci95": _interval(s / n, level)}
