"""The per-worker Ray Train loop (``train_fn_per_worker``) shared by every stage of a job.

One function trains any stage from a plain dict (``StageSpec.to_loop_config()``):

* ``kind="ce"``: plain cross-entropy on labelled rows (the teacher; the from-scratch baseline);
* ``kind="kd"``: distillation with ``raydistill.ops.kd_loss`` from a frozen teacher run online (its logits
  are computed once per worker over the worker's shard when data is materialised, per batch otherwise),
  or ``kd_loss_topk`` from offline top-k teacher outputs read from parquet;
* optional gradual pruning (``GradualPruner.step`` after every optimizer step).

Every epoch each worker calls ``ray.train.report`` with the epoch's metrics; rank 0 attaches a checkpoint
(safetensors weights, optimizer/scheduler/pruner state, the epoch) that it first writes to a temporary
directory and then renames into place. On (re)start ``ray.train.get_checkpoint()`` restores all of it
and training continues at the next epoch. Rank 0 also appends each epoch's metrics to
``<progress_dir>/epochs.jsonl`` (the driver's progress display and the tests read it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.distill import checkpointing

CKPT_MODEL = "model.safetensors"
CKPT_MASKS = "masks.safetensors"
CKPT_STATE = checkpointing.STATE_JSON
CKPT_META = "meta.json"
CRASH_MARKER = ".debug_crash_done"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint_dir(dest: Path, *, model, meta: dict, state: dict | None = None,
                        masks: dict | None = None) -> Path:
    """Write a checkpoint directory atomically: fill ``<dest>.tmp-*`` and rename it to ``dest``."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
        save_file(weights, str(tmp / CKPT_MODEL))
        if masks:
            save_file({k: v.detach().cpu().to(torch.uint8).contiguous() for k, v in masks.items()},
                      str(tmp / CKPT_MASKS))
        if state is not None:
            checkpointing.save_train_state(tmp, state)  # safetensors + JSON: loading never runs code
        (tmp / CKPT_META).write_text(json.dumps(meta, indent=1, default=str))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_weights(model, path) -> dict:
    """Load ``model.safetensors`` (file, or a checkpoint dir holding one) into ``model``; returns meta."""
    from safetensors.torch import load_file

    p = Path(path)
    meta: dict = {}
    if p.is_dir():
        if (p / CKPT_META).is_file():
            meta = json.loads((p / CKPT_META).read_text())
        p = p / CKPT_MODEL
    if not p.is_file():
        raise FileNotFoundError(f"no model weights at {p}")
    _unwrap(model).load_state_dict(load_file(str(p)))
    return meta


