"""MNIST-1D (Greydanus, 2020), generated in memory with the ``mnist1d`` package.

``mnist1d.data.get_dataset`` would download a pickle or cache one in the working directory; we only call
``make_dataset`` (pure NumPy, no I/O) and cache the arrays ourselves as ``.npz`` under the run's storage
path (atomic write, file lock), keyed by a hash of the generator arguments.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
IN_FEATURES = 40


@dataclass
class SplitData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _generate(num_samples: int, seed: int, train_split: float) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # ObjectView with the paper's defaults
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = float(train_split)
    args.url = None  # never used: make_dataset does no I/O
    state_np, state_py = np.random.get_state(), __import__("random").getstate()
    try:  # make_dataset reseeds the global RNGs; leave the caller's untouched
        return make_dataset(args)
    finally:
        np.random.set_state(state_np)
        __import__("random").setstate(state_py)


def _cached(cache_dir, key: str, build) -> dict[str, np.ndarray]:
    if cache_dir is None:
        return build()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npz"
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        arrays = build()
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:  # a failed write (a full disk) leaves no partial file behind
            Path(tmp).unlink(missing_ok=True)
        return arrays


def load_mnist1d(data_cfg, cache_dir=None) -> SplitData:
    """The labelled split: ``num_train`` (minus a ``val_fraction`` hold-out) and ``num_test`` samples."""
    n_train, n_test = int(data_cfg.num_train), int(data_cfg.num_test)
    total = int(math.ceil((n_train + n_test) / NUM_CLASSES) * NUM_CLASSES)  # generator: equal per class

    def build():
        d = _generate(total, data_cfg.seed, n_train / total)
        return {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int64),
                "x_test": d["x_test"][:n_test].astype(np.float32), "y_test": d["y_test"][:n_test].astype(np.int64)}

    a = _cached(cache_dir, f"mnist1d_s{data_cfg.seed}_n{n_train}_{n_test}", build)
    n_val = max(1, int(round(n_train * float(data_cfg.val_fraction))))
    x, y = a["x"][:n_train], a["y"][:n_train]
    return SplitData(x[n_val:], y[n_val:], x[:n_val], y[:n_val], a["x_test"], a["y_test"])


def load_transfer_set(data_cfg, transfer_cfg, cache_dir=None) -> np.ndarray:
    """``transfer_cfg.size`` extra unlabelled inputs from another generator seed (labels discarded)."""
    size = int(transfer_cfg.size)
    if size <= 0:
        return np.zeros((0, IN_FEATURES), np.float32)
    total = int(math.ceil(size / NUM_CLASSES) * NUM_CLASSES)

    def build():
        d = _generate(total, transfer_cfg.seed, 1.0)
        return {"x": d["x"][:size].astype(np.float32)}

    return _cached(cache_dir, f"mnist1d_transfer_s{transfer_cfg.seed}_n{size}", build)["x"]
