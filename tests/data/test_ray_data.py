"""raydistill.data.ray_data's evaluation rows: val then test, told apart by the ``split`` column."""

from __future__ import annotations

import numpy as np
import pytest

from raydistill.data.ray_data import val_test_columns


def test_val_then_test_with_split_column():
    rng = np.random.default_rng()
    nv, nt = rng.integers(1, 9, 2)
    val = {"x": rng.standard_normal((nv, 3)).astype(np.float32), "y": rng.integers(0, 10, nv)}
    test = {"x": rng.standard_normal((nt, 3)).astype(np.float32), "y": rng.integers(0, 10, nt)}
    got = val_test_columns(val, test)
    assert list(got) == ["x", "y", "split"]
    assert got["split"].dtype == np.int64 and got["split"].tolist() == [0] * nv + [1] * nt
    for c in ("x", "y"):
        np.testing.assert_array_equal(got[c][got["split"] == 0], val[c])
        np.testing.assert_array_equal(got[c][got["split"] == 1], test[c])
        assert got[c].dtype == val[c].dtype


@pytest.mark.parametrize("val, test, match", [
    ({"x": np.zeros(2)}, {"y": np.zeros(2)}, "must be the same"),
    ({}, {}, "at least one"),
    ({"x": np.ones(2), "split": np.ones(2)}, {"x": np.ones(1), "split": np.ones(1)}, "'split' is the column"),
    ({"x": np.ones(2), "y": np.ones(3)}, {"x": np.ones(1), "y": np.ones(1)}, "val columns differ in length"),
])
def test_bad_columns_are_named(val, test, match):
    with pytest.raises(ValueError, match=match):
        val_test_columns(val, test)
