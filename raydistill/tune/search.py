"""Ray Tune search over distillation hyper-parameters, one Ray Train run per trial (Train V2 style).

Each trial is a *driver function* that builds the same ``TorchTrainer`` as ``raydistill distill``
(:func:`raydistill.distill.build_student_trainer`) and forwards the workers' per-epoch reports to
Tune with ``ray.tune.integration.ray_train.TuneReportCallback``; the deprecated
``Tuner(TorchTrainer)`` form is not used.  The teacher is trained or loaded once, before the trials,
and shared by all of them.

Resources, so that a search always finishes (also on a 2-CPU machine):

* a trial's driver function only waits on its Train controller, so it reserves ``trial_driver_cpu``
  (0.01 CPU by default); the controller itself is a 0-CPU actor (Ray Train's choice);
* the trial's workers reserve ``num_workers x cpu_per_worker``; ``max_concurrent`` defaults to
  ``floor(cluster CPUs / (num_workers x cpu_per_worker))`` (>= 1) and the per-worker CPU is then
  lowered (fractional) just enough that ``max_concurrent`` whole trials, drivers included, fit into
  the cluster at once.  So no trial ever holds resources another running trial waits for;
* stopped trials (ASHA) get their placement groups removed by Ray Train's placement-group cleaner,
  which needs Ray's dashboard / State API; :func:`raydistill.distill.ray_session` keeps it on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from raydistill.tune.space import SearchSpec, apply_trial_config, short_names
from raydistill.utils import error_line

# Ray resource quantities are fixed-point with 1e-4 granularity.
_RES_STEP = 1e-4


# --------------------------------------------------------------------------------------------
# resource plan (pure, unit-tested)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourcePlan:
    max_concurrent: int
    num_workers: int
    cpu_per_worker: float
    gpu_per_worker: float
    driver_cpu: float
    cluster_cpus: float
    cluster_gpus: float
    note: str = ""

    @property
    def cpu_per_trial(self) -> float:
        return self.num_workers * self.cpu_per_worker + self.driver_cpu

    def resources_per_worker(self, base: dict[str, float] | None) -> dict[str, float]:
        out = {k: v for k, v in (base or {}).items() if k.upper() not in ("CPU", "GPU")}
        out["CPU"] = self.cpu_per_worker
        if self.gpu_per_worker:
            out["GPU"] = self.gpu_per_worker
        return out


def _floor_res(x: float) -> float:
    return math.floor(x / _RES_STEP + 1e-6) * _RES_STEP


def plan_resources(
    *,
    cluster_cpus: float,
    num_workers: int,
    cpu_per_worker: float,
    driver_cpu: float,
    max_concurrent: int | None = None,
    cluster_gpus: float = 0.0,
    gpu_per_worker: float = 0.0,
) -> ResourcePlan:
    """How many trials run at once and how many CPUs each worker reserves (see module doc)."""
    if num_workers < 1:
        raise ValueError(f"scaling.num_workers must be >= 1, got {num_workers}")
    if cpu_per_worker <= 0:
        raise ValueError(f"CPU per worker must be > 0, got {cpu_per_worker}")
    if cluster_cpus <= driver_cpu:
        raise ValueError(f"the cluster has {cluster_cpus} CPUs, not enough for one trial driver ({driver_cpu})")
    notes = []
    workers_cpu = num_workers * cpu_per_worker
    if max_concurrent is None:
        k = max(1, int(math.floor(cluster_cpus / workers_cpu + 1e-9)))
        if gpu_per_worker > 0:
            if cluster_gpus < gpu_per_worker * num_workers and cluster_gpus <= 0:
                raise ValueError("scaling.use_gpu is set but the cluster has no GPU")
            k = max(1, min(k, int(math.floor(cluster_gpus / (gpu_per_worker * num_workers) + 1e-9))))
    else:
        k = int(max_concurrent)
        if k < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {k}")
    fit = _floor_res((cluster_cpus / k - driver_cpu) / num_workers)
    if fit <= 0:
        raise ValueError(
            f"max_concurrent={k} trials do not fit into {cluster_cpus} CPUs with {driver_cpu} CPU per trial driver"
        )
    cpw = min(cpu_per_worker, fit)
    if cpw < cpu_per_worker:
        notes.append(f"CPU per worker lowered {cpu_per_worker:g} -> {cpw:g} so {k} trial(s) fit at once")
    gpw = gpu_per_worker
    if gpu_per_worker > 0 and cluster_gpus > 0:
        gfit = _floor_res(cluster_gpus / (k * num_workers))
        if gfit < gpu_per_worker:
            notes.append(f"GPU per worker lowered {gpu_per_worker:g} -> {gfit:g} so {k} trial(s) fit at once")
            gpw = gfit
    return ResourcePlan(
        max_concurrent=k, num_workers=num_workers, cpu_per_worker=cpw, gpu_per_worker=gpw,
        driver_cpu=driver_cpu, cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus, note="; ".join(notes),
    )


# --------------------------------------------------------------------------------------------
# Tune pieces
# --------------------------------------------------------------------------------------------


def distill_api():
    """The pipeline's public API, ``raydistill.distill`` (ray_session, ensure_teachers,
    build_student_trainer, build_baseline_trainer, evaluate_checkpoint; lazily imported)."""
    import raydistill.distill as d

    return d


def search_extras(cfg) -> dict:
    from raydistill.distill.steps import search_extras as extras

    return extras(cfg)


def make_trial_driver(base: dict, teachers: Any, *, train_storage: str, plan_workers: int,
                      resources_per_worker: dict[str, float], build_config: Callable[[dict], Any]):
    """The Tune trainable: one full distillation (Ray Train) per trial, reports forwarded to Tune.
    ``teachers``: name -> ``TeacherArtifact`` (or the first teacher's alone), trained once before the trials."""

    def distill_trial(config: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial_id = tune.get_context().get_trial_id()
        cfg = build_config(apply_trial_config(base, config))
        # Keep >= 2 checkpoints: when ASHA stops a trial, its worker may already have reported (and
        # checkpointed) the next epoch, which with num_to_keep=1 deletes the one Tune last saw.
        if cfg.run.num_to_keep < 2:
            cfg.run.num_to_keep = 2
        # Retries belong to Tune (tune.FailureConfig, run.max_failures): a retried trial reruns this driver,
        # and Ray Train resumes from the run's last checkpoint (same name). Inside a trial, Train must not
        # retry: when ASHA stops a trial its worker dies first, and a controller allowed to retry starts a
        # new worker group (a new placement group) before it is killed itself. Nobody removes that group
        # (the trial's placement-group cleaner has exited), its CPUs stay reserved, and the search hangs.
        # Measured here: 2 such groups leaked in a 24-trial search, which then waited forever.
        cfg.run.max_failures = 0
        cfg, model = trial_student(cfg, teachers, Path(train_storage), trial_id)
        trainer = distill_api().build_student_trainer(
            cfg, teachers, model=model,
            storage_path=train_storage,
            name=f"trial_{trial_id}",  # stable across retries -> Ray Train resumes from its checkpoint
            callbacks=[_epoch_reports_only(TuneReportCallback()) if cfg.distill.checkpoint_every_steps
                       else TuneReportCallback()],
            num_workers=plan_workers,
            resources_per_worker=resources_per_worker,
            extras=search_extras(cfg),  # bits (QAT) and structured width of the trial's student
        )
        trainer.fit()

    return distill_trial


def trial_student(cfg, teachers: Any, train_storage: Path, trial_id: str) -> tuple[Any, dict | None]:
    """A trial's student: with ``student.init.from: teacher`` the first of ``teachers`` pruned to the trial's
    target shape (on the trial's driver, saved under ``<train>/pruned/trial_<id>``; a retried trial prunes
    again, the same way), else the config's own. Returns (the config of the trial's stages, the student's
    model or None)."""
    from raydistill.distill import student_init

    calibration = student_init.calibration(cfg, train_storage)
    if calibration is None:
        return cfg, None
    from raydistill.distill.data import task_info

    first = next(iter(teachers.values())) if isinstance(teachers, dict) else teachers
    cfg_s, pruned = student_init.student_from_teacher(cfg, first, calibration,
                                                      train_storage / "pruned" / f"trial_{trial_id}",
                                                      info=task_info(cfg, train_storage))
    return cfg_s, pruned.model


def _epoch_reports_only(inner):
    """A Ray Train callback passing only the epoch reports on to ``inner`` (Tune's report callback): ASHA and
    the searcher compare epochs; the step reports of ``distill.checkpoint_every_steps`` (issue 22) only
    checkpoint the trial's own Ray Train run."""
    from ray.train import UserCallback

    class EpochReports(UserCallback):
        def __init__(self, cb):
            self.cb = cb

        def after_report(self, run_context, metrics, checkpoint):
            if not metrics[0].get("step_report"):
                self.cb.after_report(run_context, metrics, checkpoint)

    return EpochReports(inner)


def make_scheduler(spec: SearchSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or epochs
    # One past the last epoch: a trial that reaches its last epoch ends by itself (Ray Train finishes
    # cleanly) instead of being stopped by the scheduler at the same moment; rungs are unchanged.
    kw = dict(time_attr="epoch", metric=spec.metric, mode=spec.mode, max_t=max_t + 1,
              grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.group_by:
        return make_grouped_asha(s.group_by, **kw)
    return ASHAScheduler(**kw)


def make_grouped_asha(group_by: str, **asha_kwargs):
    """ASHA run separately per value of ``group_by`` (one AsyncHyperBandScheduler per value).

    Plain ASHA on accuracy stops pruned trials because pruning costs accuracy in the early epochs it
    compares them at, so the sparse end of the front is never trained to completion. Grouped by the
    target sparsity, a trial is only compared with trials pruned to the same sparsity."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    class GroupedASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self._metric, self._mode = asha_kwargs.get("metric"), asha_kwargs.get("mode")
            self._groups: dict[str, AsyncHyperBandScheduler] = {}

        def _asha(self, trial) -> AsyncHyperBandScheduler:
            key = repr((trial.config or {}).get(group_by))
            if key not in self._groups:
                self._groups[key] = AsyncHyperBandScheduler(**asha_kwargs)
            return self._groups[key]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return not (metric or mode) or (metric in (None, self._metric) and mode in (None, self._mode))

        def on_trial_add(self, tune_controller, trial):
            self._asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._asha(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            asha = self._asha(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            asha = self._asha(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return f"GroupedASHA by {group_by}: " + "; ".join(
                f"{k}: {v.debug_string()}" for k, v in self._groups.items())

    return GroupedASHA()


def make_searcher(spec: SearchSpec, max_concurrent: int | None = None):
    """Random / grid: Tune's BasicVariantGenerator (it takes the concurrency cap itself: Tune ignores
    ``TuneConfig.max_concurrent_trials`` for a generator passed in); Optuna: OptunaSearch, capped by
    ``max_concurrent_trials`` (a ConcurrencyLimiter)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = spec.searcher
    if s.type in ("random", "grid"):
        return BasicVariantGenerator(random_state=s.seed, max_concurrent=int(max_concurrent or 0))
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError as e:  # pragma: no cover - optuna is an optional extra
        raise RuntimeError("searcher optuna needs the optuna extra: pip install 'raydistill[optuna]'") from e
    obj = spec.objectives
    if len(obj) == 1:
        (metric, mode), = obj.items()
        return OptunaSearch(metric=metric, mode=mode, seed=s.seed)
    return OptunaSearch(metric=list(obj), mode=list(obj.values()), seed=s.seed)


# --------------------------------------------------------------------------------------------
# collecting results
# --------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def trial_rows(trials: list, base: dict, spec: SearchSpec, build_config: Callable[[dict], Any]) -> list[dict]:
    """One report row per Tune trial (status from Tune; metrics from its last report)."""
    from raydistill.tune.report import TASK_COLUMNS as TASK_METRICS, TRIAL_COLUMNS

    reserved = tuple(c for c in TRIAL_COLUMNS if c not in ("temperature", "alpha", "sparsity"))
    names = short_names(list(spec.space), reserved=reserved)
    rows = []
    for t in trials:
        cfg_over = dict(t.config or {})
        eff = apply_trial_config(base, cfg_over)
        last = dict(t.last_result or {})
        epochs_cfg = int(eff["distill"]["epochs"])
        ep = last.get("epoch", last.get("training_iteration"))
        ep = int(ep) if _num(ep) is not None else 0
        status = str(t.status)
        err = ""
        if status == "ERROR":
            ef = getattr(t, "error_file", None) or ""
            err = _error_file_line(ef)
        rows.append({
            "trial_id": t.trial_id,
            "status": status,
            "stopped_early": bool(status == "TERMINATED" and ep < epochs_cfg),
            "epochs_run": ep,
            "epochs_configured": epochs_cfg,
            "temperature": eff["distill"]["temperature"],
            "alpha": eff["distill"]["alpha"],
            "sparsity": eff["compression"]["sparsity"],
            "params": {names[k]: v for k, v in cfg_over.items() if k in names},
            "overrides": cfg_over,
            **{k: _num(last.get(k)) for k in TASK_METRICS},
            "compression_ratio": _num(last.get("compression_ratio")),
            "bits": _num(last.get("bits")),
            "model_bytes": _num(last.get("model_bytes")),
            "model_params": _num(last.get("params")),
            "latency_ms_b1": _num(last.get("latency_ms_b1")),
            "latency_ms_b256": _num(last.get("latency_ms_b256")),
            "latency_under_load": last.get("latency_under_load"),
            "achieved_sparsity": _num(last.get("sparsity")),
            "train_loss": _num(last.get("train_loss")),
            "lr": _num(last.get("lr")),
            "time_s": _num(last.get("time_total_s")),
            "checkpoint_path": last.get("checkpoint_path"),
            "error": err,
        })
        _reconcile_checkpoint(rows[-1], epochs_cfg)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def remeasure_latency(rows: list[dict], base: dict, build_config: Callable[[dict], Any], console=None) -> None:
    """The trials' CPU latency measured again after the search, one checkpoint at a time on an otherwise
    idle driver: a trial's own last-epoch reading was taken while other trials trained. Rows get the new
    ``latency_ms_b1`` / ``latency_ms_b256`` and ``latency_under_load`` (other processes still took CPU time
    during the reading). Rows without a latency or a checkpoint are left as they are."""
    from raydistill.distill.evaluate import checkpoint_latency

    keys = ("latency_ms_b1", "latency_ms_b256")
    todo = [r for r in rows if any(r.get(k) is not None for k in keys) and r.get("checkpoint_path")
            and Path(r["checkpoint_path"]).is_dir()]
    if todo and console is not None:
        console.print(f"timing {len(todo)} trial checkpoints one at a time (CPU latency after the search)")
    for r in todo:
        cfg = build_config(apply_trial_config(base, r["overrides"]))
        q = cfg.compression.steps()
        q = dict(q).get("quantize")
        lat = checkpoint_latency(cfg, r["checkpoint_path"], quantize=q.model_dump(mode="json") if q else None)
        r.update({k: lat[k] for k in (*keys, "latency_under_load") if k in lat})


def _reconcile_checkpoint(row: dict, epochs_cfg: int) -> None:
    """If the checkpoint Tune last saw is gone (the worker checkpointed a later epoch before the stop
    reached it, and Ray Train rotated the old one out), describe the trial by its newest checkpoint:
    its metrics come from that checkpoint's meta.json, so a front point and its checkpoint agree."""
    ck = row.get("checkpoint_path")
    if not ck or Path(ck).is_dir():
        return
    run_dir = Path(ck).parent
    cands = sorted((p for p in run_dir.glob("checkpoint_*") if (p / "meta.json").is_file()),
                   key=lambda p: p.name)
    if not cands:
        return
    newest = cands[-1]
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError):
        return
    m = meta.get("metrics", {})
    row["checkpoint_path"] = str(newest)
    from raydistill.tune.report import TASK_COLUMNS

    for k, src in (*((c, c) for c in TASK_COLUMNS), ("model_bytes", "model_bytes"),
                   ("compression_ratio", "compression_ratio"), ("achieved_sparsity", "sparsity"),
                   ("train_loss", "train_loss"), ("lr", "lr")):
        if _num(m.get(src)) is not None:
            row[k] = _num(m.get(src))
    ep = meta.get("epoch", m.get("epoch"))
    if _num(ep) is not None:
        row["epochs_run"] = int(ep)
        row["stopped_early"] = bool(row["status"] == "TERMINATED" and int(ep) < epochs_cfg)


def _error_file_line(path: str) -> str:
    """The line of a trial's error file that names its error (:func:`raydistill.utils.error_line`)."""
    try:
        return error_line(Path(path).read_text(), 300)
    except OSError:
        return "error (no error file)"


@dataclass
class SearchState:
    """Saved next to the Tune experiment (search_state.json): what the report needs on --resume.
    ``teacher_score`` / ``baseline_score``: their test quality (accuracy, or a causal LM's perplexity)."""

    teacher_path: str | None = None
    teacher_score: float | None = None
    baseline_score: float | None = None
    plan: dict = field(default_factory=dict)
    started: float = 0.0
    wall_s: list = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        if not path.exists():
            return cls()
        d = json.loads(path.read_text())
        for old in ("teacher", "baseline"):  # a state saved before the quality was task-generic
            if f"{old}_accuracy" in d:
                d.setdefault(f"{old}_score", d.pop(f"{old}_accuracy"))
        return cls(**d)
