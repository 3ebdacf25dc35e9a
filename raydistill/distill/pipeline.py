"""The whole ``raydistill distill`` job: teacher (cached) -> assistants -> baseline / dense / sparse students
-> evaluation -> ``report.json``, ``report.md`` and ``curves.png`` under ``<storage>/<name>/``.

Stages (each its own Ray Train run under ``<storage>/<name>/<stage>``)::

    teacher        cross-entropy, cached under <storage>/teachers/<hash> and reused by later runs
    assistant_i    distilled from the previous link of the chain (Mirzadeh et al., 2020), dense
    baseline       the student from scratch, cross-entropy on labelled rows, same budget
    dense_student  distilled, sparsity 0 (only when compression.sparsity > 0)
    student        distilled while pruned to compression.sparsity, then converted to SparseLinear

Baseline, dense_student and student are independent, so by default they run as concurrent trainers
(``run.concurrent_stages``), each worker getting a share of the CPUs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from raydistill.config import Config, ConfigError, config_hash, dump_config
from raydistill.distill import interrupts
from raydistill.distill.preflight import preflight
from raydistill.distill.runlock import run_lock
from raydistill.utils import write_json_atomic
from raydistill.distill.trainer import (
    TeacherArtifact, artifact_from_checkpoint, build_baseline_trainer, build_student_trainer, ensure_teacher,
    evaluate_checkpoint, final_checkpoint_dir, resolve_storage, teacher_hash,
)

log = logging.getLogger("raydistill")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage!r} failed: {_short_error(error)}")
        self.stage, self.error = stage, error


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Ray wraps worker errors; the last non-empty line is usually the real one
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------------------
# progress: poll each stage's epochs.jsonl (written by the rank-0 worker after each report)


class Progress:
    """One bar per stage. Its unit is the optimizer step of the stage's budget (issue 22): the workers' lines
    in ``epochs.jsonl`` and ``steps.jsonl`` carry ``global_step`` and ``total_steps``, so the bar, its rate
    and ETA follow steps (an epoch may take an hour), with the throughput (tokens/s or samples/s) beside
    the epoch's metrics. Until the first line arrives the bar counts epochs."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._stages: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._progress = None
        self._lines = False

    def add(self, stage: str, log_path: Path, epochs: int | None):
        with self._lock:
            self._stages[stage] = {"path": Path(log_path), "epochs": epochs, "offset": 0, "task": None,
                                   "last": None, "t0": time.time(), "steps_offset": 0, "total": None,
                                   "step": 0, "step0": None, "text": "starting ..."}

    def __enter__(self):
        import sys

        self._lines = self.enabled and not sys.stderr.isatty()  # logs/CI: one plain line per epoch
        if self.enabled and not self._lines:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._progress = RP(TextColumn("[bold]{task.description:<14}"), BarColumn(bar_width=24),
                                MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                transient=False, refresh_per_second=4)
            self._progress.__enter__()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def _loop(self):
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # never let the display kill the job
                log.debug("progress poll failed", exc_info=True)

    @staticmethod
    def _new_lines(path: Path, st: dict, key: str) -> list[dict]:
        if not path.is_file():
            return []
        with open(path) as fh:
            fh.seek(st[key])
            chunk = fh.read()
            if not chunk.endswith("\n"):
                chunk = chunk[: chunk.rfind("\n") + 1]
            st[key] += len(chunk)
        out = []
        for line in chunk.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def _step(self, st: dict, m: dict) -> None:
        """Steps of the budget done, and when the first one was seen (the ETA's rate)."""
        if m.get("total_steps"):
            st["total"] = int(m["total_steps"])
        if m.get("global_step") is not None:
            st["step"] = int(m["global_step"])
            if st["step0"] is None:
                st["step0"] = (st["step"], time.time())

    def _eta(self, st: dict) -> str:
        if not st["total"] or st["step0"] is None or st["step"] <= st["step0"][0]:
            return ""
        rate = (st["step"] - st["step0"][0]) / max(1e-9, time.time() - st["step0"][1])
        return f"  eta {(st['total'] - st['step']) / rate:.0f}s"

    def poll(self):
        with self._lock:
            for stage, st in self._stages.items():
                if st["task"] is None and self._progress is not None:
                    st["task"] = self._progress.add_task(stage, total=st["epochs"], metrics="starting ...")
                for m in self._new_lines(st["path"].with_name("steps.jsonl"), st, "steps_offset"):
                    self._step(st, m)
                    if self._progress is not None and st["task"] is not None and st["total"]:
                        self._progress.update(st["task"], total=st["total"], completed=st["step"],
                                              metrics=f"{st['text']}  {_rate_text(m)}")
                for m in self._new_lines(st["path"], st, "offset"):
                    st["last"] = m
                    self._step(st, m)
                    log.info("%s epoch %s/%s: %s", stage, m.get("epoch"), st["epochs"],
                             {k: m.get(k) for k in ("train_loss", "val_accuracy", "accuracy", "val_perplexity",
                                                    "perplexity", "sparsity", "lr", "global_step")})
                    txt = st["text"] = _epoch_text(m)
                    if self._lines:
                        import sys

                        steps = f"step {st['step']}/{st['total']}  " if st["total"] else ""
                        print(f"[{stage}] epoch {m['epoch']}/{m.get('epochs') or st['epochs']}  {steps}{txt}  "
                              f"{_rate_text(m)}{self._eta(st)}", file=sys.stderr, flush=True)
                    if self._progress is not None and st["task"] is not None:
                        if st["total"]:
                            self._progress.update(st["task"], total=st["total"], completed=st["step"],
                                                  metrics=f"{txt}  {_rate_text(m)}")
                        else:
                            self._progress.update(st["task"], completed=int(m["epoch"]), metrics=txt)

    def done(self, stage: str, note: str = ""):
        with self._lock:
            st = self._stages.get(stage)
            if st and self._progress is not None and st["task"] is not None:
                total = st["total"] or st["epochs"]
                self._progress.update(st["task"], total=total, completed=total,
                                      metrics=note or self._progress.tasks[st["task"]].fields["metrics"])


