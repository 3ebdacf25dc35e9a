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
from typing import Any

import numpy as np

from raydistill.config import Config, ConfigError, config_hash

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
    from raydistill.data import read_teacher_outputs, to_ray_dataset
    from raydistill.data.ray_data import UNLABELLED

    split, transfer = load_arrays(cfg, storage)
    if cfg.distill.teacher_outputs:
        path = Path(cfg.distill.teacher_outputs).expanduser()
        if not path.exists():
            raise ConfigError(f"distill.teacher_outputs: {path} does not exist (write it with "
                              "`raydistill teacher-logits CONFIG`)")
        ds = read_teacher_outputs(str(path.resolve())).materialize()
        return {"train": ds, **_eval_datasets(split)}, ds.count()
    x = np.concatenate([split.x_train, transfer])
    y = np.concatenate([split.y_train, np.full(len(transfer), UNLABELLED, np.int64)])
    return {"train": to_ray_dataset(x=x, y=y), **_eval_datasets(split)}, len(y)


# ----------------------------------------------------------------------------------------------------
# stage specs -> TorchTrainer


def _threads(resources: dict | None) -> int:
    cpu = (resources or {}).get("CPU", 1)
    return max(1, int(math.floor(float(cpu) + 1e-9)))


def _result_hash(cfg: Config, stage: dict) -> str:
    """Hash of everything that changes what a stage learns (not where it runs)."""
    keys = ("kind", "model", "epochs", "batch_size", "optimizer", "lr_schedule", "sparsity", "compression",
            "distill", "teacher_hash", "offline", "steps_per_epoch", "seed", "stage", "grad_clip", "structure",
            "init_from", "qat", "quantize")
    payload = {k: stage.get(k) for k in keys}
    payload["data"] = cfg.data.model_dump(mode="json")
    payload["transfer_set"] = cfg.distill.transfer_set.model_dump(mode="json") if stage["kind"] == "kd" else None
    payload["teacher_outputs"] = cfg.distill.teacher_outputs if stage.get("offline") else None
    return config_hash(payload)


