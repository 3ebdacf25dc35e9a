"""Checks that run before Ray starts, so that a bad input fails in a second with a ``ConfigError`` that names
the key or argument (the CLI exits 2), not minutes later inside a stage.

    check_storage(path, key)   the storage path is (or can be made) a writable directory
    check_models(cfg)          every model imports and builds with its kwargs; loss terms fit the models'
                               layers; pruning patterns match layers; student.init's target fits the teacher
    check_inputs(cfg)          the files the config names: every teacher's checkpoint, the offline teacher's
                               outputs (every shard's footer and metadata against the config:
                               raydistill.distill.offline) and the task's data (a text corpus: the head of
                               every file)
    check_scale(cfg, storage, name)   training at scale and tracking (issue 22)
    preflight(cfg, storage, name, storage_key)   all of the above plus the run name
"""

from __future__ import annotations

from pathlib import Path

from raydistill.config import Config, ConfigError, validate_run_name
from raydistill.distill.data import check_storage
from raydistill.distill.tracking import check_tracking


def check_models(cfg: Config) -> None:
    """Import and build the teachers, the assistants and the student once (a wrong import path or factory
    kwargs fail here, not after the teacher has trained), check the loss terms against their layers and
    the compression patterns against the student's layers. With ``student.init.from: teacher`` the target
    shape is checked against the teacher first, and the student built is the one pruning will make."""
    from raydistill.distill.student_init import shape_model
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    pruned = shape_model(cfg)  # None unless student.init.from: teacher (issue 21)
    specs = [*((cfg.teacher_key(n), t) for n, t in cfg.teacher_map().items()),
             *((f"assistants[{i}]", a) for i, a in enumerate(cfg.assistants)), ("student", cfg.student)]
    built = {}
    for key, spec in specs:
        model = pruned if key == "student" and pruned else {"model": spec.model, "kwargs": dict(spec.kwargs)}
        try:
            built[key] = task.build_model(model, task.probe_info())
        except Exception as exc:  # noqa: BLE001 - a user factory may raise anything
            raise ConfigError(f"{key}.model: cannot build {spec.model!r} with kwargs {dict(spec.kwargs)}: "
                              f"{type(exc).__name__}: {exc}") from None
    check_terms(cfg, task, built)
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


def check_terms(cfg: Config, task, built: dict) -> None:
    """The loss terms against the models of every distillation stage (each assistant, then the student,
    learning from the previous link in the first teacher's place): teachers, layers and widths that exist
    (``ValueError`` of ``raydistill.losses`` -> ``ConfigError`` naming the term's key)."""
    from raydistill.losses import Criterion

    names = list(cfg.teacher_map())
    online = {n: task.layout(built[cfg.teacher_key(n)]) for n in names if n != cfg.offline_teacher()}
    students = [f"assistants[{i}]" for i in range(len(cfg.assistants))] + ["student"]
    for key in students:
        try:
            crit = Criterion(cfg.loss_terms(), student=task.layout(built[key]), teachers=online)
        except ValueError as exc:
            raise ConfigError(f"{exc} ({key} learning)" if key != "student" else str(exc)) from None
        if cfg.scaling.strategy == "fsdp" and any(True for _ in crit.parameters()):
            raise ConfigError("scaling.strategy: fsdp cannot train the learned projections of hidden terms "
                              "(student and teacher layers of different widths); use ddp")
        if names[0] in online:  # the next link learns from this one in the first teacher's place
            online = {**online, names[0]: task.layout(built[key])}


def check_inputs(cfg: Config, *, teacher_outputs: bool = True) -> None:
    """The files the config names exist and look right (``ConfigError`` naming the key): every teacher's
    checkpoint, the offline teacher outputs (``teacher_outputs=False``: not read by this command), and the
    task's data (``Task.check_data``: a text corpus's file heads; the rest is checked while Ray Data reads
    it)."""
    from raydistill.distill.checkpointing import MODEL_FILE
    from raydistill.tasks import get_task

    for name, tc in cfg.teacher_map().items():
        key = cfg.teacher_key(name)
        if tc.checkpoint:
            p = Path(tc.checkpoint).expanduser()
            if not p.exists():
                raise ConfigError(f"{key}.checkpoint: {p} does not exist (a {MODEL_FILE} file or a checkpoint "
                                  "directory holding one)")
            if p.is_dir() and not (p / MODEL_FILE).is_file():
                raise ConfigError(f"{key}.checkpoint: the directory {p} holds no {MODEL_FILE}")
    if cfg.teacher_outputs_path() and teacher_outputs:  # every shard's footer and metadata against the config
        from raydistill.distill.offline import check_teacher_outputs

        check_teacher_outputs(cfg)
    get_task(cfg.data.task).check_data(cfg)


def check_scale(cfg: Config, storage, name: str) -> None:
    """Issue 22: ``gradient_checkpointing`` only for models that support it (built on the meta device: no
    memory, no time), and ``run.tracking``'s backend installed with a writable store. (Contradicting budgets
    and fp16 without a GPU are rejected when the config loads.)"""
    import torch

    from raydistill.distill.precision import enable_gradient_checkpointing
    from raydistill.models import build_model

    models = []
    for name, tc in cfg.teacher_map().items():
        if tc.training.gradient_checkpointing and not tc.checkpoint:
            key = cfg.teacher_key(name)
            models.append((f"{key}.training.gradient_checkpointing", key, tc))
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
    check_tracking(cfg, storage, name)


def preflight(cfg: Config, storage, name: str, *, storage_key: str = "run.storage_path",
              name_key: str = "run.name") -> None:
    validate_run_name(name, name_key)
    check_storage(storage, storage_key)
    check_inputs(cfg)
    check_models(cfg)
    check_scale(cfg, storage, name)
