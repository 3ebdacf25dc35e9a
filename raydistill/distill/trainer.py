"""Config -> Ray Train ``TorchTrainer`` for each stage of a job; the teacher cache; checkpoint evaluation.

Public API (the Tune search codes against it)::

    ensure_teacher(cfg, storage_path) -> TeacherArtifact
    build_student_trainer(cfg, teacher, *, storage_path, name, callbacks=None, num_workers=None,
                          resources_per_worker=None) -> ray.train.torch.TorchTrainer
    evaluate_checkpoint(cfg, checkpoint_path) -> dict

A trainer with ``storage_path=S, name=N`` keeps its Ray checkpoints in ``S/N/checkpoint_*`` and its
per-epoch metrics log in ``S/N/epochs.jsonl``. Running the same (S, N) again resumes from the latest
checkpoint (Ray Train V2 restores the run's checkpoint-manager snapshot; the worker picks it up with
``ray.train.get_checkpoint()``), so an interrupted run loses at most the epoch in progress.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raydistill.config import Config, ConfigError, config_hash
from raydistill.distill.spec import KDTerms, StageSpec, TeacherRef
from raydistill.utils import write_json_atomic

log = logging.getLogger("raydistill")

TEACHER_FILE = "teacher.json"


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


# ----------------------------------------------------------------------------------------------------
# paths, data


def resolve_storage(storage_path: str | os.PathLike | None, cfg: Config | None = None) -> Path:
    p = storage_path or (cfg.run.storage_path if cfg is not None else None) or "runs"
    return Path(p).expanduser().resolve()


def _data_cache(storage: Path) -> Path:
    return storage / "datasets"


def load_arrays(cfg: Config, storage: Path):
    from raydistill.data import load_mnist1d, load_transfer_set

    split = load_mnist1d(cfg.data, _data_cache(storage))
    transfer = load_transfer_set(cfg.data, cfg.distill.transfer_set, _data_cache(storage))
    return split, transfer


def _eval_datasets(split) -> dict:
    from raydistill.data import to_ray_dataset

    # one small dataset (split column: 0 = val, 1 = test) -> one Ray Data execution per worker start
    return {"eval": to_ray_dataset(
        x=np.concatenate([split.x_val, split.x_test]), y=np.concatenate([split.y_val, split.y_test]),
        split=np.concatenate([np.zeros(len(split.y_val), np.int64), np.ones(len(split.y_test), np.int64)]))}


def labelled_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    from raydistill.data import to_ray_dataset

    split, _ = load_arrays(cfg, storage)
    return {"train": to_ray_dataset(x=split.x_train, y=split.y_train), **_eval_datasets(split)}, len(split.y_train)


def distill_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    """Labelled train rows + unlabelled transfer rows (``y = -1``), or the offline teacher-output parquet."""
    from raydistill.data import to_ray_dataset
    from raydistill.data.ray_data import UNLABELLED

    split, transfer = load_arrays(cfg, storage)
    if cfg.distill.teacher_outputs:
        from raydistill.distill.offline import offline_dataset

        ds, rows = offline_dataset(cfg)  # checked, streamed and decoded by Ray Data
        return {"train": ds, **_eval_datasets(split)}, rows
    x = np.concatenate([split.x_train, transfer])
    y = np.concatenate([split.y_train, np.full(len(transfer), UNLABELLED, np.int64)])
    return {"train": to_ray_dataset(x=x, y=y), **_eval_datasets(split)}, len(y)


def text_data(cfg: Config, storage: Path):
    """Causal LM: the tokenized, packed corpus (Ray Data; cached) -- see ``raydistill.data.text``."""
    from raydistill.data.text import prepare_text
    from raydistill.models.hf import check_vocab, hf_config_dict

    # one tokenizer and one packed corpus per storage root, shared by the teacher cache and every run
    root = resolve_storage(cfg.run.storage_path) if cfg.run.storage_path else storage
    td = prepare_text(cfg.data, root)
    for key, spec in (("teacher", cfg.teacher), ("student", cfg.student)):
        if spec.model == "hf":  # a trained BPE may be smaller than data.vocab_size: check again
            conf = hf_config_dict(spec.kwargs)
            try:
                check_vocab(f"{key}.kwargs", conf.get("vocab_size"), td.vocab_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return td


def task_info(cfg: Config, storage: Path) -> dict:
    if cfg.data.task != "causal_lm":
        return {}
    td = text_data(cfg, storage)
    return {**td.info(), "seq_len": cfg.data.seq_len}


def lm_datasets(cfg: Config, storage: Path) -> tuple[dict, int]:
    """Packed ``input_ids`` blocks: train, and one eval dataset (split column: 0 = val, 1 = test)."""
    from raydistill.data import to_ray_dataset

    td = text_data(cfg, storage)
    ev = np.concatenate([td.val, td.test])
    split = np.concatenate([np.zeros(len(td.val), np.int64), np.ones(len(td.test), np.int64)])
    eval_ds = {"eval": to_ray_dataset(input_ids=ev.astype(np.int64), split=split)}
    if cfg.distill.teacher_outputs:
        from raydistill.distill.offline import offline_dataset

        ds, rows = offline_dataset(cfg, td.tokenizer_dir)  # checked, streamed and decoded by Ray Data
        return {"train": ds, **eval_ds}, rows
    return {"train": to_ray_dataset(input_ids=td.train.astype(np.int64)), **eval_ds}, len(td.train)


def stage_datasets(cfg: Config, storage: Path, kind: str) -> tuple[dict, int]:
    if cfg.data.task == "causal_lm":
        if kind == "ce":
            return lm_datasets(cfg.model_copy(update={"distill": cfg.distill.model_copy(
                update={"teacher_outputs": None})}), storage)
        return lm_datasets(cfg, storage)
    return labelled_datasets(cfg, storage) if kind == "ce" else distill_datasets(cfg, storage)


# ----------------------------------------------------------------------------------------------------
# stage specs -> TorchTrainer


def _threads(resources: dict | None) -> int:
    cpu = (resources or {}).get("CPU", 1)
    return max(1, int(math.floor(float(cpu) + 1e-9)))


def _result_hash(cfg: Config, spec: StageSpec) -> str:
    """Hash of everything that changes what a stage learns (not where it runs)."""
    payload = spec.learning_fields()
    payload["task_info"] = {k: v for k, v in payload["task_info"].items() if k != "tokenizer_dir"}
    payload["data"] = cfg.data.model_dump(mode="json", exclude={"materialize"})
    payload["transfer_set"] = cfg.distill.transfer_set.model_dump(mode="json") \
        if spec.kind == "kd" and cfg.data.task == "classification" else None
    payload["teacher_outputs"] = cfg.distill.teacher_outputs if spec.offline else None
    if spec.offline and cfg.distill.topk_tail is not None:
        payload["topk_tail"] = cfg.distill.topk_tail
    return config_hash(payload)


def stage_spec(cfg: Config, *, stage: str, kind: str, model: dict, epochs: int, batch_size: int,
               optimizer: dict, lr_schedule: dict, sparsity: float = 0.0,
               teacher: TeacherArtifact | None = None, steps_per_epoch: int | None = None,
               rows: int = 0, num_workers: int = 1, progress_dir: Path, threads: int = 1,
               info: dict | None = None, extras: dict | None = None) -> StageSpec:
    """``extras``: the compression-step fields of a student stage (``structure``, ``init_from``, ``qat``,
    ``quantize``; :func:`raydistill.distill.steps.student_extras`); None values are left at their default."""
    offline = kind == "kd" and bool(cfg.distill.teacher_outputs)
    d = cfg.distill
    spec = StageSpec(
        stage=stage, task=cfg.data.task, kind=kind, model=model, epochs=int(epochs), batch_size=int(batch_size),
        optimizer=optimizer, lr_schedule=lr_schedule, seed=int(cfg.run.seed), progress_dir=str(progress_dir),
        sparsity=float(sparsity),
        compression=cfg.compression.model_dump(mode="json", exclude={"structured", "quantize", "order"})
        if sparsity > 0 else None,
        kd=KDTerms(d.temperature, d.alpha, d.divergence, d.beta, d.transfer_set.hard_labels, d.fused_linear)
        if kind == "kd" else None,
        teacher=TeacherRef(teacher.path, teacher.model) if (kind == "kd" and teacher and not offline) else None,
        teacher_hash=teacher.config_hash if teacher else None, offline=offline,
        steps_per_epoch=steps_per_epoch, materialize=cfg.data.materialize,
        rows_per_worker=int(rows // max(1, num_workers)), threads=int(threads),
        grad_clip=d.grad_clip if stage != "teacher" else None,  # the baseline too: same optimizer
        debug_crash_at_epoch=cfg.run.debug_crash_at_epoch,
        strategy=cfg.scaling.strategy, task_info=dict(info or {}))
    spec = spec.replace(**{k: v for k, v in (extras or {}).items() if v is not None})  # issue 12 steps
    return spec.replace(config_hash=_result_hash(cfg, spec))


def make_trainer(cfg: Config, spec: StageSpec, datasets: dict, *, storage_path: Path, name: str,
                 callbacks=None, num_workers: int | None = None, resources_per_worker: dict | None = None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
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
                        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))


def _workers_and_threads(cfg: Config, num_workers, resources_per_worker) -> tuple[int, dict | None, int]:
    nw = int(num_workers or cfg.scaling.num_workers)
    res = resources_per_worker or cfg.scaling.resources_per_worker
    return nw, res, _threads(res)


def teacher_hash(cfg: Config) -> str:
    return config_hash({"teacher": cfg.teacher.model_dump(mode="json", exclude={"checkpoint"}),
                        "data": cfg.data.model_dump(mode="json", exclude={"materialize"}),
                        "seed": cfg.run.seed})


def build_teacher_trainer(cfg: Config, *, storage_path, name: str, callbacks=None, num_workers=None,
                          resources_per_worker=None, data_root=None):
    storage = resolve_storage(storage_path)
    data_storage = resolve_storage(data_root) if data_root else storage
    datasets, rows = stage_datasets(cfg, data_storage, "ce")
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    t = cfg.teacher.training
    spec = stage_spec(cfg, stage="teacher", kind="ce", model=_spec(cfg.teacher), epochs=t.epochs,
                      batch_size=t.batch_size, optimizer=t.optimizer.model_dump(),
                      lr_schedule=t.lr_schedule.model_dump(), rows=rows, num_workers=nw,
                      progress_dir=storage / name, threads=threads, info=task_info(cfg, data_storage))
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def _spec(m) -> dict:
    return {"model": m.model, "kwargs": dict(m.kwargs)}


def student_steps_per_epoch(cfg: Config, rows: int, num_workers: int) -> int:
    return max(1, (rows // max(1, num_workers)) // cfg.distill.batch_size)


def build_student_trainer(cfg: Config, teacher: TeacherArtifact, *, storage_path, name: str, callbacks=None,
                          num_workers: int | None = None, resources_per_worker: dict | None = None,
                          stage: str = "student", model: dict | None = None, sparsity: float | None = None,
                          epochs: int | None = None, extras: dict | None = None, lr: float | None = None):
    """A ``TorchTrainer`` distilling ``teacher`` into the config's student (pruned to
    ``compression.sparsity`` unless ``sparsity`` is given). Workers report per-epoch ``epoch,
    train_loss, val_accuracy, accuracy, sparsity, compression_ratio, lr`` (+ macro_f1, params, ...) and
    a checkpoint every epoch. ``extras``: compression-step entries of the spec
    (:func:`raydistill.distill.steps.student_extras`). ``epochs`` / ``lr``: this stage's epochs and peak
    learning rate (None: ``distill.epochs`` / ``distill.optimizer.lr``)."""
    storage = resolve_storage(storage_path)
    datasets, rows = stage_datasets(cfg, storage, "kd")
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    sp = cfg.compression.sparsity if sparsity is None else float(sparsity)
    spec = stage_spec(cfg, stage=stage, kind="kd", model=model or _spec(cfg.student), epochs=epochs or d.epochs,
                      batch_size=d.batch_size, optimizer=d.optimizer.model_dump() | ({"lr": lr} if lr else {}),
                      lr_schedule=d.lr_schedule.model_dump(), sparsity=sp, teacher=teacher, rows=rows,
                      num_workers=nw, progress_dir=storage / name, threads=threads, info=task_info(cfg, storage),
                      extras=extras)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def build_baseline_trainer(cfg: Config, *, storage_path, name: str, callbacks=None, num_workers=None,
                           resources_per_worker=None):
    """The student trained from scratch with cross-entropy on the labelled rows only, with the same
    budget as the distilled student: same epochs, optimizer, schedule and optimizer steps per epoch (the
    labelled rows are cycled to fill an epoch of the student's length)."""
    storage = resolve_storage(storage_path)
    datasets, rows = stage_datasets(cfg, storage, "ce")
    distill_rows = _distill_rows(cfg, storage)
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    spec = stage_spec(cfg, stage="baseline", kind="ce", model=_spec(cfg.student), epochs=d.epochs,
                      batch_size=d.batch_size, optimizer=d.optimizer.model_dump(),
                      lr_schedule=d.lr_schedule.model_dump(),
                      steps_per_epoch=student_steps_per_epoch(cfg, distill_rows, nw), rows=rows,
                      num_workers=nw, progress_dir=storage / name, threads=threads, info=task_info(cfg, storage))
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def _distill_rows(cfg: Config, storage: Path) -> int:
    if cfg.data.task == "causal_lm" and not cfg.distill.teacher_outputs:
        return len(text_data(cfg, storage).train)
    if cfg.distill.teacher_outputs:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(cfg.distill.teacher_outputs))
    return int(cfg.data.num_train - max(1, round(cfg.data.num_train * cfg.data.val_fraction))
               + cfg.distill.transfer_set.size)


