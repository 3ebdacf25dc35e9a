"""Runs a validated search on Ray and writes its report (imported only by ``raydistill tune``)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback

from raydistill.tune import report as rep
from raydistill.tune.search import (
    SearchState,
    make_scheduler,
    make_searcher,
    make_trial_driver,
    plan_resources,
    remeasure_latency,
    trial_rows,
)
from raydistill.tune.space import SearchSpec, grid_size, short_names, to_tune_param_space

EXIT_OK, EXIT_FAIL, EXIT_INTERRUPTED = 0, 1, 130


def _console():
    from rich.console import Console

    c = Console(highlight=False, soft_wrap=True)
    if not c.is_terminal:
        c = Console(highlight=False, soft_wrap=True, width=int(os.environ.get("COLUMNS", 140)))
    return c


class ProgressPrinter(Callback):
    """Concise live progress (Ray's own table is off): one line per trial event + running counts.

    Pickled with the Tuner (tuner.pkl), so it holds no console; counters restart on --resume."""

    def __init__(self, epochs: int, names: dict[str, str], total: int | None, metric: str = "val_accuracy",
                 quality: str = "accuracy"):
        self.epochs, self.names, self.total = epochs, names, total
        self.metric, self.quality = metric, quality  # what each epoch line / completion line shows
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.monotonic()
        self.running: set[str] = set()
        self.done = self.stopped = self.errored = 0

    def setup(self, **info):
        self._reset()

    def __getstate__(self):
        return {"epochs": self.epochs, "names": self.names, "total": self.total, "metric": self.metric,
                "quality": self.quality}

    def __setstate__(self, state):
        self.__dict__.update({"metric": "val_accuracy", "quality": "accuracy", **state})
        self._reset()

    def _cfg(self, trial) -> str:
        parts = []
        for k, v in (trial.config or {}).items():
            n = self.names.get(k, k)
            parts.append(f"{n}={v:.3g}" if isinstance(v, float) else f"{n}={v}")
        return " ".join(parts)

    def _line(self, msg: str) -> None:
        el = time.monotonic() - self.t0
        tot = f"/{self.total}" if self.total else ""
        _console().print(
            f"[dim][{el:6.0f}s][/dim] {msg}  [dim](running {len(self.running)}, done {self.done}{tot}, "
            f"stopped early {self.stopped}, errored {self.errored})[/dim]")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._line(f"start   {trial.trial_id} {self._cfg(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ep = result.get("epoch", result.get("training_iteration"))
        val = float(result.get(self.metric, math.nan))
        cr = float(result.get("compression_ratio", math.nan))
        self._line(f"epoch   {trial.trial_id} {ep}/{self.epochs} {self.metric}={val:.4f} compression={cr:.2f}x")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        last = trial.last_result or {}
        ep = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
        early = ep < self.epochs
        self.stopped += int(early)
        how = f"[yellow]stopped early at epoch {ep}[/yellow]" if early else "finished"
        self._line(f"{how} {trial.trial_id} {self.quality}={float(last.get(self.quality, math.nan)):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.errored += 1
        self._line(f"[red]error[/red]   {trial.trial_id} (logs: {trial.local_path})")


class InterruptAfter(Callback):
    """Testing aid: once ``n`` trials finished, send this process SIGUSR1, which is Tune's own
    graceful interrupt (the Ctrl-C path): the experiment state is saved and ``fit`` returns with the
    other trials unfinished; ``raydistill tune --resume`` continues.  One-shot: a restored copy
    (tuner.pkl) is disarmed."""

    def __init__(self, n: int):
        self.n, self.count, self.armed = n, 0, True

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.armed = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.count += 1
        if self.armed and self.count >= self.n:
            self.armed = False
            os.kill(os.getpid(), signal.SIGUSR1)


@contextlib.contextmanager
def search_ray_session(address: str | None = None):
    """Ray for one search: :func:`raydistill.distill.ray_session` (joins ``address`` or an initialised
    Ray; a local instance has its State API pinned, which stopped trials need to give their CPUs back)."""
    with _distill_api().ray_session(address=address):
        yield


def _worker_cpus(cfg) -> tuple[float, float]:
    rpw = dict(cfg.scaling.resources_per_worker or {})
    cpu = float(rpw.get("CPU", rpw.get("cpu", 1.0)))
    gpu = float(rpw.get("GPU", rpw.get("gpu", 1.0 if cfg.scaling.use_gpu else 0.0)))
    return cpu, (gpu if cfg.scaling.use_gpu else 0.0)


def _distill_api():
    from raydistill.tune.search import distill_api

    return distill_api()


def baseline_hash(cfg) -> str:
    """What the from-scratch student learns depends on (not where it runs)."""
    from raydistill.config import config_hash

    d = cfg.distill
    return config_hash({
        "student": cfg.student.model_dump(mode="json"), "data": cfg.data.learning_dump(),
        "epochs": d.epochs, "batch_size": d.batch_size, "optimizer": d.optimizer.model_dump(mode="json"),
        "lr_schedule": d.lr_schedule.model_dump(mode="json"), "transfer_size": d.transfer_set.size,
        "teacher_outputs": d.teacher_outputs, "seed": cfg.run.seed, "num_workers": cfg.scaling.num_workers,
        "grad_clip": d.grad_clip,
    })


def baseline_score(cfg, quality: rep.Quality, *, storage_root: Path, plan, console) -> float | None:
    """Test quality (accuracy, or a causal LM's perplexity) of the student trained from scratch
    (cross-entropy, no teacher, no pruning) with the same budget, for pareto.png's reference line: trained
    once through the pipeline's baseline trainer and cached under ``<storage>/baselines/<hash>.json``
    (later searches with the same student reuse it)."""
    import json

    q = quality.key
    h = baseline_hash(cfg)
    root = storage_root / "baselines"
    cache = root / f"{h}.json"
    if cache.is_file():
        val = float(json.loads(cache.read_text())[q])
        console.print(f"baseline (student from scratch): {q} {val:{quality.fmt}} (cached {cache})")
        return val
    d = _distill_api()
    t0 = time.monotonic()
    trainer = d.build_baseline_trainer(
        cfg, storage_path=str(root), name=h, num_workers=plan.num_workers,
        resources_per_worker=plan.resources_per_worker(cfg.scaling.resources_per_worker))
    result = trainer.fit()
    metrics = dict(getattr(result, "metrics", None) or {})
    if q not in metrics:  # resumed a finished run: nothing new reported; read its last checkpoint
        ck = getattr(result, "checkpoint", None)
        metrics = d.evaluate_checkpoint(cfg, ck.path) if ck is not None else {}
    if q not in metrics:
        console.print(f"[yellow]baseline: no {q} reported; pareto.png gets no baseline line[/yellow]")
        return None
    val = float(metrics[q])
    cache.write_text(json.dumps({q: val, "epoch": metrics.get("epoch"), "hash": h}) + "\n")
    console.print(f"baseline (student from scratch): {q} {val:{quality.fmt}} ({time.monotonic() - t0:.0f}s)")
    return val


def _saved_trials(exp_dir: Path, results) -> list:
    """The trials as Tune saved them. After an interrupt, the in-memory trials of ``results`` read
    TERMINATED (Tune stops them while shutting down) although they did not finish; the saved state has
    them unfinished (PENDING/PAUSED), which is what --resume continues."""
    from ray.tune import ExperimentAnalysis

    try:
        return list(ExperimentAnalysis(str(exp_dir)).trials)
    except Exception:  # pragma: no cover - unreadable state: fall back to the live objects
        return list(results._experiment_analysis.trials)


def run_search(cfg, spec: SearchSpec, *, exp_dir: Path, address: str | None, resume: bool, console,
               interrupt_after: int | None, t_start: float, saved_config_name: str, state_name: str) -> int:
    import ray

    from raydistill.config import config_from_dict, dump_config

    d = _distill_api()

    exp_dir = exp_dir.resolve()
    storage_root, name = exp_dir.parent, exp_dir.name
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        # saved with the effective search spec (--num-samples etc. applied): --resume reads it back
        cfg = cfg.model_copy(update={"search": spec.model_dump(mode="json", exclude_none=True)})
        dump_config(cfg, exp_dir / saved_config_name)
    state_path = exp_dir / state_name
    state = SearchState.load(state_path)
    if not state.started:
        state.started = time.time()

    base = cfg.model_dump(mode="json")
    build = config_from_dict
    epochs = int(cfg.distill.epochs)
    names = short_names(list(spec.space))
    total = spec.num_samples * grid_size(spec)
    quality = rep.quality_for(cfg.data.task)
    # Teachers (and their cache) live at the storage root, shared with `raydistill distill` runs.
    teacher_root = storage_root

    # Per-trial result.json / progress.csv: Tune's ExperimentAnalysis (and --resume) read them.
    # raydistill's quiet Ray env would turn them off (setdefault), so say it explicitly.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "0"
    # Ray's own progress output off (verbose=0 silences only the legacy reporter; the new one prints
    # its experiment table regardless): ProgressPrinter prints concise lines instead.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    interrupted = False
    with search_ray_session(address):
        res = ray.cluster_resources()
        cpw, gpw = _worker_cpus(cfg)
        plan = plan_resources(
            cluster_cpus=float(res.get("CPU", 0.0)), num_workers=int(cfg.scaling.num_workers),
            cpu_per_worker=cpw, driver_cpu=spec.trial_driver_cpu, max_concurrent=spec.max_concurrent,
            cluster_gpus=float(res.get("GPU", 0.0)), gpu_per_worker=gpw,
        )
        state.plan = {"max_concurrent": plan.max_concurrent, "num_workers": plan.num_workers,
                      "cpu_per_worker": plan.cpu_per_worker, "gpu_per_worker": plan.gpu_per_worker,
                      "driver_cpu": plan.driver_cpu, "cluster_cpus": plan.cluster_cpus}
        console.print(
            f"[bold]raydistill tune[/bold] {name}: {total} trials x {epochs} epochs, "
            f"searcher {spec.searcher.type}"
            + (f" (objectives {spec.objectives})" if spec.multi_objective else "")
            + f", scheduler {spec.scheduler.type}, {plan.max_concurrent} at once on {plan.cluster_cpus:g} CPUs "
              f"({plan.num_workers} worker(s) x {plan.cpu_per_worker:g} CPU + {plan.driver_cpu:g} CPU driver per trial)"
            + (f"; {plan.note}" if plan.note else ""))
        console.print(f"results: {exp_dir}")

        t0 = time.monotonic()
        teachers = d.ensure_teachers(cfg, str(teacher_root))
        teacher = next(iter(teachers.values()))  # the first: the reference line of pareto.png
        state.teacher_path = str(teacher.path)
        tq = teacher.metrics.get(quality.key, teacher.accuracy if quality.key == "accuracy" else None)
        state.teacher_score = None if tq is None else float(tq)
        console.print(f"teacher: {quality.key} {float(tq if tq is not None else math.nan):{quality.fmt}} "
                      f"({teacher.path}, {time.monotonic() - t0:.0f}s)")
        if spec.baseline and state.baseline_score is None:
            state.baseline_score = baseline_score(cfg, quality, storage_root=teacher_root, plan=plan,
                                                  console=console)
        state.save(state_path)

        rpw = plan.resources_per_worker(cfg.scaling.resources_per_worker)
        driver = make_trial_driver(base, teachers, train_storage=str(exp_dir / "train"),
                                   plan_workers=plan.num_workers, resources_per_worker=rpw,
                                   build_config=build)
        trainable = tune.with_resources(driver, {"cpu": plan.driver_cpu})
        callbacks: list[Any] = [ProgressPrinter(epochs, names, total, spec.metric, quality.key)]
        from raydistill.tune.tracking import tune_callbacks

        callbacks += tune_callbacks(cfg, storage_root, name)  # run.tracking: Ray's MLflow / TensorBoard loggers
        if interrupt_after:
            callbacks.append(InterruptAfter(interrupt_after))

        t_fit = time.monotonic()
        if resume and tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
            console.print(f"resuming {exp_dir}")
        else:
            if resume:
                console.print(f"{exp_dir}: no Tune state saved yet; starting the search")
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune_param_space(spec),
                tune_config=tune.TuneConfig(
                    scheduler=make_scheduler(spec, epochs),
                    search_alg=make_searcher(spec, plan.max_concurrent),
                    num_samples=spec.num_samples,
                    # random/grid: the generator carries the cap itself (Tune ignores this for it)
                    max_concurrent_trials=plan.max_concurrent if spec.searcher.type == "optuna" else None,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(storage_root),
                    failure_config=tune.FailureConfig(max_failures=max(int(cfg.run.max_failures), 0)),
                    verbose=0,
                    callbacks=callbacks,
                ),
            )
        results = tuner.fit()
        fit_s = time.monotonic() - t_fit
        trials = _saved_trials(exp_dir, results)
        interrupted = len(trials) < total or any(t.status not in ("TERMINATED", "ERROR") for t in trials)

    state.wall_s.append({"fit_s": round(fit_s, 1), "total_s": round(time.monotonic() - t_start, 1),
                         "interrupted": interrupted})
    state.save(state_path)

    rows = trial_rows(trials, base, spec, build)
    remeasure_latency(rows, base, build, console)
    code = write_report(rows, spec, cfg, exp_dir, state, console=console, interrupted=interrupted,
                        build=build, dump=dump_config)
    from raydistill.tune.tracking import log_search_summary

    log_search_summary(cfg, storage_root, name, exp_dir)
    return code


def write_report(rows, spec: SearchSpec, cfg, exp_dir: Path, state: SearchState, *, console,
                 interrupted: bool, build, dump) -> int:
    """trials.csv, pareto.json, pareto.png, best_config.yaml + the rich front table."""
    quality = rep.quality_for(cfg.data.task)
    refs = dict(teacher=state.teacher_score, baseline=state.baseline_score, quality=quality)
    summary = rep.summarize(rows)
    front = rep.compute_front(rows, quality.objectives())
    rep.write_trials_csv(rows, exp_dir / "trials.csv")
    wall = state.wall_s[-1] if state.wall_s else {}
    rep.write_pareto_json(front, exp_dir / "pareto.json", **refs,
                          extra={"summary": summary, "search": exp_dir.name, "wall": state.wall_s,
                                 "plan": state.plan,
                                 "fronts": {k: [rep._front_row(r) for r in v]
                                            for k, v in rep.compute_fronts(rows, quality).items()}})
    rep.plot_pareto(rows, front, exp_dir / "pareto.png", **refs,
                    title=f"{exp_dir.name}: {summary['trials']} trials, {summary['stopped_early']} stopped early")
    console.print(rep.front_table(front, **refs,
                                  title=f"Pareto front ({quality.key} vs compression), {len(front)} of "
                                        f"{summary['trials']} trials"))
    if rep.sizes_differ(rows):  # a search over the student's shape: the fronts over parameters and latency
        fronts = rep.compute_fronts(rows, quality)
        rep.plot_size_fronts(rows, fronts, exp_dir / "pareto_size.png", quality=quality, teacher=state.teacher_score,
                             title=f"{exp_dir.name}: {quality.key} vs parameters and CPU latency")
        for what, key in (("parameters", "params"), ("CPU latency", "latency")):
            f = fronts[f"{quality.key}_{key}"]
            console.print(rep.size_front_table(f, quality=quality, title=f"Pareto front ({quality.key} vs {what}), "
                                                                         f"{len(f)} of {summary['trials']} trials"))
    console.print(
        f"trials {summary['trials']}: finished {summary['finished']} (stopped early {summary['stopped_early']}, "
        f"{100 * summary['stopped_fraction']:.0f}%), errored {summary['errored']}, unfinished {summary['unfinished']}"
        + (f"; search wall time {wall.get('total_s', 0):.0f}s" if wall else ""))

    code = EXIT_OK
    best = rep.select_best(rows, spec.metric, spec.mode, spec.min_sparsity)
    best_path = exp_dir / "best_config.yaml"
    if best is None:
        what = f" with compression.sparsity >= {spec.min_sparsity}" if spec.min_sparsity is not None else ""
        console.print(f"[red]no finished trial{what} with metric {spec.metric}; best_config.yaml not written[/red]")
        if best_path.exists():
            best_path.unlink()
        code = EXIT_FAIL
    else:
        rep.write_best_config(best, cfg.model_dump(mode="json"), best_path, build=build, dump=dump,
                              run_name=f"{cfg.run.name}_best")
        console.print(f"best trial {best['trial_id']} ({spec.metric}={best[spec.metric]:.4f}, "
                      f"temperature={best['temperature']:.3g}, alpha={best['alpha']:.3f}, "
                      f"sparsity={best['sparsity']:.3f}) -> {best_path}\n"
                      f"  reproduce: raydistill distill {best_path}")
    console.print(f"wrote {exp_dir}/{{trials.csv, pareto.json, pareto.png"
                  + (", pareto_size.png" if rep.sizes_differ(rows) else "") + (", best_config.yaml}" if best else "}"))
    if interrupted:
        console.print(f"[yellow]search interrupted; continue with: raydistill tune --resume "
                      f"--storage-path {exp_dir.parent} --name {exp_dir.name}[/yellow]")
        return EXIT_INTERRUPTED
    return code
