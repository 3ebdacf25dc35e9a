"""Offline teacher outputs: run the teacher once over the distillation rows with Ray Data and keep the
top-k logits per row in parquet, so distillation (``distill.teacher_outputs``) reads them with
``kd_loss_topk`` instead of running the teacher in every step of every run.

The teacher is held by a pool of stateful actors (``map_batches`` with a callable class and
``concurrency=N``; one GPU each when the cluster has GPUs, else a fractional CPU each, sized from the
cluster's resources), loaded once per actor. The whole pipeline runs under a deadline (``timeout_s``) and
Ray Data's wait for the actor pool is bounded, so a starved pipeline fails with a clear error.
Output columns: classification ``x``, ``y`` (-1 for unlabelled transfer rows), ``topk_values`` (float32,
k), ``topk_indices`` (int64, k); causal LM ``input_ids`` (S,), ``topk_values`` / ``topk_indices`` (S, k)
per packed block (raw logits over the tokenizer's ids). Sorted by value, descending.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydistill.config import Config, ConfigError
from raydistill.utils import check_output_dir, replace_dir_atomically


class TeacherTopK:
    """Ray Data callable class: one teacher per actor, applied to numpy batches. Classification rows
    (``x``) get ``(k,)`` logits per row; causal-LM blocks (``input_ids``) get ``(S, k)`` per block (top-k
    over the tokenizer's ids at every position)."""

    def __init__(self, model: dict, path: str, topk: int, use_gpu: bool = False, task: str = "classification",
                 task_info: dict | None = None):
        import torch

        from raydistill.distill.checkpointing import load_weights
        from raydistill.tasks import get_task

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.task = task
        self.info = dict(task_info or {})
        self.model = get_task(task).build_model(model, self.info)
        load_weights(self.model, path)
        self.model.to(self.device).eval()
        self.topk = int(topk)

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.no_grad():
            if self.task == "causal_lm":
                from raydistill.tasks.causal_lm import lm_logits, shared_vocab

                ids = torch.as_tensor(np.ascontiguousarray(batch["input_ids"]), dtype=torch.int64, device=self.device)
                logits = shared_vocab(lm_logits(self.model, ids), int(self.info["vocab_size"]))
            else:
                x = torch.as_tensor(np.ascontiguousarray(batch["x"]), dtype=torch.float32, device=self.device)
                logits = self.model(x)
            vals, idx = logits.float().topk(self.topk, dim=-1)
        batch["topk_values"] = vals.cpu().numpy().astype(np.float32)
        batch["topk_indices"] = idx.cpu().numpy().astype(np.int64)
        return batch


def default_output(storage: Path, teacher_hash: str, topk: int) -> Path:
    return storage / "teacher_outputs" / f"{teacher_hash}-k{topk}"


def write_teacher_outputs(cfg: Config, *, storage_path=None, output=None, topk: int | None = None,
                          concurrency: int | None = None, address: str | None = None,
                          timeout_s: float = 900.0) -> Path:
    """Train/load the teacher, then write its top-k logits over train + transfer rows to parquet."""
    from raydistill.distill.session import ray_session
    from raydistill.distill.data import resolve_storage, stage_datasets, task_info
    from raydistill.distill.teachers import ensure_teacher

    if cfg.distill.teacher_outputs:
        raise ConfigError("distill.teacher_outputs is set: teacher-logits writes those outputs; unset it")
    k = int(topk or cfg.distill.topk)
    lm = cfg.data.task == "causal_lm"
    if not 1 <= k <= (10 if not lm else 1 << 20):
        raise ConfigError(f"distill.topk must be in 1..10 (10 classes), got {k}")
    storage = resolve_storage(storage_path, cfg)
    out_key = "--output" if output else "teacher-logits output directory"
    if output:  # before Ray starts
        check_output_dir(output, key=out_key, error=ConfigError)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": str(storage)})})
    with ray_session(address=address) as ray:
        teacher = ensure_teacher(cfg, storage)
        out = Path(output).expanduser().absolute() if output else default_output(storage, teacher.config_hash, k)
        check_output_dir(out, key=out_key, error=ConfigError)
        gpus = ray.cluster_resources().get("GPU", 0)
        n, actor_cpus = _pool_size(ray, concurrency, gpus)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        old_wait = ctx.wait_for_min_actors_s
        # never wait forever for the actor pool (Ray Data's default): if the actors cannot be scheduled
        # (the cluster's CPUs are held by other work) fail with a clear error instead of hanging
        ctx.wait_for_min_actors_s = int(min(timeout_s, 300))
        try:
            datasets, _ = stage_datasets(cfg, storage, "kd")  # the datasets copy the context at creation
            info = task_info(cfg, storage)
            if lm and k > info["vocab_size"]:
                raise ConfigError(f"distill.topk ({k}) exceeds the tokenizer's vocabulary ({info['vocab_size']})")
        finally:
            ctx.wait_for_min_actors_s = old_wait
        ds = datasets["train"]
        if n > 1:
            ds = ds.repartition(n)
        ds = ds.map_batches(
            TeacherTopK, fn_constructor_kwargs={"model": teacher.model, "path": teacher.path, "topk": k,
                                                "use_gpu": gpus > 0, "task": cfg.data.task, "task_info": info},
            batch_size=64 if lm else 2048, batch_format="numpy", concurrency=n,
            # fractional CPUs: the actors leave room for the read / write tasks of the same pipeline (and
            # for whatever else runs on the cluster), or on a small node the pool can starve the pipeline
            num_gpus=1 if gpus > 0 else None, num_cpus=None if gpus > 0 else actor_cpus)
        # a temporary sibling renamed into place; an existing directory is replaced only when it is an
        # earlier output of ours (its marker), never a file, a link or someone else's directory
        out = replace_dir_atomically(out, lambda tmp: _run_with_deadline(lambda: ds.write_parquet(str(tmp)),
                                                                          timeout_s, ray),
                                     key=out_key, error=ConfigError, description="teacher-logits")
    return out


def _pool_size(ray, concurrency: int | None, gpus: float) -> tuple[int, float]:
    """Teacher actors and CPUs per actor, from the cluster's resources: on a small CPU node one or two
    actors with a fractional CPU each, so the pool can never take every CPU the pipeline's tasks need."""
    if concurrency is not None and int(concurrency) < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    cpus = float(ray.cluster_resources().get("CPU", 1))
    free = float(ray.available_resources().get("CPU", 0.0))
    if gpus > 0:
        return int(concurrency or max(1, int(gpus))), 0.0
    n = int(concurrency or (1 if cpus < 4 else min(4, int(cpus // 2))))
    # each actor gets at most half a CPU, and together at most half of what is free now (>= 0.1 each)
    per = max(0.1, min(0.5, round(max(free, 0.2) / (2 * n), 2)))
    return n, per


def _run_with_deadline(fn, timeout_s: float, ray) -> None:
    """Run the Ray Data pipeline in a thread and fail (instead of hanging) after ``timeout_s``."""
    import threading

    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    th = threading.Thread(target=target, name="teacher-logits", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(
            f"teacher-logits: the Ray Data pipeline did not finish within {timeout_s:.0f} s (cluster CPUs "
            f"{ray.cluster_resources().get('CPU')}, free now {ray.available_resources().get('CPU', 0)}); "
            "other work may hold the cluster's resources. Re-run with a larger timeout or on an idle cluster.")
    if "error" in box:
        raise box["error"]