def _parquet_files(path) -> list[Path]:
    p = Path(path)
    return sorted(p.rglob("*.parquet")) if p.is_dir() else [p]


# ----------------------------------------------------------------------------------------------------
# running a trainer, reading its result


def final_checkpoint_dir(result, storage_path: Path, name: str) -> Path:
    """The directory of the run's latest checkpoint (from the Result, else the newest on disk)."""
    ck = getattr(result, "checkpoint", None) if result is not None else None
    if ck is not None and Path(ck.path).is_dir():
        return Path(ck.path)
    cands = sorted((p for p in (Path(storage_path) / name).glob("checkpoint_*") if p.is_dir()),
                   key=lambda p: p.stat().st_mtime)
    if not cands:
        raise RuntimeError(f"run {Path(storage_path) / name} finished without a checkpoint")
    return cands[-1]


def checkpoint_meta(path) -> dict:
    from raydistill.distill.checkpointing import META_FILE as CKPT_META

    return json.loads((Path(path) / CKPT_META).read_text())


def ensure_teacher(cfg: Config, storage_path, *, callbacks=None, num_workers=None,
                   resources_per_worker=None) -> TeacherArtifact:
    """The trained teacher: ``teacher.checkpoint`` if set, else the cached one under
    ``<storage>/teachers/<hash>`` (hash of the teacher's model, training budget, data and seed), training
    it through Ray Train (plain cross-entropy) first if it is not there yet. Concurrent callers (Tune
    trials) serialise on a file lock, so the teacher is trained once."""
    storage = resolve_storage(storage_path)
    if cfg.teacher.checkpoint:
        return _external_teacher(cfg, storage)
    h = teacher_hash(cfg)
    root = storage / "teachers"
    tdir = root / h
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f"{h}.lock")):
        info = tdir / TEACHER_FILE
        if info.is_file():
            art = TeacherArtifact(**json.loads(info.read_text()))
            if Path(art.path).exists():
                art.cached = True
                return art
        from raydistill.distill.session import ray_session

        with ray_session():
            trainer = build_teacher_trainer(cfg, storage_path=root, name=h, callbacks=callbacks,
                                            num_workers=num_workers, resources_per_worker=resources_per_worker,
                                            data_root=storage)
            from raydistill.distill.interrupts import fit

            result = fit(trainer)  # off the main thread, so Ctrl-C stays the job's (distill/interrupts.py)
        ck = final_checkpoint_dir(result, root, h)
        final = tdir / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(ck, final)
        meta = checkpoint_meta(final)
        art = TeacherArtifact(path=str(final), accuracy=_accuracy(meta["metrics"]), config_hash=h,
                              model=_spec(cfg.teacher), metrics=_test_metrics(meta["metrics"]))
        write_json_atomic(info, art.to_dict())
        return art