def _rate_text(m: dict) -> str:
    if m.get("tokens_per_s"):
        return f"{m['tokens_per_s']:,.0f} tok/s"
    return f"{m['samples_per_s']:,.0f} samples/s" if m.get("samples_per_s") else ""


def _epoch_text(m: dict) -> str:
    if "perplexity" in m:
        return (f"loss {m['train_loss']:.3f}  val ppl {m['val_perplexity']:.2f}  test ppl {m['perplexity']:.2f}  "
                f"sparsity {m['sparsity']:.2f}")
    return (f"loss {m['train_loss']:.3f}  val {m['val_accuracy']:.3f}  test {m['accuracy']:.3f}  "
            f"sparsity {m['sparsity']:.2f}")


# ----------------------------------------------------------------------------------------------------


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

        teacher_dir = None if cfg.teacher.checkpoint else storage / "teachers" / teacher_hash(cfg)
        with Tracker(cfg, storage, name, run_dir, teacher_dir) as tracker:
            report = _run_locked(cfg, storage, name, run_dir, address, progress, t0)
            tracker.finish(report)
            return report


def _run_locked(cfg: Config, storage: Path, name: str, run_dir: Path, address, progress: bool, t0: float) -> dict:
    from raydistill.distill.session import ray_session

    _check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    log_path = run_dir / "distill.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("run %s: storage %s", name, storage)
    timings: dict[str, float] = {}
    try:
        with ray_session(address=address) as ray:
            log.info("ray resources: %s", ray.cluster_resources())
            with Progress(enabled=progress) as prog:
                # ---- teacher --------------------------------------------------------------------------
                ts = time.time()
                th = teacher_hash(cfg)
                if not cfg.teacher.checkpoint:
                    prog.add("teacher", storage / "teachers" / th / "epochs.jsonl",
                             cfg.teacher.training.epochs)
                try:
                    teacher = ensure_teacher(cfg, storage)
                except (ConfigError, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    if interrupts.interrupted():
                        raise KeyboardInterrupt from exc
                    if isinstance(exc, StageFailed):
                        raise
                    log.error("teacher failed:\n%s", "".join(traceback.format_exception(exc)))
                    raise StageFailed("teacher", exc) from exc
                note = f"test ppl {teacher.metrics['perplexity']:.2f}" if "perplexity" in teacher.metrics else \
                    f"test {teacher.accuracy:.3f}"
                prog.done("teacher", note + ("  (cached)" if teacher.cached else ""))
                timings["teacher"] = time.time() - ts

                # ---- assistants (sequential chain) -----------------------------------------------------
                current: TeacherArtifact = teacher
                assistants = []
                for i, a in enumerate(cfg.assistants, 1):
                    stage = f"assistant_{i}"
                    ts = time.time()
                    prog.add(stage, run_dir / stage / "epochs.jsonl", a.epochs or cfg.distill.epochs)
                    spec = {"model": a.model, "kwargs": dict(a.kwargs)}
                    tr = build_student_trainer(cfg, current, storage_path=run_dir, name=stage, stage=stage,
                                               model=spec, sparsity=0.0, epochs=a.epochs)
                    res = _fit(tr, stage)
                    ck = final_checkpoint_dir(res, run_dir, stage)
                    current = artifact_from_checkpoint(ck, model=spec, stage=stage)
                    ev = evaluate_checkpoint(cfg, ck, model=spec)
                    assistants.append({"stage": stage, **spec, **ev})
                    prog.done(stage)
                    timings[stage] = time.time() - ts

                # ---- baseline, dense student, compressed student ----------------------------------------
                from raydistill.distill.steps import structured_init, student_extras

                recipe = dict(cfg.compression.steps())  # checked against the student by preflight
                sparse = bool(recipe)
                stages = ["baseline"] + (["dense_student"] if sparse else []) + ["student"]
                # prune_structured: the student starts from the pruned dense student, so it runs after it;
                # so does QAT fine-tuning of the dense student (quantize start: dense_student)
                q_step = recipe.get("quantize")
                qat_ft = q_step is not None and q_step.mode == "qat" and q_step.start == "dense_student"
                after_dense = "prune_structured" in recipe or qat_ft
                first = [s for s in stages if not (after_dense and s == "student")]
                concurrent = len(first) if cfg.run.concurrent_stages else 1
                res_per_worker = _resources(cfg, concurrent)

                def build(stage, extras=None, resources=res_per_worker):
                    if stage == "baseline":
                        return build_baseline_trainer(cfg, storage_path=run_dir, name=stage,
                                                      resources_per_worker=resources)
                    ft = qat_ft and stage == "student"  # QAT fine-tuning: its own epochs and peak lr
                    return build_student_trainer(
                        cfg, current, storage_path=run_dir, name=stage, stage=stage,
                        sparsity=None if stage == "student" else 0.0, resources_per_worker=resources,
                        extras=extras, epochs=q_step.epochs if ft else None, lr=q_step.lr if ft else None)

                trainers = {}
                for stage in stages:
                    prog.add(stage, run_dir / stage / "epochs.jsonl", cfg.distill.epochs)
                for stage in first:
                    trainers[stage] = build(stage, student_extras(cfg) if stage == "student" else None)
                results: dict[str, Any] = {}
                ts = time.time()
                if concurrent > 1:
                    # daemon threads, waited for in short slices: Ctrl-C interrupts the wait at once
                    futs = {s: interrupts.submit(_fit, trainers[s], s, name=f"raydistill-{s}") for s in first}
                    errors = []
                    for s, f in futs.items():
                        try:
                            results[s] = interrupts.result(f)
                            prog.done(s)
                        except StageFailed as exc:
                            errors.append(exc)
                    if errors:
                        raise errors[0]
                else:
                    for s in first:
                        results[s] = _fit(trainers[s], s)
                        prog.done(s)
                structured_report = None
                if after_dense and "prune_structured" not in recipe:  # QAT fine-tuning of the dense student
                    init_path = str(final_checkpoint_dir(results["dense_student"], run_dir, "dense_student"))
                    log.info("quantize: QAT fine-tuning from %s", init_path)
                    trainers["student"] = build("student", student_extras(cfg, init_from=init_path),
                                                resources=_resources(cfg, 1))
                    results["student"] = _fit(trainers["student"], "student")
                    prog.done("student")
                elif after_dense:
                    import torch

                    if cfg.data.task == "causal_lm":  # calibration: packed training blocks of token ids
                        from raydistill.distill.trainer import text_data

                        x_cal = text_data(cfg, storage).train.astype("int64")
                    else:
                        from raydistill.distill.trainer import load_arrays

                        x_cal = load_arrays(cfg, storage)[0].x_train
                    init_path, widths, structured_report = structured_init(
                        cfg, final_checkpoint_dir(results["dense_student"], run_dir, "dense_student"),
                        run_dir / "structured_init", torch.from_numpy(x_cal))
                    log.info("prune_structured: widths %s", widths)
                    trainers["student"] = build("student", student_extras(cfg, structure=widths, init_from=init_path),
                                                resources=_resources(cfg, 1))
                    results["student"] = _fit(trainers["student"], "student")
                    prog.done("student")
                timings["students"] = time.time() - ts

        # ---- evaluation + report (Ray is down; evaluation is local and cheap) -----------------------------
        qcfg = recipe["quantize"].model_dump(mode="json") if "quantize" in recipe else None
        evals = {s: evaluate_checkpoint(cfg, final_checkpoint_dir(results[s], run_dir, s), teacher=current,
                                        quantize=qcfg if s == "student" else None,
                                        export=str(run_dir / "student.safetensors") if s == "student" else None)
                 for s in stages}
        if qcfg is not None:  # post-training quantization of the dense distilled student, for comparison
            evals["dense_student_ptq"] = evaluate_checkpoint(
                cfg, final_checkpoint_dir(results["dense_student"], run_dir, "dense_student"), teacher=current,
                quantize=qcfg | {"mode": "ptq"})
        lm = cfg.data.task == "causal_lm"
        report = {
            "name": name, "run_dir": str(run_dir), "task": cfg.data.task,
            "teacher": {**teacher.to_dict(), "accuracy": teacher.accuracy},
            "assistants": assistants,
            "baseline": evals["baseline"],
            "student": evals["student"],
            **({"dense_student": evals["dense_student"]} if sparse else {}),
            **({"dense_student_ptq": evals["dense_student_ptq"]} if "dense_student_ptq" in evals else {}),
            "compression_steps": [t for t, _ in cfg.compression.steps()],
            **({"prune_structured": structured_report} if structured_report else {}),
            "config": cfg.model_dump(mode="json"),
            "timings": timings,
        }
        if lm:
            report["perplexity_vs_baseline"] = evals["student"]["perplexity"] / evals["baseline"]["perplexity"] - 1
            if sparse:
                report["sparse_vs_dense"] = evals["student"]["perplexity"] / evals["dense_student"]["perplexity"] - 1
            from raydistill.distill.export import export_student

            report["export"] = str(export_student(cfg, final_checkpoint_dir(results["student"], run_dir, "student"),
                                                  run_dir / "export" / "student"))
        else:
            report["gain_over_baseline"] = evals["student"]["accuracy"] - evals["baseline"]["accuracy"]
            if sparse:
                report["sparse_vs_dense"] = evals["student"]["accuracy"] - evals["dense_student"]["accuracy"]
        report["wall_seconds"] = time.time() - t0
        curves = {s: _read_log(run_dir / s / "epochs.jsonl") for s in stages}
        curves.update({a["stage"]: _read_log(run_dir / a["stage"] / "epochs.jsonl") for a in assistants})
        if not cfg.teacher.checkpoint:
            curves["teacher"] = _read_log(storage / "teachers" / teacher_hash(cfg) / "epochs.jsonl")
        report["curves_png"] = str(_plot(curves, run_dir / "curves.png"))
        write_json_atomic(run_dir / "report.json", report)
        (run_dir / "report.md").write_text(report_markdown(report))
        log.info("report: %s", run_dir / "report.json")
        return report
    finally:
        root.removeHandler(handler)
        handler.close()


def _read_log(path: Path) -> list[dict]:
    """Per-epoch metrics of a stage; after a resume the latest line for each epoch wins."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_epoch[int(m["epoch"])] = m
    return [by_epoch[k] for k in sorted(by_epoch)]


def _plot(curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    lm = any("perplexity" in r for rows in curves.values() for r in rows)
    keys = ("val_perplexity", "perplexity") if lm else ("val_accuracy", "accuracy")
    for stage, rows in curves.items():
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_loss"] for r in rows], label=stage)
        axes[1].plot(ep, [r.get(keys[0]) for r in rows], label=stage)
        axes[2].plot(ep, [r.get(keys[1]) for r in rows], label=stage)
    titles = ("train loss", "val perplexity", "test perplexity") if lm else \
        ("train loss", "val accuracy", "test accuracy")
    if lm:
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_markdown(r: dict) -> str:
    if r.get("task") == "causal_lm":
        return _report_markdown_lm(r)
    fmt = (lambda v, f: "" if v is None else f.format(v))
    rows = [("teacher", r["teacher"]["model"].get("model", "?"), {"accuracy": r["teacher"]["accuracy"]})]
    for a in r.get("assistants", []):
        rows.append((a["stage"], a["model"], a))
    cfg = r["config"]
    smodel = cfg["student"]["model"]
    for key in ("baseline", "dense_student", "dense_student_ptq", "student"):
        if key in r:
            rows.append((key, smodel, r[key]))
    lines = [f"# raydistill run `{r['name']}`", "",
             "| stage | model | test accuracy | macro F1 | macro precision | macro recall | sparsity | compression "
             "| bytes | bytes vs dense student | ms/batch 1 | ms/batch 256 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = (r.get("dense_student") or {}).get("model_bytes")
    for st, m, e in rows:
        rel = e.get("model_bytes") / ref if ref and e.get("model_bytes") else None
        lines.append(f"| {st} | {m} | {e['accuracy']:.2%} | {fmt(e.get('macro_f1'), '{:.3f}')} | "
                     f"{fmt(e.get('macro_precision'), '{:.3f}')} | {fmt(e.get('macro_recall'), '{:.3f}')} | "
                     f"{fmt(e.get('sparsity'), '{:.1%}')} | {fmt(e.get('compression_ratio'), '{:.2f}x')} | "
                     f"{fmt(e.get('model_bytes'), '{:,}')} | {fmt(rel, '{:.1%}')} | "
                     f"{fmt(e.get('latency_ms_b1'), '{:.3f}')} | {fmt(e.get('latency_ms_b256'), '{:.3f}')} |")
    lines += ["", f"- compression steps: {', '.join(r.get('compression_steps') or []) or 'none'}",
              f"- distilled student vs baseline: {r['gain_over_baseline'] * 100:+.1f} points"]
    if "sparse_vs_dense" in r:
        lines.append(f"- compressed vs dense distilled student: {r['sparse_vs_dense'] * 100:+.1f} points")
    s = r["student"]
    if "projected_sparse_int8_bytes" in s:
        lines.append(f"- student bytes as int8 SparseLinear (projected, int16 indices): "
                     f"{s['projected_sparse_int8_bytes']:,}")
    lines += [f"- student parameters: {s['nonzero_params']:,} nonzero of {s['params']:,}",
              f"- wall time: {r['wall_seconds']:.0f} s", "", "![curves](curves.png)", ""]
    return "\n".join(lines)


def _report_markdown_lm(r: dict) -> str:
    fmt = (lambda v, f: "" if v is None else f.format(v))
    lines = [f"# raydistill run `{r['name']}` (causal LM)", "",
             "| stage | test perplexity | next-token accuracy | teacher agreement | tokens/s | sparsity | compression |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    t = r["teacher"].get("metrics") or {}
    lines.append(f"| teacher | {fmt(t.get('perplexity'), '{:.2f}')} | {fmt(t.get('next_token_accuracy'), '{:.2%}')} "
                 "| | | | |")
    for key in ("baseline", "dense_student", "student"):
        if key in r:
            e = r[key]
            lines.append(f"| {key} | {e['perplexity']:.2f} | {e['next_token_accuracy']:.2%} | "
                         f"{fmt(e.get('teacher_agreement'), '{:.2%}')} | {fmt(e.get('tokens_per_s'), '{:,.0f}')} | "
                         f"{e['sparsity']:.1%} | {e['compression_ratio']:.2f}x |")
    lines += ["", f"- distilled student vs baseline: perplexity {r['perplexity_vs_baseline'] * 100:+.1f}%"]
    if "sparse_vs_dense" in r:
        lines.append(f"- sparse vs dense distilled student: perplexity {r['sparse_vs_dense'] * 100:+.1f}%")
    if r.get("export"):
        lines.append(f"- exported student (save_pretrained + tokenizer): `{r['export']}`")
    lines += [f"- wall time: {r['wall_seconds']:.0f} s", "", "## greedy samples (student)", ""]
    for smp in r["student"].get("samples", []):
        lines += ["```", smp["prompt"] + "→" + smp["continuation"], "```"]
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)
