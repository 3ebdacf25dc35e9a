"""``raydistill bench distill-throughput``: steady-state samples/s of the Ray Train distillation loop vs a
plain single-process PyTorch loop with the same model, batch, loss (kd_loss) and optimizer; and 1 vs 2
Ray Train workers (DDP).

The Ray numbers come from the workers' own per-epoch timing of the training steps (``samples_per_s`` in
``epochs.jsonl``), first epoch dropped as warm-up; ``epoch_samples_per_s`` also counts the per-epoch
evaluation, checkpoint and ``ray.train.report`` (wall time between consecutive epochs). Writes a table and
``benchmarks/results/distill_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raydistill.utils import results_dir



def _plain_loop(cfg, storage: Path, teacher, epochs: int) -> dict:
    """The same loop without Ray: materialised tensors, precomputed teacher logits, kd_loss, AdamW."""
    import numpy as np
    import torch

    from raydistill import ops
    from raydistill.distill.checkpointing import load_weights
    from raydistill.distill.loop import build_optimizer, build_scheduler
    from raydistill.models import build_model
    from raydistill.tasks.classification import load_arrays, predict

    torch.set_num_threads(1)
    torch.manual_seed(0)
    split, transfer = load_arrays(cfg, storage)
    x = torch.from_numpy(np.concatenate([split.x_train, transfer]))
    y = torch.from_numpy(np.concatenate([split.y_train, np.full(len(transfer), -1, np.int64)]))
    t_net = build_model(teacher.model)
    load_weights(t_net, teacher.path)
    t = predict(t_net, x)
    y = torch.where(y < 0, t.argmax(1), y)
    model = build_model(cfg.student)
    d = cfg.distill
    bs = d.batch_size
    steps = len(x) // bs
    opt = build_optimizer(model.parameters(), d.optimizer.model_dump())
    sched = build_scheduler(opt, d.lr_schedule.model_dump(), steps * epochs, d.optimizer.lr)
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        t0 = time.perf_counter()
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = ops.kd_loss(model(x[idx]), t[idx], y[idx], temperature=d.temperature, alpha=d.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if d.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
            opt.step()
            sched.step()
        rates.append(steps * bs / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates[1:] or rates), "per_epoch": rates}


def _ray_loop(cfg, storage: Path, teacher, epochs: int, workers: int, tag: str) -> dict:
    from raydistill.distill import build_student_trainer

    name = f"{tag}_w{workers}_{int(time.time())}"
    t0 = time.time()
    build_student_trainer(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"epochs": epochs})}),
                          teacher, storage_path=storage / "bench", name=name, num_workers=workers,
                          resources_per_worker={"CPU": 1}, sparsity=0.0).fit()
    wall = time.time() - t0
    rows = [json.loads(line) for line in (storage / "bench" / name / "epochs.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    ep_rates = [rows[i]["samples_per_s"] * rows[i]["epoch_seconds"] / max(1e-9, rows[i]["time"] - rows[i - 1]["time"])
                for i in range(1, len(rows))]
    return {"workers": workers, "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "epoch_samples_per_s": statistics.median(ep_rates) if ep_rates else None,
            "per_epoch": [r["samples_per_s"] for r in rows], "fit_wall_seconds": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raydistill bench distill-throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="default: the embedded default config")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (first is warm-up)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--storage-path", default=None, help="default: a temp dir (the teacher is trained there)")
    ap.add_argument("--out", default=str(results_dir() / "distill_throughput.json"))
    args = ap.parse_args(argv)
    if args.epochs < 2:
        print("raydistill bench distill-throughput: error: --epochs must be >= 2 (one warm-up)", file=sys.stderr)
        return 2
    from raydistill.config import ConfigError, load_config
    from raydistill.distill import ensure_teacher, ray_session

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"raydistill bench distill-throughput: error: {exc}", file=sys.stderr)
        return 2
    storage = Path(args.storage_path or tempfile.mkdtemp(prefix="rd-bench-")).resolve()
    with ray_session() as ray:
        teacher = ensure_teacher(cfg, storage)
        plain = _plain_loop(cfg, storage, teacher, args.epochs)
        rays = []
        for w in args.workers:
            if w > int(ray.cluster_resources().get("CPU", 1)):
                print(f"skipping {w} workers: only {ray.cluster_resources().get('CPU')} CPUs", file=sys.stderr)
                continue
            rays.append(_ray_loop(cfg, storage, teacher, args.epochs, w, "tp"))
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
           "student": cfg.student.model_dump(), "batch_size": cfg.distill.batch_size, "epochs": args.epochs,
           "threads_per_process": 1, "plain": plain, "ray": rays,
           "ratio_ray1_vs_plain": (rays[0]["samples_per_s"] / plain["samples_per_s"]) if rays else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| loop | workers | samples/s (train steps) | vs plain | samples/s incl. eval+checkpoint+report |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain PyTorch | 1 | {plain['samples_per_s']:,.0f} | 1.00x | |")
    for r in rays:
        eps = f"{r['epoch_samples_per_s']:,.0f}" if r["epoch_samples_per_s"] else ""
        print(f"| Ray Train | {r['workers']} | {r['samples_per_s']:,.0f} | "
              f"{r['samples_per_s'] / plain['samples_per_s']:.2f}x | {eps} |")
    print(f"results: {args.out}")
    return 0
