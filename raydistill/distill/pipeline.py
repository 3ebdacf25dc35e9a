"""The whole ``raydistill distill`` job: teachers (cached) -> assistants -> baseline / dense / sparse students
-> evaluation -> ``report.json``, ``report.md`` and ``curves.png`` under ``<storage>/<name>/``.

Stages (each its own Ray Train run under ``<storage>/<name>/<stage>``)::

    teacher        cross-entropy, cached under <storage>/teachers/<hash> and reused by later runs (one per
                   teacher of ``teachers``)
    assistant_i    distilled from the previous link of the chain (Mirzadeh et al., 2020), dense: each link
                   takes the first teacher's place in the loss terms
    baseline       the student from scratch, cross-entropy on labelled rows, same budget
    dense_student  distilled from random init, sparsity 0 (only with a compression recipe or
                   ``student.init.from: teacher``)
    student        the job's student: starts from ``student.init`` (random, or the teacher pruned to the
                   student's shape: ``<run>/pruned_student``, see ``student_init``), distilled while pruned
                   to compression.sparsity, then converted to SparseLinear

With ``student.init.from: teacher`` the baseline and dense_student get the pruned student's shape (random
weights), so the report compares three students of one shape.

Baseline, dense_student and student are independent, so by default they run as concurrent trainers
(``run.concurrent_stages``), each worker getting a share of the CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from raydistill.config import Config, ConfigError, config_hash, dump_config
from raydistill.distill import interrupts, student_init
from raydistill.distill.data import resolve_storage
from raydistill.distill.evaluate import TeacherModels, evaluate_checkpoint, final_checkpoint_dir
from raydistill.distill.preflight import preflight
from raydistill.distill.progress import Progress
from raydistill.distill.report import build_report, write_report
from raydistill.distill.runlock import run_lock
from raydistill.distill.spec import TeacherArtifact
from raydistill.distill.stages import build_baseline_trainer, build_student_trainer
from raydistill.distill.teachers import artifact_from_checkpoint, ensure_teacher, teacher_log
from raydistill.tasks import get_task
from raydistill.utils import error_line

log = logging.getLogger("raydistill")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage!r} failed: {_short_error(error)}")
        self.stage, self.error = stage, error


def _short_error(exc: BaseException) -> str:
    # Ray wraps worker errors; the last line naming an error is usually the real one
    return error_line(str(exc)) or type(exc).__name__


def _comparable(cfg: Config) -> dict:
    d = cfg.model_dump(mode="json")
    for k in ("storage_path", "name", "num_to_keep", "max_failures", "concurrent_stages", "debug_crash_at_epoch",
              "debug_crash_at_step", "tracking", "tracking_uri"):
        d["run"].pop(k, None)
    d.pop("search", None)
    d.pop("scaling", None)
    return d


def _check_run_dir(cfg: Config, run_dir: Path) -> None:
    """A run name belongs to one config: re-running it resumes; a different config must use a new name."""
    stamp = run_dir / "config.yaml"
    if stamp.is_file():
        from raydistill.config import load_config

        try:
            old = load_config(stamp)
        except ConfigError:
            return
        if config_hash(_comparable(old)) != config_hash(_comparable(cfg)):
            raise ConfigError(f"run directory {run_dir} holds a run with a different config; pass a new "
                              f"--name (or delete the directory) to start another run")


def _fit(trainer, stage: str):
    try:
        return interrupts.fit(trainer)  # off the main thread: Ctrl-C stays ours (see distill/interrupts.py)
    except BaseException as exc:  # noqa: BLE001 - re-raised with the stage name
        if isinstance(exc, KeyboardInterrupt) or interrupts.interrupted():
            raise KeyboardInterrupt from exc
        log.error("stage %s failed:\n%s", stage, "".join(traceback.format_exception(exc)))
        raise StageFailed(stage, exc) from exc


def _resources(cfg: Config, concurrent: int) -> dict | None:
    """Per-worker CPUs so that ``concurrent`` trainers fit on the cluster at once (unless configured)."""
    if cfg.scaling.resources_per_worker:
        return cfg.scaling.resources_per_worker
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    share = cpus / max(1, concurrent * cfg.scaling.num_workers)
    return {"CPU": max(0.01, min(1.0, round(share - 0.005, 2)))} if share < 1 else None


def run_distill(cfg: Config, *, storage_path=None, name: str | None = None, address: str | None = None,
                progress: bool = True) -> dict:
    """Run the whole job (see module doc) and return the report dict (also written to report.json)."""
    t0 = time.time()
    storage = resolve_storage(storage_path, cfg)
    name = name or cfg.run.name
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"storage_path": str(storage), "name": name})})
    run_dir = storage / name
    preflight(cfg, storage, name)  # name, storage, models: a ConfigError before Ray starts
    with run_lock(run_dir):  # a second run with the same name fails here, at once
        if cfg.run.tracking == "none":
            return _run_locked(cfg, storage, name, run_dir, address, progress, t0)
        from raydistill.distill.tracking import Tracker  # run.tracking (issue 22): opened before Ray starts

        with Tracker(cfg, storage, name, run_dir, _teacher_logs(cfg, storage)) as tracker:
            report = _run_locked(cfg, storage, name, run_dir, address, progress, t0)
            tracker.finish(report)
            return report


def _run_locked(cfg: Config, storage: Path, name: str, run_dir: Path, address, progress: bool, t0: float) -> dict:
    from raydistill.distill.session import ray_session

    _check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    with _job_log(run_dir / "distill.log"):
        log.info("run %s: storage %s", name, storage)
        timings: dict[str, float] = {}
        with ray_session(address=address) as ray, Progress(enabled=progress) as prog:
            log.info("ray resources: %s", ray.cluster_resources())
            corpus = _corpus_size(cfg, storage, prog)
            calibration = student_init.calibration(cfg, storage)  # student.init.from: teacher (else None)
            teachers = _teachers(cfg, storage, prog, timings)
            current, assistants = _assistants(cfg, teachers, run_dir, prog, timings)
            cfg_s, pruned = _student_init(cfg, teachers, calibration, storage, run_dir, prog, timings)
            plan = _StudentPlan(cfg_s, pruned)
            results, structured_report = _students(cfg_s, plan, current, storage, run_dir, prog, timings)
        # evaluation + report (Ray is down; evaluation is local and cheap)
        evals = _evaluate_students(cfg_s, plan, results, next(iter(current.values())), run_dir)
        report = build_report(cfg, name, run_dir, teachers, assistants, evals, plan.sparse, structured_report,
                              timings, corpus, student_init=pruned.report if pruned else None)
        if get_task(cfg.data.task).exports_pretrained:
            from raydistill.distill.export import export_student

            report["export"] = str(export_student(cfg, final_checkpoint_dir(results["student"], run_dir, "student"),
                                                  run_dir / "export" / "student"))
        report["wall_seconds"] = time.time() - t0
        write_report(report, run_dir, plan.stages + [a["stage"] for a in assistants], _teacher_logs(cfg, storage))
        log.info("report: %s", run_dir / "report.json")
        return report


@contextlib.contextmanager
def _job_log(path: Path):
    """The job's log file (``distill.log``) on the root logger while the job runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _corpus_size(cfg: Config, storage: Path, prog: Progress) -> dict:
    """Training tokens (causal LM) and the first teacher's parameters; a warning before training when the
    corpus is small for the teacher (:func:`raydistill.distill.verdict.corpus_warning`)."""
    from raydistill.distill.data import task_info
    from raydistill.distill.verdict import corpus_warning

    info = task_info(cfg, storage)
    tokens = int(info.get("train_blocks", 0)) * int(info.get("seq_len", 0)) or None
    params = _teacher_params(cfg, info) if tokens else None
    msg = corpus_warning(tokens, params)
    if msg:
        prog.note(msg)
    return {"train_tokens": tokens, "teacher_params": params}


