"""The task interface the per-worker loop talks to."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


class Task:
    """One task (classification, causal LM). The loop calls, in order: ``build_model`` (student and
    teacher), ``prepare`` (on the worker's materialised shard, or on every streamed batch),
    ``loss`` per step, ``evaluate`` on rank 0 after every epoch."""

    name: str = ""
    metric: str = ""              # the headline metric in reports
    higher_is_better: bool = True
    float_columns: tuple[str, ...] = ()
    latency_batches: tuple[int, ...] = (1,)   # batch sizes the CPU latency is measured at

    def latency_input(self, task_info: dict, batch: int) -> torch.Tensor | None:
        """A batch of inputs to time the model's forward on (None: latency is not measured)."""
        return None

    def train_columns(self, offline: bool) -> list[str]:
        raise NotImplementedError

    def eval_columns(self) -> list[str]:
        raise NotImplementedError

    def build_model(self, model: dict, task_info: dict):
        raise NotImplementedError

    def prepare(self, batch: dict, spec, teacher) -> dict:
        """Attach what the loss needs (e.g. the teacher's outputs) and drop rows the stage cannot use."""
        return batch

    def loss(self, model, batch: dict, spec, teacher) -> tuple[torch.Tensor, int]:
        """The stage's loss on one batch (student forward included) and the items it counted
        (rows or tokens, for throughput)."""
        raise NotImplementedError

    def evaluate(self, model, data: dict, teacher=None, task_info: dict | None = None) -> dict[str, Any]:
        raise NotImplementedError

    # -- shared helpers ----------------------------------------------------------------------------
    def to_tensors(self, arrays: dict, device) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in arrays.items():
            dt = torch.float32 if k in self.float_columns else torch.int64
            out[k] = torch.as_tensor(np.ascontiguousarray(v), device=device).to(dt)
        return out


def shard_arrays(shard, columns) -> dict[str, np.ndarray]:
    """All rows of a Ray Data shard as NumPy columns (the ones present of ``columns``)."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy", prefetch_batches=1):
        for c in columns:
            if c in batch:
                parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) for c, v in parts.items() if v}
