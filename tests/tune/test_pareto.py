"""Pareto front on hand-made points: dominated, ties, single point, empty, missing values."""

from __future__ import annotations

import math

from raydistill.tune.pareto import dominates, pareto_front, pareto_indices


def P(name, acc, cr):
    return {"name": name, "accuracy": acc, "compression_ratio": cr}


def names(front):
    return [p["name"] for p in front]


def test_empty_and_single():
    assert pareto_front([]) == []
    assert names(pareto_front([P("a", 0.5, 2.0)])) == ["a"]


def test_dominated_points_are_dropped_and_front_sorted():
    pts = [
        P("dense", 0.90, 1.0),
        P("mid", 0.88, 4.0),
        P("sparse", 0.80, 10.0),
        P("worse_than_mid", 0.85, 3.0),     # dominated by mid (lower acc, lower compression)
        P("same_cr_lower_acc", 0.87, 4.0),  # dominated by mid (equal compression, lower acc)
        P("same_acc_lower_cr", 0.80, 9.0),  # dominated by sparse (equal acc, lower compression)
    ]
    assert names(pareto_front(pts)) == ["dense", "mid", "sparse"]  # compression ratio ascending


def test_ties_keep_both():
    pts = [P("a", 0.9, 2.0), P("b", 0.9, 2.0), P("c", 0.5, 1.0)]
    assert names(pareto_front(pts)) == ["a", "b"]
    assert not dominates(pts[0], pts[1]) and not dominates(pts[1], pts[0])
    assert dominates(pts[0], pts[2])


def test_one_point_dominating_everything():
    pts = [P("x", 0.5, 1.0), P("best", 0.95, 20.0), P("y", 0.9, 10.0)]
    assert names(pareto_front(pts)) == ["best"]


def test_missing_or_nan_metrics_take_no_part():
    pts = [P("nan", math.nan, 100.0), P("none", None, 100.0), P("a", 0.7, 2.0), {"name": "empty"},
           P("inf", math.inf, 1.0)]
    assert names(pareto_front(pts)) == ["a"]
    assert pareto_indices(pts) == [2]


def test_objects_and_custom_objectives():
    class T:
        def __init__(self, accuracy, sparsity):
            self.accuracy, self.sparsity = accuracy, sparsity

    pts = [T(0.9, 0.0), T(0.8, 0.9), T(0.7, 0.5)]
    assert pareto_indices(pts, ("accuracy", "sparsity")) == [0, 1]


def test_minimised_objectives_and_the_size_and_latency_fronts():
    from raydistill.tune.pareto import LATENCY_OBJECTIVES, SIZE_OBJECTIVES, pareto_front
    from raydistill.tune.report import compute_fronts

    pts = [
        {"trial_id": "a", "status": "TERMINATED", "accuracy": 0.90, "compression_ratio": 1.0, "model_bytes": 4000,
         "latency_ms_b256": 1.0},
        {"trial_id": "b", "status": "TERMINATED", "accuracy": 0.89, "compression_ratio": 4.0, "model_bytes": 1000,
         "latency_ms_b256": 2.0},
        {"trial_id": "c", "status": "TERMINATED", "accuracy": 0.88, "compression_ratio": 4.0, "model_bytes": 1500,
         "latency_ms_b256": 0.5},
        {"trial_id": "d", "status": "TERMINATED", "accuracy": 0.85, "compression_ratio": 8.0, "model_bytes": None,
         "latency_ms_b256": 3.0},
    ]
    # fewer bytes is better: c (more bytes and less accurate than b) is dominated; d has no bytes
    assert [p["trial_id"] for p in pareto_front(pts, SIZE_OBJECTIVES)] == ["a", "b"]
    # lower latency is better: b and d are dominated by a / c
    assert [p["trial_id"] for p in pareto_front(pts, LATENCY_OBJECTIVES)] == ["a", "c"]
    fronts = compute_fronts(pts)
    assert {k: [r["trial_id"] for r in v] for k, v in fronts.items()} == {
        "accuracy_bytes": ["a", "b"], "accuracy_params": [], "accuracy_latency": ["a", "c"]}  # no parameter counts
