"""The teachers of a job (``teacher``, or ``teachers``: name -> teacher): each trained through Ray Train
with cross-entropy and cached under ``<storage>/teachers/<hash>``, or loaded from its ``checkpoint`` (a
checkpoint directory, a ``.safetensors`` file, or the ``from_pretrained`` directory of ``kwargs.pretrained``);
an assistant's checkpoint as the next link's teacher.

    ensure_teachers(cfg, storage_path) -> {name: TeacherArtifact}
    ensure_teacher(cfg, storage_path, teacher=None) -> TeacherArtifact      # one (None: the first)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from raydistill.config import Config, ConfigError, config_hash
from raydistill.distill.data import resolve_storage
from raydistill.distill.evaluate import checkpoint_meta, evaluate_checkpoint, final_checkpoint_dir
from raydistill.distill.spec import TeacherArtifact, model_dict, teacher_config, teacher_hash
from raydistill.distill.stages import build_teacher_trainer
from raydistill.utils import write_json_atomic

TEACHER_FILE = "teacher.json"


def teacher_log(cfg: Config, storage, teacher: str | None = None) -> Path | None:
    """The per-epoch log of a teacher trained here (None: loaded from a checkpoint)."""
    if teacher_config(cfg, teacher).checkpoint:
        return None
    return resolve_storage(storage) / "teachers" / teacher_hash(cfg, teacher) / "epochs.jsonl"


def ensure_teachers(cfg: Config, storage_path, **kw) -> dict[str, TeacherArtifact]:
    """Every teacher of the job, by name, in the config's order (:func:`ensure_teacher`)."""
    return {name: ensure_teacher(cfg, storage_path, teacher=name, **kw) for name in cfg.teacher_map()}


def ensure_teacher(cfg: Config, storage_path, *, teacher: str | None = None, callbacks=None, num_workers=None,
                   resources_per_worker=None) -> TeacherArtifact:
    """A trained teacher (``teacher``: its name; None: the first): its ``checkpoint`` if set, else the cached
    one under ``<storage>/teachers/<hash>`` (:func:`teacher_hash`), training it through Ray Train (plain
    cross-entropy) first if it is not there yet. Concurrent callers (Tune trials) serialise on a file
    lock, so a teacher is trained once."""
    storage = resolve_storage(storage_path)
    name = teacher or next(iter(cfg.teacher_map()))
    tc = teacher_config(cfg, name)
    if tc.checkpoint:
        return _external_teacher(cfg, storage, name)
    h = teacher_hash(cfg, name)
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
                                            data_root=storage, teacher=name)
            from raydistill.distill.interrupts import fit

            result = fit(trainer)  # off the main thread, so Ctrl-C stays the job's (distill/interrupts.py)
        ck = final_checkpoint_dir(result, root, h)
        final = tdir / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(ck, final)
        meta = checkpoint_meta(final)
        art = TeacherArtifact(path=str(final), accuracy=_accuracy(meta["metrics"]), config_hash=h,
                              model=model_dict(tc), metrics=_test_metrics(meta["metrics"]))
        write_json_atomic(info, art.to_dict())
        return art


def _accuracy(metrics: dict) -> float:
    """Classification accuracy, or a causal LM's next-token accuracy."""
    return float(metrics.get("accuracy", metrics.get("next_token_accuracy", 0.0)))


_TEST_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "perplexity", "next_token_accuracy",
              "val_accuracy", "val_perplexity")


def _test_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in _TEST_KEYS if k in metrics}


def _external_teacher(cfg: Config, storage: Path, name: str) -> TeacherArtifact:
    tc = teacher_config(cfg, name)
    path = Path(tc.checkpoint).expanduser().resolve()
    try:
        ev = evaluate_checkpoint(cfg, path, model=model_dict(tc), teacher=False, samples=False)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"{cfg.teacher_key(name)}.checkpoint: cannot load {path} into {tc.model!r}: {exc}") \
            from None
    return TeacherArtifact(path=str(path), accuracy=_accuracy(ev), config_hash=config_hash(
        {"checkpoint": str(path), "mtime": path.stat().st_mtime}), model=model_dict(tc),
        metrics=_test_metrics(ev))


def artifact_from_checkpoint(ck_dir: Path, *, model: dict, stage: str) -> TeacherArtifact:
    meta = checkpoint_meta(ck_dir)
    return TeacherArtifact(path=str(ck_dir), accuracy=_accuracy(meta["metrics"]),
                           config_hash=meta["config_hash"], model=model, metrics=_test_metrics(meta["metrics"]))
