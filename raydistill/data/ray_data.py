"""Ray Data helpers: NumPy arrays <-> Arrow tables (tensor columns) <-> ``ray.data.Dataset``.

Rows carry ``x`` (float32 vector), ``y`` (int64 label, -1 for unlabelled transfer rows) and, for offline
teacher outputs, ``topk_values`` / ``topk_indices`` (/ ``topk_tail``): what ``raydistill teacher-logits``'s
shards decode to (``raydistill.data.topk_cache.read_teacher_outputs``), so a distillation reads either source the same way.
"""

from __future__ import annotations

import numpy as np

UNLABELLED = -1


def arrays_to_table(**columns: np.ndarray):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    cols = {}
    for name, arr in columns.items():
        arr = np.ascontiguousarray(arr)
        cols[name] = ArrowTensorArray.from_numpy(arr) if arr.ndim > 1 else pa.array(arr)
    return pa.table(cols)


def table_to_arrays(table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if hasattr(col, "to_numpy_ndarray"):
            out[name] = col.to_numpy_ndarray()
        else:
            try:
                out[name] = col.to_numpy(zero_copy_only=False)
            except TypeError:
                out[name] = col.to_numpy()
            if out[name].dtype == object:
                out[name] = np.stack(out[name])
    return out


def to_ray_dataset(**columns: np.ndarray):
    """A small in-memory (materialised) Ray dataset from equal-length NumPy columns."""
    import ray.data

    return ray.data.from_arrow(arrays_to_table(**columns))


def val_test_columns(val: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The evaluation rows as one set of columns: the ``val`` rows then the ``test`` rows (the same columns,
    each of one length per side), with a ``split`` column (int64: 0 val, 1 test) telling them apart."""
    if set(val) != set(test) or not val:
        raise ValueError(f"val_test_columns: val has columns {sorted(val)}, test {sorted(test)}; they must be the "
                         "same, and at least one")
    if "split" in val:
        raise ValueError("val_test_columns: 'split' is the column this adds; the rows must not have one")
    n = {}
    for side, cols in (("val", val), ("test", test)):
        lengths = {c: len(v) for c, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"val_test_columns: the {side} columns differ in length: {lengths}")
        n[side] = next(iter(lengths.values()))
    split = np.concatenate([np.zeros(n["val"], np.int64), np.ones(n["test"], np.int64)])
    return {**{c: np.concatenate([val[c], test[c]]) for c in val}, "split": split}


def val_test_dataset(val: dict[str, np.ndarray], test: dict[str, np.ndarray]):
    """:func:`val_test_columns` as a Ray dataset (the evaluation rows every task hands its workers)."""
    return to_ray_dataset(**val_test_columns(val, test))
