"""Checks that run before Ray starts, so that a bad input fails in a second with a ``ConfigError`` that names
the key or argument (the CLI exits 2), not minutes later inside a stage.

    check_storage(path, key)   the storage path is (or can be made) a writable directory
    check_models(cfg)          every model imports and builds with its kwargs; pruning patterns match layers;
                               student.init's target fits the teacher
    preflight(cfg, storage, name, storage_key)   all of the above plus the run name
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from raydistill.config import Config, ConfigError, validate_run_name


def check_storage(path, key: str = "run.storage_path") -> Path:
    """``path`` is a directory this process can write to (created if missing)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a directory; pass a directory for runs and checkpoints")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".raydistill-write-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}: {p} is not a writable directory ({exc.strerror or exc})") from None
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
    from raydistill.distill.student_init import check_student_init  # student.init: {from: teacher} (issue 21)

    check_student_init(cfg)
    from raydistill.distill.steps import check_recipe  # group sizes, structured ratio (issue 12)

    try:
        check_recipe(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def preflight(cfg: Config, storage, name: str, *, storage_key: str = "run.storage_path",
              name_key: str = "run.name") -> None:
    validate_run_name(name, name_key)
    check_storage(storage, storage_key)
    check_models(cfg)