def _accuracy(metrics: dict) -> float:
    """Classification accuracy, or a causal LM's next-token accuracy."""
    return float(metrics.get("accuracy", metrics.get("next_token_accuracy", 0.0)))


_TEST_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "perplexity", "next_token_accuracy",
              "val_accuracy", "val_perplexity")


def _test_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in _TEST_KEYS if k in metrics}


def _external_teacher(cfg: Config, storage: Path) -> TeacherArtifact:
    path = Path(cfg.teacher.checkpoint).expanduser().resolve()
    try:
        ev = evaluate_checkpoint(cfg, path, model=_spec(cfg.teacher), teacher=False, samples=False)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"teacher.checkpoint: cannot load {path} into {cfg.teacher.model!r}: {exc}") from None
    return TeacherArtifact(path=str(path), accuracy=_accuracy(ev), config_hash=config_hash(
        {"checkpoint": str(path), "mtime": path.stat().st_mtime}), model=_spec(cfg.teacher),
        metrics=_test_metrics(ev))


def artifact_from_checkpoint(ck_dir: Path, *, model: dict, stage: str) -> TeacherArtifact:
    meta = checkpoint_meta(ck_dir)
    return TeacherArtifact(path=str(ck_dir), accuracy=_accuracy(meta["metrics"]),
                           config_hash=meta["config_hash"], model=model, metrics=_test_metrics(meta["metrics"]))