def stage_config(cfg: Config, *, stage: str, kind: str, model: dict, epochs: int, batch_size: int,
                 optimizer: dict, lr_schedule: dict, sparsity: float = 0.0,
                 teacher: TeacherArtifact | None = None, steps_per_epoch: int | None = None,
                 rows: int = 0, num_workers: int = 1, progress_dir: Path, threads: int = 1,
                 extras: dict | None = None) -> dict:
    offline = kind == "kd" and bool(cfg.distill.teacher_outputs)
    spec: dict[str, Any] = {
        "stage": stage, "kind": kind, "model": model, "epochs": int(epochs), "batch_size": int(batch_size),
        "optimizer": optimizer, "lr_schedule": lr_schedule, "sparsity": float(sparsity),
        "compression": cfg.compression.model_dump(mode="json", exclude={"structured", "quantize", "order"})
        if sparsity > 0 else None,
        "distill": cfg.distill.model_dump(mode="json", include={"temperature", "alpha", "divergence", "beta"})
        | {"hard_labels": cfg.distill.transfer_set.hard_labels} if kind == "kd" else
        {"hard_labels": "none"},
        "teacher": {"path": teacher.path, "model": teacher.model} if (teacher and not offline) else None,
        "teacher_hash": teacher.config_hash if teacher else None,
        "offline": offline, "steps_per_epoch": steps_per_epoch, "seed": int(cfg.run.seed),
        "materialize": cfg.data.materialize, "rows_per_worker": int(rows // max(1, num_workers)),
        "progress_dir": str(progress_dir), "threads": int(threads),
        "debug_crash_at_epoch": cfg.run.debug_crash_at_epoch,
        "grad_clip": cfg.distill.grad_clip if kind == "kd" else None,
    }
    spec.update({k: v for k, v in (extras or {}).items() if v is not None})  # compression steps (issue 12)
    spec["config_hash"] = _result_hash(cfg, spec)
    return spec


def make_trainer(cfg: Config, spec: dict, datasets: dict, *, storage_path: Path, name: str,
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
    return TorchTrainer(train_fn_per_worker, train_loop_config=spec, scaling_config=scaling, run_config=run,
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
    datasets, rows = labelled_datasets(cfg, resolve_storage(data_root) if data_root else storage)
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    t = cfg.teacher.training
    spec = stage_config(cfg, stage="teacher", kind="ce", model=_spec(cfg.teacher), epochs=t.epochs,
                        batch_size=t.batch_size, optimizer=t.optimizer.model_dump(),
                        lr_schedule=t.lr_schedule.model_dump(), rows=rows, num_workers=nw,
                        progress_dir=storage / name, threads=threads)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def _spec(m) -> dict:
    return {"model": m.model, "kwargs": dict(m.kwargs)}


def student_steps_per_epoch(cfg: Config, rows: int, num_workers: int) -> int:
    return max(1, (rows // max(1, num_workers)) // cfg.distill.batch_size)


def build_student_trainer(cfg: Config, teacher: TeacherArtifact, *, storage_path, name: str, callbacks=None,
                          num_workers: int | None = None, resources_per_worker: dict | None = None,
                          stage: str = "student", model: dict | None = None, sparsity: float | None = None,
                          epochs: int | None = None, extras: dict | None = None):
    """A ``TorchTrainer`` distilling ``teacher`` into the config's student (pruned to
    ``compression.sparsity`` unless ``sparsity`` is given). Workers report per-epoch ``epoch,
    train_loss, val_accuracy, accuracy, sparsity, compression_ratio, lr`` (+ macro_f1, params, ...) and
    a checkpoint every epoch. ``extras``: compression-step entries of the spec
    (:func:`raydistill.compress.steps.student_extras`)."""
    storage = resolve_storage(storage_path)
    datasets, rows = distill_datasets(cfg, storage)
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    sp = cfg.compression.sparsity if sparsity is None else float(sparsity)
    spec = stage_config(cfg, stage=stage, kind="kd", model=model or _spec(cfg.student), epochs=epochs or d.epochs,
                        batch_size=d.batch_size, optimizer=d.optimizer.model_dump(),
                        lr_schedule=d.lr_schedule.model_dump(), sparsity=sp, teacher=teacher, rows=rows,
                        num_workers=nw, progress_dir=storage / name, threads=threads, extras=extras)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def build_baseline_trainer(cfg: Config, *, storage_path, name: str, callbacks=None, num_workers=None,
                           resources_per_worker=None):
    """The student trained from scratch with cross-entropy on the labelled rows only, with the same
    budget as the distilled student: same epochs, optimizer, schedule and optimizer steps per epoch (the
    labelled rows are cycled to fill an epoch of the student's length)."""
    storage = resolve_storage(storage_path)
    datasets, rows = labelled_datasets(cfg, storage)
    _, distill_rows = (None, _distill_rows(cfg, storage))
    nw, res, threads = _workers_and_threads(cfg, num_workers, resources_per_worker)
    d = cfg.distill
    spec = stage_config(cfg, stage="baseline", kind="ce", model=_spec(cfg.student), epochs=d.epochs,
                        batch_size=d.batch_size, optimizer=d.optimizer.model_dump(),
                        lr_schedule=d.lr_schedule.model_dump(),
                        steps_per_epoch=student_steps_per_epoch(cfg, distill_rows, nw), rows=rows,
                        num_workers=nw, progress_dir=storage / name, threads=threads)
    return make_trainer(cfg, spec, datasets, storage_path=storage, name=name, callbacks=callbacks,
                        num_workers=nw, resources_per_worker=res)


def _distill_rows(cfg: Config, storage: Path) -> int:
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
    from raydistill.distill.worker import CKPT_META

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
        art = TeacherArtifact(path=str(final), accuracy=float(meta["metrics"]["accuracy"]), config_hash=h,
                              model=_spec(cfg.teacher))
        tmp = info.with_suffix(".tmp")
        tmp.write_text(json.dumps(art.to_dict(), indent=1))
        os.replace(tmp, info)
        return art


def _external_teacher(cfg: Config, storage: Path) -> TeacherArtifact:
    import torch

    from raydistill.distill.worker import load_weights, predict
    from raydistill.models import build_model

    path = Path(cfg.teacher.checkpoint).expanduser().resolve()
    model = build_model(cfg.teacher)
    try:
        load_weights(model, path)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"teacher.checkpoint: cannot load {path} into {cfg.teacher.model!r}: {exc}") from None
    split, _ = load_arrays(cfg, storage)
    acc = float((predict(model, torch.from_numpy(split.x_test)).argmax(1).numpy() == split.y_test).mean())
    if path.is_file():  # workers load a checkpoint dir or a .safetensors file alike
        pass
    return TeacherArtifact(path=str(path), accuracy=acc, config_hash=config_hash(
        {"checkpoint": str(path), "mtime": path.stat().st_mtime}), model=_spec(cfg.teacher))


def artifact_from_checkpoint(ck_dir: Path, *, model: dict, stage: str) -> TeacherArtifact:
    meta = checkpoint_meta(ck_dir)
    return TeacherArtifact(path=str(ck_dir), accuracy=float(meta["metrics"]["accuracy"]),
                           config_hash=meta["config_hash"], model=model)


def evaluate_checkpoint(cfg: Config, checkpoint_path, model: dict | None = None, *,
                        quantize: dict | None = None, latency: bool = True, export: str | None = None) -> dict:
    """Test-set accuracy, macro recall, macro-F1, size and CPU latency of a checkpoint, with its pruned
    layers converted to ``SparseLinear`` (``raydistill.compress.compress`` with the checkpoint's masks)
    and, with ``quantize`` (a ``compression.quantize`` dict), its Linear layers quantized
    (:func:`raydistill.compress.steps.finalize_student`). ``model_bytes`` counts real bit widths
    (codes, scales, CSR indices); ``latency_ms_b1`` / ``latency_ms_b256``: median eval forward time.
    ``export``: also write the compressed model there (:func:`raydistill.compress.save_compressed`)."""
    import torch

    from raydistill.compress import compress, model_sparsity_report
    from raydistill.data import load_mnist1d
    from raydistill.distill.worker import classification_metrics, load_masks, load_weights, predict
    from raydistill.models import build_model

    ck = Path(checkpoint_path)
    meta = checkpoint_meta(ck) if (ck / "meta.json").is_file() else {}
    spec = model or meta.get("model") or _spec(cfg.student)
    net = build_model(spec)
    if meta.get("structure"):
        from raydistill.compress.structured import resize_structured

        resize_structured(net, meta["structure"])
    load_weights(net, ck)
    masks = load_masks(ck) if ck.is_dir() else None
    steps: dict = {}
    if quantize:
        from raydistill.compress.steps import finalize_student

        rep = model_sparsity_report(net, masks=masks)  # params, sparsity, fp32 dense bytes of the float model
        steps = finalize_student(net, masks, quantize)
    elif masks:
        rep = compress(net, masks=masks)
    else:
        rep = model_sparsity_report(net)
    storage = resolve_storage(cfg.run.storage_path)
    split = load_mnist1d(cfg.data, _data_cache(storage))
    with torch.no_grad():
        pred = predict(net, torch.from_numpy(split.x_test)).argmax(1).numpy()
    out = classification_metrics(pred, split.y_test)
    out.update(sparsity=float(rep.total_sparsity), compression_ratio=float(rep.compression_ratio),
               params=int(rep.params), nonzero_params=int(rep.nonzero_params),
               dense_bytes=int(rep.dense_bytes), compressed_bytes=int(rep.compressed_bytes),
               sparse_layers=sum(1 for m in net.modules() if type(m).__name__ == "SparseLinear"),
               epoch=meta.get("epoch"), checkpoint=str(ck))
    from raydistill.compress.steps import latency_ms, storage_nbytes

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
    if latency:
        in_f = int(split.x_test.shape[1])
        out["latency_ms_b1"] = latency_ms(net, in_f, 1)
        out["latency_ms_b256"] = latency_ms(net, in_f, 256)
        out["latency_threads"] = torch.get_num_threads()
    return out