def _teacher_params(cfg: Config, info: dict) -> int | None:
    """The teacher's parameter count, from a model built on the meta device (no memory, no weights)."""
    import torch

    from raydistill.distill.spec import model_dict

    try:
        with torch.device("meta"):
            net = get_task(cfg.data.task).build_model(model_dict(cfg.teacher), info)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: no warning, no count
        log.debug("teacher parameters not counted", exc_info=True)
        return None
    from raydistill.models import count_params

    return int(count_params(net))


def _teacher_stage(cfg: Config, name: str) -> str:
    """A teacher's stage name in progress and curves: ``teacher``, or ``teacher:NAME`` of several."""
    return "teacher" if len(cfg.teacher_map()) == 1 else f"teacher:{name}"


def _teacher_logs(cfg: Config, storage: Path) -> dict[str, Path]:
    """Each teacher trained by this job (not loaded from a checkpoint): its stage name -> its per-epoch log."""
    logs = {_teacher_stage(cfg, n): teacher_log(cfg, storage, n) for n in cfg.teacher_map()}
    return {k: v for k, v in logs.items() if v is not None}


def _teachers(cfg: Config, storage: Path, prog: Progress, timings: dict) -> dict[str, TeacherArtifact]:
    """Every trained teacher, by name (cached, or trained now through Ray Train)."""
    out = {}
    for name in cfg.teacher_map():
        stage, ts = _teacher_stage(cfg, name), time.time()
        tlog = teacher_log(cfg, storage, name)
        if tlog is not None:
            prog.add(stage, tlog, cfg.teacher_map()[name].training.epochs)
        try:
            teacher = ensure_teacher(cfg, storage, teacher=name)
        except (ConfigError, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if interrupts.interrupted():
                raise KeyboardInterrupt from exc
            if isinstance(exc, StageFailed):
                raise
            log.error("%s failed:\n%s", stage, "".join(traceback.format_exception(exc)))
            raise StageFailed(stage, exc) from exc
        note = f"test ppl {teacher.metrics['perplexity']:.2f}" if "perplexity" in teacher.metrics else \
            f"test {teacher.accuracy:.3f}"
        prog.done(stage, note + ("  (cached)" if teacher.cached else ""))
        timings[stage] = time.time() - ts
        out[name] = teacher
    return out


def _assistants(cfg: Config, teachers: dict[str, TeacherArtifact], run_dir: Path, prog: Progress,
                timings: dict) -> tuple[dict[str, TeacherArtifact], list[dict]]:
    """The teacher-assistant chain, in order: each link distilled (dense) from the previous one, which takes
    the first teacher's place among the teachers. Returns the student's teachers (the last link in the
    first one's place) and each assistant's evaluation."""
    first = next(iter(teachers))
    current, assistants = dict(teachers), []
    for i, a in enumerate(cfg.assistants, 1):
        stage = f"assistant_{i}"
        ts = time.time()
        prog.add(stage, run_dir / stage / "epochs.jsonl", a.epochs or cfg.distill.epochs)
        spec = {"model": a.model, "kwargs": dict(a.kwargs)}
        tr = build_student_trainer(cfg, current, storage_path=run_dir, name=stage, stage=stage,
                                   model=spec, sparsity=0.0, epochs=a.epochs)
        ck = final_checkpoint_dir(_fit(tr, stage), run_dir, stage)
        current[first] = artifact_from_checkpoint(ck, model=spec, stage=stage)
        assistants.append({"stage": stage, **spec, **evaluate_checkpoint(cfg, ck, model=spec)})
        prog.done(stage)
        timings[stage] = time.time() - ts
    return current, assistants


def _student_init(cfg: Config, teachers: dict[str, TeacherArtifact], calibration, storage: Path, run_dir: Path,
                  prog: Progress, timings: dict) -> tuple[Config, "student_init.PrunedStudent | None"]:
    """``student.init.from: teacher``: the (first) teacher pruned to the student's shape, saved under the run
    (:mod:`raydistill.distill.student_init`); the config of the student stages."""
    if calibration is None:
        return cfg, None
    from raydistill.distill.data import task_info

    ts = time.time()
    prog.add("pruned_teacher", run_dir / student_init.PRUNED_DIR / "epochs.jsonl", 1)
    cfg_s, pruned = student_init.student_from_teacher(cfg, next(iter(teachers.values())), calibration,
                                                      run_dir / student_init.PRUNED_DIR, info=task_info(cfg, storage))
    r = pruned.report
    note = (f"{r['shape_after']['num_hidden_layers']} x {r['shape_after']['hidden_size']}, {r['params_after']:,} "
            f"params, calibration ppl {r['calibration_perplexity_pruned']:.1f}")
    log.info("student.init: the teacher pruned to %s (%s)", r["shape_after"], note)
    prog.done("pruned_teacher", note)
    timings["student_init"] = time.time() - ts
    return cfg_s, pruned


class _StudentPlan:
    """Which student stages run and in what order. Baseline, dense_student (only with a compression
    recipe or a student made from the teacher) and student are independent and run at once, except that
    the student starts from the dense student with ``prune_structured`` or QAT fine-tuning
    (``quantize: {start: dense_student}``). ``pruned``: the student's init made from the teacher."""

    def __init__(self, cfg: Config, pruned: "student_init.PrunedStudent | None" = None):
        self.recipe = dict(cfg.compression.steps())  # checked against the student by preflight
        self.sparse = bool(self.recipe)
        self.pruned = pruned
        self.stages = ["baseline"] + (["dense_student"] if self.sparse or pruned else []) + ["student"]
        q = self.recipe.get("quantize")
        self.q_step = q
        self.qat_ft = q is not None and q.mode == "qat" and q.start == "dense_student"
        self.structured = "prune_structured" in self.recipe
        self.after_dense = self.structured or self.qat_ft
        self.first = [s for s in self.stages if not (self.after_dense and s == "student")]
        self.concurrent = len(self.first) if cfg.run.concurrent_stages else 1
        self.quantize = self.recipe["quantize"].model_dump(mode="json") if "quantize" in self.recipe else None


def _students(cfg: Config, plan: _StudentPlan, teachers: dict[str, TeacherArtifact], storage: Path, run_dir: Path,
              prog: Progress, timings: dict) -> tuple[dict[str, Any], dict | None]:
    """Train the baseline, dense and compressed students; their Ray results and the prune_structured report."""
    from raydistill.distill.steps import student_extras

    res_per_worker = _resources(cfg, plan.concurrent)

    def build(stage, extras=None, resources=res_per_worker):
        if stage == "baseline":
            return build_baseline_trainer(cfg, storage_path=run_dir, name=stage, resources_per_worker=resources)
        ft = plan.qat_ft and stage == "student"  # QAT fine-tuning: its own epochs and peak lr
        return build_student_trainer(
            cfg, teachers, storage_path=run_dir, name=stage, stage=stage,
            model=plan.pruned.model if plan.pruned and stage == "student" else None,
            sparsity=None if stage == "student" else 0.0, resources_per_worker=resources,
            extras=extras, epochs=plan.q_step.epochs if ft else None, lr=plan.q_step.lr if ft else None)

    for stage in plan.stages:
        prog.add(stage, run_dir / stage / "epochs.jsonl", cfg.distill.epochs)
    trainers = {s: build(s, student_extras(cfg) if s == "student" else None) for s in plan.first}
    ts = time.time()
    results = _fit_all(trainers, prog, concurrent=plan.concurrent > 1)
    structured_report = None
    if plan.after_dense:  # the student starts from the distilled dense student
        dense = final_checkpoint_dir(results["dense_student"], run_dir, "dense_student")
        if plan.structured:
            init_path, widths, structured_report = _structured_init(cfg, storage, dense, run_dir)
            extras = student_extras(cfg, structure=widths, init_from=init_path)
        else:  # QAT fine-tuning of the dense student
            log.info("quantize: QAT fine-tuning from %s", dense)
            extras = student_extras(cfg, init_from=str(dense))
        results.update(_fit_all({"student": build("student", extras, resources=_resources(cfg, 1))}, prog))
    timings["students"] = time.time() - ts
    return results, structured_report


def _fit_all(trainers: dict, prog: Progress, *, concurrent: bool = False) -> dict[str, Any]:
    """Fit each trainer (at once in daemon threads when ``concurrent``, waited for in short slices so that
    Ctrl-C interrupts the wait at once); the first failed stage is raised after all have ended."""
    results: dict[str, Any] = {}
    if not concurrent:
        for s, tr in trainers.items():
            results[s] = _fit(tr, s)
            prog.done(s)
        return results
    futs = {s: interrupts.submit(_fit, tr, s, name=f"raydistill-{s}") for s, tr in trainers.items()}
    errors = []
    for s, f in futs.items():
        try:
            results[s] = interrupts.result(f)
            prog.done(s)
        except StageFailed as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return results


def _structured_init(cfg: Config, storage: Path, dense: Path, run_dir: Path) -> tuple[str, dict, dict]:
    """prune_structured: the dense distilled student pruned to the recipe's widths, ranked on a calibration
    batch of training rows."""
    from raydistill.distill.steps import structured_init

    x_cal = get_task(cfg.data.task).calibration_inputs(cfg, storage)
    init_path, widths, rep = structured_init(cfg, dense, run_dir / "structured_init", x_cal)
    log.info("prune_structured: widths %s", widths)
    return init_path, widths, rep


def _evaluate_students(cfg: Config, plan: _StudentPlan, results: dict, teacher: TeacherArtifact,
                       run_dir: Path) -> dict[str, dict]:
    """Each student stage's final checkpoint evaluated on the test split (the student converted by its
    recipe and exported), plus post-training quantization of the dense student for comparison."""
    def final(stage):
        return final_checkpoint_dir(results[stage], run_dir, stage)

    teachers = TeacherModels()  # the teacher built once for every student of the run
    evals = {s: evaluate_checkpoint(cfg, final(s), teacher=teacher, quantize=plan.quantize if s == "student" else None,
                                    export=str(run_dir / "student.safetensors") if s == "student" else None,
                                    teachers=teachers)
             for s in plan.stages}
    if plan.quantize is not None:
        evals["dense_student_ptq"] = evaluate_checkpoint(cfg, final("dense_student"), teacher=teacher,
                                                         quantize=plan.quantize | {"mode": "ptq"}, teachers=teachers)
    return evals