def load_checkpoint_model(cfg: Config, checkpoint_path, model: dict | None = None, *, convert: bool = True):
    """The model of a checkpoint (resized to its ``structure`` when structurally pruned; its pruned layers
    converted to ``SparseLinear`` when ``convert``), its size report, its meta and the task."""
    from raydistill.compress import compress, model_sparsity_report
    from raydistill.distill.checkpointing import load_masks, load_weights
    from raydistill.tasks import get_task

    ck = Path(checkpoint_path)
    meta = checkpoint_meta(ck) if (ck / "meta.json").is_file() else {}
    spec = model or meta.get("model") or _spec(cfg.student)
    task = get_task(cfg.data.task)
    storage = resolve_storage(cfg.run.storage_path)
    info = meta.get("task_info") or task_info(cfg, storage)
    net = task.build_model(spec, info)
    if meta.get("structure"):  # a structurally pruned student (issue 12): its smaller shapes first
        from raydistill.compress.structured import resize_structured

        resize_structured(net, meta["structure"])
    load_weights(net, ck)
    masks = load_masks(ck) if ck.is_dir() else None
    rep = compress(net, masks=masks) if masks and convert else model_sparsity_report(net, masks=masks)
    return net, rep, meta, task, info


def evaluate_checkpoint(cfg: Config, checkpoint_path, model: dict | None = None, *, teacher=True,
                        samples: bool = True, quantize: dict | None = None, latency: bool = True,
                        export: str | None = None) -> dict:
    """Test metrics and size of a checkpoint, with its pruned layers converted to ``SparseLinear``
    (``raydistill.compress.compress`` with the checkpoint's masks) and, with ``quantize`` (a
    ``compression.quantize`` dict), its Linear layers quantized
    (:func:`raydistill.distill.steps.finalize_student`). Classification: accuracy, macro F1 /
    precision / recall, ``latency_ms_b1`` / ``latency_ms_b256`` (median eval forward time, when
    ``latency``). Causal LM: perplexity, next_token_accuracy, teacher_agreement (against the
    checkpoint's teacher when ``teacher`` is True, against ``teacher`` when it is a ``TeacherArtifact``) and a
    few greedy ``samples``. ``model_bytes`` counts real bit widths (codes, scales, CSR indices).
    ``export``: also write the compressed model there (:func:`raydistill.compress.save_compressed`)."""
    import torch

    net, rep, meta, task, info = load_checkpoint_model(cfg, checkpoint_path, model, convert=not quantize)
    steps: dict = {}
    if quantize:
        from raydistill.distill.steps import finalize_student

        # rep: params, sparsity, fp32 dense bytes of the float model; then masks -> sparse, quantize
        steps = finalize_student(net, load_masks_of(checkpoint_path), quantize)
    storage = resolve_storage(cfg.run.storage_path)
    if task.name == "causal_lm":
        out = _evaluate_lm(cfg, net, meta, info, storage, teacher=teacher, samples=samples)
        out["tokens_per_s"] = (meta.get("metrics") or {}).get("tokens_per_s")
    else:
        from raydistill.data import load_mnist1d
        from raydistill.tasks.classification import classification_metrics, predict

        split = load_mnist1d(cfg.data, _data_cache(storage))
        with torch.no_grad():
            pred = predict(net, torch.from_numpy(split.x_test)).argmax(1).numpy()
        out = classification_metrics(pred, split.y_test)
    out.update(sparsity=float(rep.total_sparsity), compression_ratio=float(rep.compression_ratio),
               params=int(rep.params), nonzero_params=int(rep.nonzero_params),
               dense_bytes=int(rep.dense_bytes), compressed_bytes=int(rep.compressed_bytes),
               sparse_layers=sum(1 for m in net.modules()
                                 if type(m).__name__ in ("SparseLinear", "SparseLinearInt8")),
               epoch=meta.get("epoch"), checkpoint=str(checkpoint_path))
    from raydistill.distill.steps import latency_ms, storage_nbytes

    out["model_bytes"] = storage_nbytes(net)
    if quantize:  # bytes at real widths (codes + scales) instead of the float CSR accounting
        out["compressed_bytes"] = out["model_bytes"]
        out["compression_ratio"] = rep.dense_bytes / out["model_bytes"]
    if "projected_sparse_int8_bytes" in steps:
        out["projected_sparse_int8_bytes"] = steps["projected_sparse_int8_bytes"]
    if steps:
        out["steps"] = steps
    if meta.get("structure"):
        out["structure"] = meta["structure"]
    if export:
        from raydistill.compress.export import save_compressed

        save_compressed(net, export, structure=meta.get("structure"))
        out["export"] = str(export)
    if latency and task.name == "classification":
        in_f = int(split.x_test.shape[1])
        out["latency_ms_b1"] = latency_ms(net, in_f, 1)
        out["latency_ms_b256"] = latency_ms(net, in_f, 256)
        out["latency_threads"] = torch.get_num_threads()
    return out


