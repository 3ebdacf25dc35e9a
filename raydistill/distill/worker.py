"""The per-worker Ray Train loop (``train_fn_per_worker``) shared by every stage of every task.

``train_fn_per_worker({"spec": StageSpec})`` trains any stage: ``kind="ce"`` (labels only: the teacher,
the from-scratch baseline) or ``kind="kd"`` (distillation from online teachers or offline top-k teacher
outputs), optionally pruning gradually; the loss is the stage's weighted terms (``raydistill.losses``),
what is task-specific (batches, teacher and student outputs, metrics) is behind ``raydistill.tasks``, the
loop's pieces are in ``raydistill.distill.loop``.

The checkpoints it writes (``raydistill.distill.checkpointing.save_checkpoint_dir``): a directory holds
``model.safetensors``, ``masks.safetensors`` (pruned stages),
``train_state.safetensors`` + ``train_state.json`` (optimizer / scheduler / pruner state, the epoch; read
back without unpickling anything, see ``raydistill.distill.checkpointing``) and ``meta.json``; it is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

from typing import Any

from raydistill.distill import checkpointing
# the checkpoint helpers live in checkpointing, the optimizer / schedule builders in loop; re-exported here
# for callers that import them from the worker module
from raydistill.distill.checkpointing import load_masks, load_weights, save_checkpoint_dir  # noqa: F401
from raydistill.distill.loop import CRASH_MARKER, build_optimizer, build_scheduler  # noqa: F401
from raydistill.tasks.base import IGNORE_INDEX  # noqa: F401
from raydistill.tasks.classification import classification_metrics, predict  # noqa: F401

CKPT_META = checkpointing.META_FILE  # tests/distill/test_units.py reads it from here


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: set up, then for each epoch train, evaluate and report."""
    from raydistill.distill import loop

    spec = config["spec"]                  # a StageSpec (raydistill.distill.spec)
    stage = loop.setup(spec)               # model (+ resume from ray.train.get_checkpoint()), teacher, data,
                                           # optimizer, schedule, pruner
    for epoch in range(stage.start_epoch + 1, stage.spec.epochs + 1):  # epochs: of the budget (budget.py)
        train = loop.train_epoch(stage, epoch)
        metrics = loop.evaluate(stage, epoch, train)
        loop.report(stage, epoch, metrics)  # ray.train.report(metrics, checkpoint=...) + epochs.jsonl


def load_train_state(path) -> dict:
    """The optimizer / scheduler / pruner state of a checkpoint directory (no unpickling)."""
    return checkpointing.load_train_state(path)