def load_masks(path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    p = Path(path) / CKPT_MASKS
    if not p.is_file():
        return None
    return {k: v.to(torch.bool) for k, v in load_file(str(p)).items()}


def _unwrap(model):
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


# ----------------------------------------------------------------------------------------------------
# helpers


def build_optimizer(params, opt: dict):
    if opt["name"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    cls = torch.optim.AdamW if opt["name"] == "adamw" else torch.optim.Adam
    return cls(params, lr=opt["lr"], weight_decay=opt["weight_decay"])


def build_scheduler(optimizer, sched: dict, total_steps: int, lr: float):
    total_steps = max(1, int(total_steps))
    if sched["name"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=max(1e-3, sched["warmup_fraction"]))
    if sched["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else \
        torch.zeros(0, 10)
    model.train(was)
    return out


def classification_metrics(pred: np.ndarray, y: np.ndarray, num_classes: int = 10) -> dict[str, float]:
    pred, y = np.asarray(pred), np.asarray(y)
    acc = float((pred == y).mean()) if len(y) else 0.0
    f1s, recalls = [], []
    for c in range(num_classes):
        if not ((pred == c).any() or (y == c).any()):
            continue  # a class absent from labels and predictions does not count (as in sklearn)
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        if (y == c).any():
            recalls.append(tp / int((y == c).sum()))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "macro_recall": float(np.mean(recalls)) if recalls else 0.0}


def _shard_arrays(shard, columns) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy", prefetch_batches=1):
        for c in columns:
            if c in batch:
                parts[c].append(np.asarray(batch[c]))
    return {c: np.concatenate(v) for c, v in parts.items() if v}


def _to_tensors(arrays: dict, device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in arrays.items():
        if k == "x" or k == "topk_values":
            out[k] = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32, device=device)
        else:
            out[k] = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.int64, device=device)
    return out


def _wait_for_committed(run_dir: Path, epoch: int, timeout: float = 60.0) -> None:
    """Block until Ray Train's checkpoint-manager snapshot in ``run_dir`` lists ``epoch`` (debug only)."""
    if epoch < 1:
        return
    snap = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
            if int((latest.get("metrics") or {}).get("epoch", 0)) >= epoch:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------
# the loop


def train_fn_per_worker(config: dict[str, Any]) -> None:  # noqa: C901 (one readable loop)
    import ray.train
    import ray.train.torch

    from raydistill.models import build_model

    spec = config
    t_fn = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.get("threads", 1))))
    device = ray.train.torch.get_device()
    seed = int(spec["seed"])
    torch.manual_seed(seed)
    progress_dir = Path(spec["progress_dir"])
    if rank == 0:
        progress_dir.mkdir(parents=True, exist_ok=True)

    # ---- model (+ resume) ------------------------------------------------------------------------
    model = build_model(spec["model"])
    resume_state, resume_masks, start_epoch = None, None, 0
    ckpt = ray.train.get_checkpoint()
    if spec.get("structure") or spec.get("init_from") or spec.get("qat"):  # compression steps (issue 12)
        from raydistill.compress.steps import prepare_student

        prepare_student(model, spec, resuming=ckpt is not None)
    restored = checkpointing.restore(ckpt.path if ckpt is not None else None, progress_dir)
    if restored is not None:
        meta = restored["meta"]
        _unwrap(model).load_state_dict(restored["weights"])
        resume_state = restored["state"]
        resume_masks = {k: v.to(torch.bool) for k, v in restored["masks"].items()} if restored["masks"] else None
        if meta.get("config_hash") != spec["config_hash"]:
            raise RuntimeError(
                f"stage {spec['stage']!r}: the checkpoint in this run directory was written by a different "
                f"config (hash {meta.get('config_hash')} != {spec['config_hash']}); use a new run name")
        start_epoch = int(resume_state["epoch"])
    base = model.to(device)
    model = ray.train.torch.prepare_model(base)  # DDP when world > 1

    # ---- data --------------------------------------------------------------------------------------
    train_cols = ["x", "y"] + (["topk_values", "topk_indices"] if spec.get("offline") else [])
    materialize = bool(spec.get("materialize", True))
    t_data = time.time()
    shard = ray.train.get_dataset_shard("train")
    ev = _to_tensors(_shard_arrays(ray.train.get_dataset_shard("eval"), ["x", "y", "split"]), device)
    val = {k: v[ev["split"] == 0] for k, v in ev.items()}
    test = {k: v[ev["split"] == 1] for k, v in ev.items()}

    teacher = None
    if spec["kind"] == "kd" and not spec.get("offline"):
        teacher = build_model(spec["teacher"]["model"])
        load_weights(teacher, spec["teacher"]["path"])
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    t_eval_data = time.time() - t_data
    dist = spec["distill"]
    bs = int(spec["batch_size"])

    def add_teacher(batch: dict) -> dict:
        """Attach teacher logits (online) and the hard label used for unlabelled rows."""
        if teacher is not None and "t" not in batch:
            batch["t"] = predict(teacher, batch["x"])
        if spec["kind"] == "kd" and dist["hard_labels"] == "teacher_argmax":
            top1 = batch["t"].argmax(1) if "t" in batch else batch["topk_indices"][:, 0]
            batch["y"] = torch.where(batch["y"] < 0, top1, batch["y"])
        return batch

    if materialize:
        data = add_teacher(_to_tensors(_shard_arrays(shard, train_cols), device))
        n_local = len(data["x"])
        if spec["kind"] == "ce":
            keep = data["y"] >= 0
            data = {k: v[keep] for k, v in data.items()}
            n_local = len(data["x"])
    else:
        data, n_local = None, int(spec["rows_per_worker"])
    t_data = time.time() - t_data
    if world > 1:
        t = torch.tensor([n_local], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n_local = int(t.item())
    steps = int(spec.get("steps_per_epoch") or max(1, n_local // bs))
    epochs = int(spec["epochs"])
    total_steps = epochs * steps

    # ---- optimizer, schedule, pruner -------------------------------------------------------------
    opt = build_optimizer(model.parameters(), spec["optimizer"])
    sched = build_scheduler(opt, spec["lr_schedule"], total_steps, spec["optimizer"]["lr"])
    pruner = None
    comp = spec.get("compression") or {}
    if float(spec.get("sparsity") or 0.0) > 0.0:
        from raydistill.compress import GradualPruner
        from raydistill.compress.pruner import select_linear_layers

        exclude = list(comp.get("exclude") or [])
        if comp.get("keep_output_dense"):
            linears = list(select_linear_layers(base))
            if len(linears) > 1:  # a single-layer model keeps its only layer prunable
                exclude.append(linears[-1])
        pruner = GradualPruner(
            base, float(spec["sparsity"]), method=comp["method"],
            begin_step=int(comp["begin_fraction"] * total_steps),
            end_step=max(int(comp["begin_fraction"] * total_steps), int(comp["end_fraction"] * total_steps)),
            frequency=int(comp["frequency"]), include=comp.get("include"), exclude=exclude or None,
            scope=comp["scope"], n=comp["n"], m=comp["m"], block=comp["block"])
    global_step = 0
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        global_step = int(resume_state["global_step"])
        if pruner is not None and resume_state.get("pruner") is not None:
            pruner.load_state_dict(resume_state["pruner"])

    # ---- loss ----------------------------------------------------------------------------------------
    def loss_fn(logits, batch):
        if spec["kind"] == "ce":
            return F.cross_entropy(logits, batch["y"])
        from raydistill import ops

        kw = dict(temperature=dist["temperature"], divergence=dist["divergence"], beta=dist["beta"],
                  ignore_index=IGNORE_INDEX)
        y = batch["y"]
        if spec.get("offline"):
            def call(rows, labels, alpha):
                return ops.kd_loss_topk(logits[rows], batch["topk_values"][rows], batch["topk_indices"][rows],
                                        labels, alpha=alpha, **kw)
        else:
            def call(rows, labels, alpha):
                return ops.kd_loss(logits[rows], batch["t"][rows], labels, alpha=alpha, **kw)
        lab = y >= 0
        if bool(lab.all()):
            return call(slice(None), y, dist["alpha"])
        # hard_labels == "none": unlabelled rows get the soft term only (alpha = 1 for them)
        n_l = int(lab.sum())
        n_u = len(y) - n_l
        total = logits.new_zeros((), dtype=torch.float32)
        if n_l:
            total = total + n_l * call(lab, y[lab], dist["alpha"])
        if n_u:
            total = total + n_u * call(~lab, None, 1.0)
        return total / len(y)

    # ---- batches -------------------------------------------------------------------------------------
    def batches(epoch: int):
        if materialize:
            g = torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + rank)
            n = len(data["x"])
            reps = math.ceil(steps * bs / n)
            perm = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)]).to(device)
            for i in range(steps):
                idx = perm[i * bs:(i + 1) * bs]
                yield {k: v[idx] for k, v in data.items()}
        else:
            it = shard.iter_torch_batches(batch_size=bs, drop_last=True, device=device,
                                          local_shuffle_buffer_size=max(bs * 8, 1024),
                                          local_shuffle_seed=seed + epoch * 7919 + rank)
            count = 0
            for b in it:
                if count >= steps:
                    break
                b = {k: v for k, v in b.items() if k in train_cols}
                b["y"] = b["y"].long()
                if "topk_indices" in b:
                    b["topk_indices"] = b["topk_indices"].long()
                b = add_teacher(b)
                if spec["kind"] == "ce":
                    keep = b["y"] >= 0
                    b = {k: v[keep] for k, v in b.items()}
                    if not len(b["y"]):
                        continue
                count += 1
                yield b

    grad_clip = spec.get("grad_clip")
    crash_epoch = spec.get("debug_crash_at_epoch")
    crash_marker = progress_dir / CRASH_MARKER
    attempt = os.getpid()
    t_start = time.time()
    log_path = progress_dir / "epochs.jsonl"

    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.time()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_batches, n_rows = 0, 0
        for i, batch in enumerate(batches(epoch)):
            if crash_epoch and epoch == int(crash_epoch) and i == steps // 2 and rank == 0 \
                    and not crash_marker.exists():
                # report() returns before the controller commits the checkpoint (it polls): crash only once
                # the previous epoch's checkpoint is committed, so the test of "resume from the last
                # checkpoint" is deterministic
                _wait_for_committed(progress_dir, epoch - 1)
                crash_marker.write_text(f"worker pid {os.getpid()} exited on purpose at epoch {epoch} step {i}\n")
                os._exit(17)  # a real process death, not an exception
            logits = model(batch["x"])
            loss = loss_fn(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            global_step += 1
            if pruner is not None:
                pruner.step(global_step)
            loss_sum += float(loss.detach())
            n_batches += 1
            n_rows += len(batch["x"])
        train_time = time.time() - t0

        # ---- evaluate + report ---------------------------------------------------------------------
        metrics: dict[str, Any] = {"epoch": epoch, "stage": spec["stage"]}
        ckpt_obj = None
        tmp_root = None
        if rank == 0:
            from raydistill.compress import model_sparsity_report

            va = classification_metrics(predict(base, val["x"]).argmax(1).cpu().numpy(), val["y"].cpu().numpy())
            te = classification_metrics(predict(base, test["x"]).argmax(1).cpu().numpy(), test["y"].cpu().numpy())
            rep = model_sparsity_report(base, masks=pruner.masks if pruner is not None else None)
            metrics.update(
                train_loss=float(loss_sum) / max(1, n_batches), val_accuracy=va["accuracy"],
                accuracy=te["accuracy"], macro_f1=te["macro_f1"],
                sparsity=float(pruner.sparsity()) if pruner is not None else 0.0,
                compression_ratio=float(rep.compression_ratio), params=int(rep.params),
                nonzero_params=int(rep.nonzero_params), lr=float(opt.param_groups[0]["lr"]),
                epochs=epochs, samples_per_s=n_rows * world / max(train_time, 1e-9),
                epoch_seconds=train_time, global_step=global_step, macro_recall=te["macro_recall"])
            if spec["stage"] != "teacher":  # compression steps (issue 12): bytes, final latency
                from raydistill.compress.steps import final_metrics, size_metrics

                masks = pruner.masks if pruner is not None else None
                metrics.update(size_metrics(base, spec, masks))
                if epoch == epochs:
                    metrics.update(final_metrics(base, spec, masks, int(val["x"].shape[1])))
            state = {"epoch": epoch, "global_step": global_step, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "pruner": pruner.state_dict() if pruner else None}
            meta = {"epoch": epoch, "stage": spec["stage"], "config_hash": spec["config_hash"],
                    "model": spec["model"], "sparsity": metrics["sparsity"], "metrics": metrics,
                    "teacher": spec.get("teacher"), "offline": bool(spec.get("offline")),
                    "structure": spec.get("structure")}
            tmp_root = Path(tempfile.mkdtemp(prefix="raydistill-ckpt-"))
            ckdir = save_checkpoint_dir(tmp_root / f"epoch_{epoch:04d}", model=base, meta=meta, state=state,
                                        masks=pruner.masks if pruner else None)
            ckpt_obj = ray.train.Checkpoint.from_directory(str(ckdir))
        t_rep = time.time()
        ray.train.report(metrics, checkpoint=ckpt_obj)
        if rank == 0:
            shutil.rmtree(tmp_root, ignore_errors=True)
            metrics.update(attempt=attempt, wall=time.time() - t_start, time=time.time(), fn_start=t_fn,
                           setup_seconds=t_start - t_fn, data_seconds=t_data, eval_data_seconds=t_eval_data,
                           eval_seconds=t_rep - t0 - train_time, report_seconds=time.time() - t_rep)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
