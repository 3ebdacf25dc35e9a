"""The pipeline's per-worker loop without Ray around it, for benchmarks: a ``Stage`` built as
``raydistill.distill.loop.setup`` builds it on one worker (model, frozen teacher, the materialised shard
after ``CausalLMTask.prepare``, optimizer, schedule, precision), trained with ``loop.train_epoch``."""

from __future__ import annotations

import tempfile
import time

import torch

from raydistill.distill.budget import Budget
from raydistill.distill.loop import Stage, build_criterion, build_optimizer, build_scheduler, train_epoch
from raydistill.distill.precision import Precision, lean_activations
from raydistill.distill.spec import StageSpec
from raydistill.tasks import get_task


def lm_spec(*, vocab: int, seq: int, batch: int, lr: float, temperature: float = 1.0, alpha: float = 1.0,
            precision: str = "fp32", gradient_checkpointing: bool = False, grad_clip: float | None = 1.0,
            threads: int = 1, schedule: dict | None = None) -> StageSpec:
    """A causal-LM distillation stage (fused lm_head + kd_loss, forward KL) writing its logs to a temp dir."""
    return StageSpec(stage="student", task="causal_lm", kind="kd", model={}, epochs=2, batch_size=batch,
                     optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.0, "momentum": 0.9},
                     lr_schedule=schedule or {"name": "constant", "warmup_fraction": 0.0}, seed=0,
                     progress_dir=tempfile.mkdtemp(prefix="raydistill-bench-"),
                     terms=({"type": "kd_logits", "weight": alpha, "teachers": {"main": 1.0}, "temperature": temperature,
                             "divergence": "forward_kl", "beta": 0.5}, {"type": "ce", "weight": 1.0 - alpha}),
                     fused_linear=True,
                     task_info={"vocab_size": vocab, "pad_id": 0, "eos_id": 1, "seq_len": seq}, grad_clip=grad_clip,
                     threads=threads, precision=precision, gradient_checkpointing=gradient_checkpointing)


def local_stage(spec: StageSpec, student, teacher, input_ids: torch.Tensor) -> tuple[Stage, float, float]:
    """The stage on one process, after the teacher pass; returns (stage, teacher pass wall s, CPU s)."""
    task = get_task(spec.task)
    precision = Precision(spec.precision, "cpu")
    lean_activations(student, gradient_checkpointing=spec.gradient_checkpointing)
    teachers = {"main": precision.frozen(teacher.eval().requires_grad_(False))}
    criterion = build_criterion(task, spec, student, teachers)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), precision.autocast():  # the teacher pass (one forward per row)
        train = task.prepare({"input_ids": input_ids}, spec, teachers, criterion.needs())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model = precision.compute_model(student)  # bf16 / fp16: a compute copy, student keeps the master weights
    opt = build_optimizer(precision.optimized_parameters(model), spec.optimizer)
    st = Stage(spec=spec, task=task, rank=0, world=1, device=torch.device("cpu"), base=student, model=model,
               teachers=teachers, criterion=criterion, train=train, eval={}, shard=None, steps=1, opt=opt,
               sched=build_scheduler(opt, spec.lr_schedule, 10**9, spec.optimizer["lr"]), precision=precision,
               budget=Budget(epochs=2, micro_per_epoch=1, steps_per_epoch=1, total_steps=10**9))
    return st, wall, cpu


def timed_epochs(st: Stage, warmup: int, steps: int) -> dict:
    """A warm-up epoch of ``warmup`` steps, then ``steps`` timed ones: the timed epoch's metrics plus its
    CPU seconds per step."""
    st.steps = warmup
    train_epoch(st, 1)
    st.steps = steps
    c0 = time.process_time()
    out = train_epoch(st, 2)
    return {**out, "step_s": out["epoch_seconds"] / steps, "step_cpu_s": (time.process_time() - c0) / steps}
