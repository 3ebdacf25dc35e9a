"""The benchmark timers' call order (raydistill.bench.spmm._timer): what runs right before each timed call; the
benchmarks' own argument checks."""

from __future__ import annotations

from collections import Counter

import pytest

from raydistill.bench.spmm import _timer


def _recording(names):
    calls = []
    return calls, {n: (lambda n=n: calls.append(n)) for n in names}


def test_turn_rotates_so_each_fn_follows_each_other_equally():
    names = ["int8", "fp32", "ao", "dense"]
    calls, fns = _recording(names)
    out = _timer("cpu").turn(fns, repeats=10, budget_s=60.0)
    assert set(out) == set(names) and all(v is not None and v >= 0 for v in out.values())
    timed = calls[len(names):]  # after the warm-up calls
    assert len(timed) == 30 * len(names)  # repeats * 3 rounds, one call of each per round
    rounds = [timed[i:i + len(names)] for i in range(0, len(timed), len(names))]
    assert all(sorted(r) == sorted(names) for r in rounds)
    pairs = Counter(zip(timed, timed[1:]))
    # every fn runs right after the dense call (and after each other fn) several times; with a fixed
    # order only one fn ever followed it
    for before in names:
        after = {b: c for (a, b), c in pairs.items() if a == before}
        assert set(after) == set(names) - {before} and min(after.values()) >= 5, (before, after)
    calls2, fns2 = _recording(names)
    _timer("cpu").turn(fns2, repeats=10, budget_s=60.0)
    assert calls2 == calls  # seeded: the same order every run


def test_interleaved_runs_blocks_with_an_untimed_switch_call():
    calls, fns = _recording(["a", "b"])
    out = _timer("cpu").interleaved(fns, repeats=5, budget_s=60.0, block=5)
    assert set(out) == {"a", "b"}
    assert calls[2:] == ["a"] * 6 + ["b"] * 6  # warm-ups, then one untimed + 5 timed calls per fn


@pytest.mark.parametrize("bad", ["0", "512,-1", "x", ","])
def test_kd_loss_linear_bench_rejects_a_bad_chunk_size_list(bad, capsys):
    from raydistill.bench.kd_loss_linear import main

    assert main(["--chunk-size", bad]) == 2
    assert "--chunk-size must be positive integers" in capsys.readouterr().err
