"""Config -> a typed ``StageSpec`` -> a Ray Train ``TorchTrainer`` for each stage of a job.

Public API (the Tune search codes against it)::

    build_student_trainer(cfg, teacher, *, storage_path, name, callbacks=None, num_workers=None,
                          resources_per_worker=None) -> ray.train.torch.TorchTrainer
    build_baseline_trainer(cfg, *, storage_path, name, ...)   the student from scratch, same budget
    build_teacher_trainer(cfg, *, storage_path, name, ...)    the teacher, cross-entropy

A trainer with ``storage_path=S, name=N`` keeps its Ray checkpoints in ``S/N/checkpoint_*`` and its
per-epoch metrics log in ``S/N/epochs.jsonl``. Running the same (S, N) again resumes from the latest
checkpoint (Ray Train V2 restores the run's checkpoint-manager snapshot; the worker picks it up with
``ray.train.get_checkpoint()``), so an interrupted run loses at most the epoch in progress.
"""

from __future__ import annotations

import math
from pathlib import Path

from raydistill.config import Config, config_hash
from raydistill.distill.data import distill_rows, resolve_storage, stage_datasets, task_info
from raydistill.distill.spec import StageSpec, TeacherArtifact, TeacherRef, model_dict, teacher_config

def _threads(resources: dict | None) -> int:
    cpu = (resources or {}).get("CPU", 1)
    return max(1, int(math.floor(float(cpu) + 1e-9)))


def _result_hash(cfg: Config, spec: StageSpec) -> str:
    """Hash of everything that changes what a stage learns (not where it runs)."""
    payload = spec.learning_fields()
    payload["task_info"] = {k: v for k, v in payload["task_info"].items() if k != "tokenizer_dir"}
    payload["data"] = cfg.data.learning_dump()
    payload["transfer_set"] = cfg.distill.transfer_set.model_dump(mode="json") \
        if spec.kind == "kd" and _task(cfg).uses_transfer_set else None
    payload["teacher_outputs"] = cfg.teacher_outputs_path() if spec.offline else None
    if spec.offline and cfg.distill.topk_tail is not None:
        payload["topk_tail"] = cfg.distill.topk_tail
    return config_hash(payload)


def _task(cfg: Config):
    from raydistill.tasks import get_task

    return get_task(cfg.data.task)


def teacher_set(cfg: Config, teachers: "TeacherArtifact | dict[str, TeacherArtifact]") -> dict[str, TeacherArtifact]:
    """The job's teachers by name; one ``TeacherArtifact`` is the first teacher (``teacher``)."""
    if isinstance(teachers, TeacherArtifact):
        return {next(iter(cfg.teacher_map())): teachers}
    return dict(teachers)


