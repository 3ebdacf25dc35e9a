"""The per-worker Ray Train loop (``train_fn_per_worker``) shared by every stage of every task, and the
checkpoint format it writes.

``train_fn_per_worker({"spec": StageSpec})`` trains any stage: ``kind="ce"`` (labels only: the teacher,
the from-scratch baseline) or ``kind="kd"`` (distillation from an online teacher or offline top-k
teacher outputs), optionally pruning gradually; what is task-specific (batches, teacher and student
outputs, loss terms, metrics) is behind ``raydistill.tasks``, the loop's pieces are in
``raydistill.distill.loop``.

A checkpoint directory holds ``model.safetensors``, ``masks.safetensors`` (pruned stages),
``train_state.safetensors`` + ``train_state.json`` (optimizer / scheduler / pruner state, the epoch; read
back without unpickling anything, see ``raydistill.distill.checkpointing``) and ``meta.json``; it is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from raydistill.compress.pruner import unwrap_model as _unwrap
from raydistill.distill import checkpointing
from raydistill.distill.loop import CRASH_MARKER  # noqa: F401  (tests import it from here)
from raydistill.tasks.base import IGNORE_INDEX  # noqa: F401
from raydistill.tasks.classification import classification_metrics, predict  # noqa: F401

CKPT_MODEL = "model.safetensors"
CKPT_MASKS = "masks.safetensors"
CKPT_STATE = checkpointing.STATE_JSON
CKPT_META = "meta.json"


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up, then for each epoch train, evaluate and report."""
    from raydistill.distill import loop

    spec = config["spec"]                  # a StageSpec (raydistill.distill.spec)
    stage = loop.setup(spec)               # model (+ resume from ray.train.get_checkpoint()), teacher, data,
                                           # optimizer, schedule, pruner
    for epoch in range(stage.start_epoch + 1, spec.epochs + 1):
        train = loop.train_epoch(stage, epoch)
        metrics = loop.evaluate(stage, epoch, train)
        loop.report(stage, epoch, metrics)  # ray.train.report(metrics, checkpoint=...) + epochs.jsonl


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
        # clone: tied weights (a transformer's embedding and lm_head) share storage, which safetensors refuses
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
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


def load_train_state(path) -> dict:
    """The optimizer / scheduler / pruner state of a checkpoint directory (no unpickling)."""
    return checkpointing.load_train_state(path)
