"""Checks that run before Ray starts, so that a bad input fails in a second with a ``ConfigError`` that names
the key or argument (the CLI exits 2), not minutes later inside a stage.

    check_storage(path, key)   the storage path is (or can be made) a writable directory
    check_models(cfg)          every model imports and builds with its kwargs; pruning patterns match layers
    check_inputs(cfg)          the files the config names: teacher.checkpoint, distill.teacher_outputs (every
                               shard's footer and metadata against the config: raydistill.distill.offline)
                               and the head of every corpus file (binary / non-UTF-8 files, bad jsonl lines)
    check_scale(cfg, storage, name)   training at scale and tracking (issue 22)
    preflight(cfg, storage, name, storage_key)   all of the above plus the run name
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from raydistill.config import Config, ConfigError, validate_run_name


def check_storage(path, key: str = "run.storage_path") -> Path:
    """``path`` is a directory this process can write to (created if missing), with room for a few bytes."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a directory; pass a directory for runs and checkpoints")
    probe = None
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".raydistill-write-probe-", dir=p)
        with os.fdopen(fd, "wb") as fh:  # an empty file needs no room: write some, so a full disk shows here
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"{key}: no space left on device at {p}; free some space or pass another "
                              f"directory") from None
        raise ConfigError(f"{key}: {p} is not a writable directory ({exc.strerror or exc})") from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return p


def check_models(cfg: Config) -> None:
    """Import and build the teacher, the assistants and the student once (a wrong import path or factory
    kwargs fail here, not after the teacher has trained), and check the compression patterns against
    the student's layers."""
    from raydistill.models import build_model

    specs = [("teacher", cfg.teacher), *((f"assistants[{i}]", a) for i, a in enumerate(cfg.assistants)),
             ("student", cfg.student)]
    built = {}
    for key, spec in specs:
        try:
            built[key] = build_model({"model": spec.model, "kwargs": dict(spec.kwargs)})
        except Exception as exc:  # noqa: BLE001 - a user factory may raise anything
            raise ConfigError(f"{key}.model: cannot build {spec.model!r} with kwargs {dict(spec.kwargs)}: "
                              f"{type(exc).__name__}: {exc}") from None
    comp = cfg.compression
    if comp.sparsity > 0 and (comp.include or comp.exclude):
        from raydistill.compress.pruner import check_patterns_match

        try:
            check_patterns_match(built["student"], include=comp.include, exclude=comp.exclude)
        except ValueError as exc:
            key = "compression.include" if str(exc).startswith("include") else "compression.exclude"
            raise ConfigError(f"{key}: {exc}") from None
    from raydistill.distill.steps import check_recipe  # group sizes, structured ratio (issue 12)

    try:
        check_recipe(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_inputs(cfg: Config, *, teacher_outputs: bool = True) -> None:
    """The files the config names exist and look right (``ConfigError`` naming the key): the teacher's
    checkpoint, the offline teacher outputs (``teacher_outputs=False``: not read by this command), and the
    text corpus, whose files' heads are checked here (the rest is checked while Ray Data reads it)."""
    ck = cfg.teacher.checkpoint
    if ck:
        from raydistill.distill.checkpointing import MODEL_FILE

        p = Path(ck).expanduser()
        if not p.exists():
            raise ConfigError(f"teacher.checkpoint: {p} does not exist (a {MODEL_FILE} file or a checkpoint "
                              "directory holding one)")
        if p.is_dir() and not (p / MODEL_FILE).is_file():
            raise ConfigError(f"teacher.checkpoint: the directory {p} holds no {MODEL_FILE}")
    if cfg.distill.teacher_outputs and teacher_outputs:  # shards, metadata, k, teacher (issue 23)
        from raydistill.distill.offline import check_teacher_outputs

        check_teacher_outputs(cfg)
    if cfg.data.task == "causal_lm":
        _check_corpus(cfg.data)


def _check_corpus(data) -> None:
    import logging

    from raydistill.data.text import SKIP_HINT, check_corpus_heads, corpus_files

    try:
        files = corpus_files(data.path, data.max_bytes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    bad = check_corpus_heads(files, data.text_column)
    if not bad:
        return
    if data.skip_bad_files:
        if len(bad) == len(files):
            raise ConfigError(f"data.path: no file of the corpus can be read as text (data.skip_bad_files "
                              f"leaves them all out): {bad[0]}")
        for msg in bad:
            logging.getLogger("raydistill").warning("skipped (data.skip_bad_files: true): %s",
                                                    msg.split("; ")[0].removeprefix("data.path: "))
        return
    more = f" (and {len(bad) - 5} more files)" if len(bad) > 5 else ""
    lines = "\n  ".join(m.replace(f"; {SKIP_HINT}", "") for m in bad[:5])
    raise ConfigError(f"data.path: {len(bad)} corpus file(s) cannot be used{more} ({SKIP_HINT}):\n  {lines}")


def check_scale(cfg: Config, storage, name: str) -> None:
    """Issue 22: ``gradient_checkpointing`` only for models that support it (built on the meta device: no
    memory, no time), and ``run.tracking``'s backend installed with a writable store. (Contradicting budgets
    and fp16 without a GPU are rejected when the config loads.)"""
    import torch

    from raydistill.distill.precision import enable_gradient_checkpointing
    from raydistill.models import build_model

    models = []
    if cfg.teacher.training.gradient_checkpointing and not cfg.teacher.checkpoint:
        models.append(("teacher.training.gradient_checkpointing", "teacher", cfg.teacher))
    if cfg.distill.gradient_checkpointing:
        models += [("distill.gradient_checkpointing", f"assistants[{i}]", a) for i, a in enumerate(cfg.assistants)]
        models.append(("distill.gradient_checkpointing", "student", cfg.student))
    for key, who, spec in models:
        with torch.device("meta"):
            net = build_model({"model": spec.model, "kwargs": dict(spec.kwargs)})
        try:
            enable_gradient_checkpointing(net)
        except ValueError as exc:
            raise ConfigError(f"{key}: the {who} ({spec.model!r}) cannot use it: {exc}") from None
    from raydistill.distill.tracking import check_tracking

    check_tracking(cfg, storage, name)


def preflight(cfg: Config, storage, name: str, *, storage_key: str = "run.storage_path",
              name_key: str = "run.name") -> None:
    validate_run_name(name, name_key)
    check_storage(storage, storage_key)
    check_inputs(cfg)
    check_models(cfg)
    check_scale(cfg, storage, name)
