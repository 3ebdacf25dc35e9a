"""Offline teacher outputs: run the teacher once over the distillation rows with Ray Data and keep the
top-k logits per row in parquet, so distillation (``distill.teacher_outputs``) reads them with
``kd_loss_topk`` instead of running the teacher in every step of every run.

The teacher is held by a pool of stateful actors (``map_batches`` with a callable class and
``concurrency=N``; one GPU each when the cluster has GPUs), loaded once per actor.
Output columns: ``x``, ``y`` (-1 for unlabelled transfer rows), ``topk_values`` (float32, k),
``topk_indices`` (int64, k), sorted by value, descending.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from raydistill.config import Config, ConfigError


class TeacherTopK:
    """Ray Data callable class: one teacher per actor, applied to numpy batches."""

    def __init__(self, model: dict, path: str, topk: int, use_gpu: bool = False):
        import torch

        from raydistill.distill.worker import load_weights
        from raydistill.models import build_model

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(model)
        load_weights(self.model, path)
        self.model.to(self.device).eval()
        self.topk = int(topk)

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(np.ascontiguousarray(batch["x"]), dtype=torch.float32, device=self.device)
            vals, idx = self.model(x).float().topk(self.topk, dim=1)
        batch["topk_values"] = vals.cpu().numpy().astype(np.float32)
        batch["topk_indices"] = idx.cpu().numpy().astype(np.int64)
        return batch


def default_output(storage: Path, teacher_hash: str, topk: int) -> Path:
    return storage / "teacher_outputs" / f"{teacher_hash}-k{topk}"


def write_teacher_outputs(cfg: Config, *, storage_path=None, output=None, topk: int | None = None,
                          concurrency: int | None = None, address: str | None = None) -> Path:
    """Train/load the teacher, then write its top-k logits over train + transfer rows to parquet."""
    import os

    from raydistill.distill.session import ray_session
    from raydistill.distill.trainer import distill_datasets, ensure_teacher, resolve_storage

    if cfg.distill.teacher_outputs:
        raise ConfigError("distill.teacher_outputs is set: teacher-logits writes those outputs; unset it")
    k = int(topk or cfg.distill.topk)
    if not 1 <= k <= 10:
        raise ConfigError(f"distill.topk must be in 1..10 (10 classes), got {k}")
    storage = resolve_storage(storage_path, cfg)
    with ray_session(address=address) as ray:
        teacher = ensure_teacher(cfg, storage)
        out = Path(output).expanduser().resolve() if output else default_output(storage, teacher.config_hash, k)
        datasets, _ = distill_datasets(cfg, storage)
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        n = int(concurrency or max(1, min(4, int(cpus // 2))))
        ds = datasets["train"].repartition(max(n, 2)).map_batches(
            TeacherTopK, fn_constructor_kwargs={"model": teacher.model, "path": teacher.path, "topk": k,
                                                "use_gpu": gpus > 0},
            batch_size=2048, batch_format="numpy", concurrency=n,
            # fractional CPUs: the actors must leave room for the read/repartition tasks of the same
            # pipeline, or on a small node the pool takes every CPU and the pipeline stalls
            num_gpus=1 if gpus > 0 else None, num_cpus=None if gpus > 0 else 0.5)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds.write_parquet(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out