def stage_spec(cfg: Config, *, stage: str, kind: str, model: dict, epochs: int | None, batch_size: int,
               optimizer: dict, lr_schedule: dict, sparsity: float = 0.0,
               teachers: dict[str, TeacherArtifact] | None = None, steps_per_epoch: int | None = None,
               rows: int = 0, num_workers: int = 1, progress_dir: Path, threads: int = 1,
               info: dict | None = None, extras: dict | None = None, training=None) -> StageSpec:
    """``kind`` ``kd``: the config's loss terms over ``teachers`` (name -> artifact; the one read from top-k
    outputs runs on no worker); ``ce``: cross-entropy alone. ``extras``: the compression-step fields of a
    student stage (``structure``, ``init_from``, ``qat``, ``quantize``;
    :func:`raydistill.distill.steps.student_extras`); None values are left at their default. ``epochs``
    None: the budget of the stage's section (``max_steps`` / ``max_tokens``, issue 22); ``training``: that
    section (default: the first teacher's ``training`` for the teacher stage, else ``distill``)."""
    d = cfg.distill
    info = dict(info or {})
    materialize = bool(info.pop("materialize", cfg.data.materialize))  # the corpus decides (data.text)
    teachers = dict(teachers or {}) if kind == "kd" else {}
    offline = cfg.offline_teacher() if kind == "kd" else None
    section = training or (cfg.teacher.training if stage == "teacher" else d)
    scale = _scale_fields(section, epochs=epochs, batch_size=batch_size, rows=rows, num_workers=num_workers,
                          steps_per_epoch=steps_per_epoch, info=info)
    spec = StageSpec(
        stage=stage, task=cfg.data.task, kind=kind, model=model, batch_size=int(batch_size), **scale,
        optimizer=optimizer, lr_schedule=lr_schedule, seed=int(cfg.run.seed), progress_dir=str(progress_dir),
        sparsity=float(sparsity),
        compression=cfg.compression.model_dump(mode="json", exclude={"structured", "quantize", "order"})
        if sparsity > 0 else None,
        terms=tuple(cfg.loss_terms()) if kind == "kd" else ({"type": "ce", "weight": 1.0},),
        teachers={n: TeacherRef(t.path, t.model) for n, t in teachers.items() if n != offline},
        teacher_hashes={n: t.config_hash for n, t in teachers.items()}, offline_teacher=offline,
        hard_labels=d.transfer_set.hard_labels, fused_linear=bool(d.fused_linear),
        steps_per_epoch=steps_per_epoch, materialize=materialize,
        rows_per_worker=int(rows // max(1, num_workers)), threads=int(threads),
        grad_clip=d.grad_clip if stage != "teacher" else None,  # the baseline too: same optimizer
        debug_crash_at_epoch=cfg.run.debug_crash_at_epoch, debug_crash_at_step=cfg.run.debug_crash_at_step,
        strategy=cfg.scaling.strategy, task_info=info)
    spec = spec.replace(**{k: v for k, v in (extras or {}).items() if v is not None})  # issue 12 steps
    return spec.replace(config_hash=_result_hash(cfg, spec))


def _scale_fields(sec, *, epochs: int | None, batch_size: int, rows: int, num_workers: int,
                  steps_per_epoch: int | None, info: dict | None) -> dict:
    """The StageSpec fields of a section's issue-22 keys (``distill`` or ``teacher.training``): a token
    budget becomes optimizer steps; with a budget, ``epochs`` is the estimate from the rows per worker (the
    worker plans again from its shard, raydistill.distill.budget.plan). An explicit ``epochs`` (an
    assistant's, QAT fine-tuning's) is the stage's budget."""
    from raydistill.distill.budget import plan, steps_for_tokens

    accum = int(sec.grad_accum_steps)
    max_steps = None
    if epochs is None:
        max_steps = sec.max_steps
        if sec.max_tokens is not None:
            max_steps = steps_for_tokens(sec.max_tokens, batch_size=batch_size, accum=accum, workers=num_workers,
                                         seq_len=int((info or {})["seq_len"]))
        micro = steps_per_epoch or max(1, (rows // max(1, num_workers)) // max(1, batch_size))
        epochs = plan(None, max_steps, micro, accum).epochs
    return dict(epochs=int(epochs), max_steps=max_steps, precision=sec.precision, grad_accum_steps=accum,
                gradient_checkpointing=bool(sec.gradient_checkpointing),
                checkpoint_every_steps=sec.checkpoint_every_steps, log_every_steps=int(sec.log_every_steps))


def make_trainer(cfg: Config, spec: StageSpec, datasets: dict, *, storage_path: Path, name: str,
                 callbacks=None, num_workers: int | None = None, resources_per_worker: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydistill.distill.checkpointing import prepare_run_dir
    from raydistill.distill.session import train_env
    from raydistill.distill.worker import train_fn_per_worker

    train_env()
    # a damaged checkpoint, a deleted checkpoint directory or a truncated Ray snapshot: resume from what
    # is intact on disk instead of failing (see raydistill.distill.checkpointing)
    prepare_run_dir(Path(storage_path) / name)
    scaling = ScalingConfig(num_workers=int(num_workers or cfg.scaling.num_workers),
                            use_gpu=bool(cfg.scaling.use_gpu),
                            resources_per_worker=resources_per_worker or cfg.scaling.resources_per_worker)
    run = RunConfig(name=name, storage_path=str(storage_path),
                    failure_config=FailureConfig(max_failures=int(cfg.run.max_failures)),
                    checkpoint_config=CheckpointConfig(num_to_keep=int(cfg.run.num_to_keep)),
                    callbacks=list(callbacks or []))
    return TorchTrainer(train_fn_per_worker, train_loop_config={"spec": spec}, scaling_config=scaling, run_config=run,
                        datasets=datasets, dataset_config=data_config(spec, datasets.get("train")))


def data_config(spec: StageSpec, train=None):
    """How Ray Train splits the datasets: ``train`` over the workers. A streamed train set (not materialised,
    or an offline teacher's cache: read lazily, also when the workers then hold it) is split in a fixed order
    -- Ray Data keeps the read order and the splitter hands out blocks by row counts, not by where they are --
    so every epoch gives each worker the same rows in the same order and a run resumed mid-epoch re-reads
    exactly the batches it skips (issue 22); a worker that holds its rows holds them in the same order. These
    options replace the train dataset's own: an offline teacher's cache (``train``) keeps its object-store
    budget, the bound on the decoded rows queued ahead of the workers
    (``raydistill.data.topk_cache.read_dataset``)."""
    from ray.train import DataConfig

    if spec.materialize and not spec.offline:
        return DataConfig(datasets_to_split=["train"])
    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    if spec.offline and train is not None:
        opts.resource_limits = train.context.execution_options.resource_limits
    return DataConfig(datasets_to_split=["train"], execution_options={"train": opts}, enable_shard_locality=False)


def _workers_and_threads(cfg: Config, num_workers, resources_per_worker) -> tuple[int, dict | None, int]:
    nw = int(num_workers or cfg.scaling.num_workers)
    res = resources_per_worker or cfg.scaling.resources_per_worker
    return nw, res, _threads(res)


def build_teacher_trainer(cfg: Config, *, storage_path, name: str, callbacks=None, num_workers=None,
                          resources_per_worker=None, data_root=None, teacher: str | None = None):
    """Teacher ``teacher`` (a name of ``Config.teacher_map()``; None: the first) trained with cross-entropy."""
    tc = teacher_config(cfg, teacher)
    storage = resolve_storage(storage_path)
    data_storage = resolve_storage(data_root) if data_root else storage
    datasets, rows, _ = stage_datasets(cfg, data_storage, "ce")
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    t = tc.training
    spec = stage_spec(cfg, stage="teacher", kind="ce", model=model_dict(tc), epochs=t.epochs,
                      batch_size=t.batch_size, optimizer=t.optimizer.model_dump(),
                      lr_schedule=t.lr_schedule.model_dump(), rows=rows, num_workers=nw,
                      progress_dir=storage / name, threads=threads, info=task_info(cfg, data_storage), training=t)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def student_steps_per_epoch(cfg: Config, rows: int, num_workers: int) -> int:
    return max(1, (rows // max(1, num_workers)) // cfg.distill.batch_size)


def build_student_trainer(cfg: Config, teacher: TeacherArtifact | dict[str, TeacherArtifact], *, storage_path,
                          name: str, callbacks=None, num_workers: int | None = None,
                          resources_per_worker: dict | None = None, stage: str = "student",
                          model: dict | None = None, sparsity: float | None = None, epochs: int | None = None,
                          extras: dict | None = None, lr: float | None = None):
    """A ``TorchTrainer`` distilling the teachers (``teacher``: name -> artifact, or the first teacher's
    artifact alone) into the config's student through the config's loss terms (pruned to
    ``compression.sparsity`` unless ``sparsity`` is given). Workers report per-epoch ``epoch,
    train_loss, val_accuracy, accuracy, sparsity, compression_ratio, lr`` (+ macro_f1, params, ...) and
    a checkpoint every epoch. ``extras``: compression-step entries of the spec
    (:func:`raydistill.distill.steps.student_extras`). ``epochs`` / ``lr``: this stage's epochs and peak
    learning rate (None: ``distill.epochs`` / ``distill.optimizer.lr``)."""
    storage = resolve_storage(storage_path)
    datasets, rows, materialize = stage_datasets(cfg, storage, "kd")
    info = task_info(cfg, storage) | ({} if materialize is None else {"materialize": materialize})
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    sp = cfg.compression.sparsity if sparsity is None else float(sparsity)
    spec = stage_spec(cfg, stage=stage, kind="kd", model=model or model_dict(cfg.student), epochs=epochs or d.epochs,
                      batch_size=d.batch_size, optimizer=d.optimizer.model_dump() | ({"lr": lr} if lr else {}),
                      lr_schedule=d.lr_schedule.model_dump(), sparsity=sp, teachers=teacher_set(cfg, teacher),
                      rows=rows,
                      num_workers=nw, progress_dir=storage / name, threads=threads, info=info, extras=extras)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def build_baseline_trainer(cfg: Config, *, storage_path, name: str, callbacks=None, num_workers=None,
                           resources_per_worker=None):
    """The student trained from scratch with cross-entropy on the labelled rows only, with the same
    budget as the distilled student: same epochs, optimizer, schedule and optimizer steps per epoch (the
    labelled rows are cycled to fill an epoch of the student's length)."""
    storage = resolve_storage(storage_path)
    datasets, rows, _ = stage_datasets(cfg, storage, "ce")
    n_distill = distill_rows(cfg, storage)
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    spec = stage_spec(cfg, stage="baseline", kind="ce", model=model_dict(cfg.student), epochs=d.epochs,
                      batch_size=d.batch_size, optimizer=d.optimizer.model_dump(),
                      lr_schedule=d.lr_schedule.model_dump(),
                      steps_per_epoch=student_steps_per_epoch(cfg, n_distill, nw), rows=rows,
                      num_workers=nw, progress_dir=storage / name, threads=threads, info=task_info(cfg, storage))
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)
