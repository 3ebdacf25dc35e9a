"""``StageSpec``: everything one Ray Train stage needs, typed and frozen (what ``train_fn_per_worker`` gets);
``TeacherArtifact``: a trained teacher on the driver.

The driver builds it from the validated ``Config`` (``stages.stage_spec``); the worker reads only this.
``config_hash`` covers what changes what the stage learns (not where it runs), so a checkpoint written
by another config is refused on resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from raydistill.config import Config, config_hash, without_scale_defaults


@dataclass(frozen=True)
class TeacherRef:
    """A frozen teacher: a checkpoint directory (or .safetensors file) and the model that loads it."""

    path: str
    model: dict


@dataclass
class TeacherArtifact:
    """A trained (frozen) teacher: ``path`` is a checkpoint dir holding ``model.safetensors``."""

    path: str
    accuracy: float
    config_hash: str
    model: dict = field(default_factory=dict)  # {"model": name, "kwargs": {...}}
    cached: bool = False
    metrics: dict = field(default_factory=dict)  # the task's test metrics (causal LM: perplexity, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def model_dict(m) -> dict:
    """A ``ModelSpec`` (teacher, student, assistant) as the ``{"model": name, "kwargs": {...}}`` a stage builds."""
    return {"model": m.model, "kwargs": dict(m.kwargs)}


@dataclass(frozen=True)
class StageSpec:
    stage: str                              # teacher | baseline | dense_student | student | assistant_i
    task: str                               # a name of raydistill.tasks.TASKS
    kind: Literal["ce", "kd"]               # ce: labels only (teacher, baseline); kd: distillation
    model: dict                             # {"model": name, "kwargs": {...}}
    epochs: int
    batch_size: int
    optimizer: dict                         # OptimizerConfig dump
    lr_schedule: dict                       # ScheduleConfig dump
    seed: int
    progress_dir: str                       # rank 0 appends epochs.jsonl here
    sparsity: float = 0.0
    compression: dict | None = None         # CompressionConfig dump when sparsity > 0
    # the loss: resolved term specs (raydistill.losses; Config.loss_terms()); a ce stage: [ce]
    terms: tuple[dict, ...] = ({"type": "ce", "weight": 1.0},)
    teachers: dict[str, TeacherRef] = field(default_factory=dict)   # the teachers that run (by name)
    teacher_hashes: dict[str, str] = field(default_factory=dict)    # every teacher's config hash
    offline_teacher: str | None = None      # the teacher read from top-k outputs (parquet columns)
    hard_labels: Literal["teacher_argmax", "none"] = "teacher_argmax"   # unlabelled rows (classification)
    fused_linear: bool = False              # causal LM: lm_head + kd_loss fused (ops.kd_loss_linear)
    steps_per_epoch: int | None = None      # None: this worker's rows // batch_size
    materialize: bool = True
    rows_per_worker: int = 0
    threads: int = 1
    grad_clip: float | None = None
    debug_crash_at_epoch: int | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"                   # how several workers hold the model
    task_info: dict[str, Any] = field(default_factory=dict)   # causal_lm: vocab_size, pad_id, eos_id, ...
    # compression steps (issue 12; raydistill.distill.steps.student_extras): the student's pruned hidden
    # widths (prune_structured), the weights it starts from, fake quantization while training (QAT), and
    # the compression.quantize recipe (sizes, the final conversion)
    structure: dict | None = None
    init_from: str | None = None
    qat: dict | None = None
    quantize: dict | None = None
    # training at scale (issue 22; raydistill.config.ScaleKeys): compute dtype, micro-batches per optimizer
    # step, activation checkpointing, the budget in optimizer steps (None: epochs), step reports
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    max_steps: int | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 10
    debug_crash_at_step: int | None = None
    config_hash: str = ""

    # fields that do not change what the stage learns
    _RUN_ONLY = ("progress_dir", "threads", "materialize", "rows_per_worker", "debug_crash_at_epoch",
                 "config_hash", "strategy", "gradient_checkpointing", "checkpoint_every_steps", "log_every_steps",
                 "debug_crash_at_step")
    # issue 22's fields that change what is learned, left out of the hash at these defaults (so the hashes
    # of stages that do not use them, and the checkpoints written before them, stay valid)
    _NEW_DEFAULTS = {"precision": "fp32", "grad_accum_steps": 1, "max_steps": None}

    def learning_fields(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self._RUN_ONLY:
            d.pop(k, None)
        if d.get("max_steps") is not None:
            d.pop("epochs")  # derived from max_steps and the rows per worker: the budget is max_steps
        for k, v in self._NEW_DEFAULTS.items():
            if d.get(k) == v:
                d.pop(k)
        if isinstance(d.get("lr_schedule"), dict) and not d["lr_schedule"].get("warmup_steps"):
            d["lr_schedule"] = {k: v for k, v in d["lr_schedule"].items() if k != "warmup_steps"}
        d.pop("teachers", None)  # their paths move with the storage; teacher_hashes identify them
        return d

    @property
    def offline(self) -> bool:
        """Distillation from top-k teacher outputs (the train rows carry them)."""
        return self.offline_teacher is not None

    def replace(self, **changes) -> "StageSpec":
        return dataclasses.replace(self, **changes)


def teacher_config(cfg: Config, teacher: str | None = None):
    """The config of teacher ``teacher`` (None: the first of ``teacher`` / ``teachers``)."""
    return cfg.teacher_map()[teacher or next(iter(cfg.teacher_map()))]


def teacher_hash(cfg: Config, teacher: str | None = None) -> str:
    """What teacher ``teacher`` (None: the first) learns from: its model, training budget, data and seed
    (issue 22's keys at their defaults and ``teacher_outputs`` left out: the hash of before)."""
    tc = teacher_config(cfg, teacher)
    return config_hash({"teacher": without_scale_defaults(tc.model_dump(mode="json",
                                                                         exclude={"checkpoint", "teacher_outputs"})),
                        "data": cfg.data.learning_dump(),
                        "seed": cfg.run.seed})