def load_masks_of(checkpoint_path) -> dict | None:
    """The pruning masks of a checkpoint directory (None: a weights file or no masks)."""
    from raydistill.distill.checkpointing import load_masks

    ck = Path(checkpoint_path)
    return load_masks(ck) if ck.is_dir() else None


def _evaluate_lm(cfg: Config, net, meta: dict, info: dict, storage: Path, *, teacher: bool, samples: bool) -> dict:
    import torch
    from tokenizers import Tokenizer

    from raydistill.tasks.causal_lm import greedy_samples, lm_metrics

    td = text_data(cfg, storage)
    t_net = None
    tref = teacher.to_dict() if isinstance(teacher, TeacherArtifact) else meta.get("teacher") if teacher else None
    if tref:
        from raydistill.distill.checkpointing import load_weights
        from raydistill.tasks import get_task

        t_net = get_task("causal_lm").build_model(tref["model"], info)
        load_weights(t_net, tref["path"])
        t_net.eval()
    test = torch.as_tensor(td.test.astype(np.int64))
    out = lm_metrics(net, test, td.pad_id, td.vocab_size, teacher=t_net)
    if samples and cfg.data.samples:
        tok = Tokenizer.from_file(str(Path(td.tokenizer_dir) / "tokenizer.json"))
        prompts = [row[: 16].tolist() for row in td.test[: cfg.data.samples]]
        conts = greedy_samples(net, prompts, new_tokens=32, vocab=td.vocab_size, eos_id=td.eos_id,
                               max_len=cfg.data.seq_len)
        out["samples"] = [{"prompt": tok.decode(p), "continuation": tok.decode(c)} for p, c in zip(prompts, conts)]
    return out
