"""Experiment tracking (``run.tracking: none | mlflow | tensorboard``, ``run.tracking_uri``).

``raydistill distill``: the driver follows each stage's ``epochs.jsonl`` and ``steps.jsonl`` (the files the
progress display reads; rank 0 writes them) and logs every line as it appears, then the report and the
exported student at the end. Doing it from the driver rather than in Ray Train callbacks keeps one code
path for both backends and for every stage (concurrent stages included), needs nothing shipped to the
Train controller, and sees the per-step lines that are no Ray report.

* mlflow: one run per job (``run.name``) in the experiment ``raydistill``, with the flattened config as
  params, ``config.yaml``, ``report.json``, ``report.md``, ``curves.png`` and the exported student as
  artifacts; one nested run per stage with its metrics (x axis: the optimizer step; per-step lines as
  ``step/<name>``). Default URI ``sqlite:///<storage>/mlflow.db`` (MLflow 3 refuses its ``./mlruns`` file
  store unless ``MLFLOW_ALLOW_FILE_STORE`` is set, which raydistill sets for a ``file:`` URI given here).
* tensorboard: event files under ``<tracking_uri or <storage>/<name>/tensorboard>/<stage>``; the config
  and the report as text (TensorBoard has no artifact store: the exported student's path is logged).

``raydistill tune``: Ray's own Tune callbacks (:func:`tune_callbacks`), one MLflow run / TensorBoard
directory per trial, plus the search's report files (:func:`log_search_summary`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from raydistill.config import Config, ConfigError
from raydistill.distill.data import check_storage
from raydistill.utils import new_jsonl_lines

log = logging.getLogger("raydistill")

EXPERIMENT = "raydistill"
# bookkeeping keys of the jsonl lines that are no metrics
_SKIP = {"attempt", "time", "fn_start", "wall", "step_report", "report_seconds", "epochs", "global_step"}
_REMOTE = ("http", "https", "databricks", "postgresql", "mysql", "mssql")


# ----------------------------------------------------------------------------------------------------
# where


def tracking_uri(cfg: Config, storage, name: str) -> str | None:
    """The URI (mlflow) or log directory (tensorboard) a run logs to; None without tracking."""
    kind, uri = cfg.run.tracking, cfg.run.tracking_uri
    if kind == "none":
        return None
    if uri:
        return uri
    if kind == "mlflow":
        return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"
    return str(Path(storage).resolve() / name / "tensorboard")


def _local_path(uri: str) -> tuple[Path | None, bool]:
    """(the local path an mlflow URI writes, whether it is a database file) or (None, False) for a server."""
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith(("file:", "sqlite:")) else ""
    if scheme == "sqlite":
        rest = uri.split(":", 1)[1].lstrip("/")
        return Path("/" + rest), True
    if scheme == "file":
        rest = uri.split(":", 1)[1]
        return Path("/" + rest.lstrip("/")) if rest.startswith("/") else Path(rest), False
    if scheme in _REMOTE:
        return None, False
    if scheme:
        raise ConfigError(f"run.tracking_uri: {uri!r}: scheme {scheme!r} is not an MLflow tracking store; use "
                          f"sqlite:///PATH, file:PATH, a directory, or a server (http://, https://, databricks, "
                          f"postgresql://, mysql://, mssql://)")
    return Path(uri), False


def check_tracking(cfg: Config, storage, name: str) -> None:
    """ConfigError naming ``run.tracking`` / ``run.tracking_uri`` when the backend is not installed or its
    local store cannot be written (before Ray starts). A tracking server is checked when the job starts
    logging to it, also before Ray starts."""
    kind = cfg.run.tracking
    if kind == "none":
        if cfg.run.tracking_uri:
            raise ConfigError("run.tracking_uri is set but run.tracking is 'none': set run.tracking to mlflow or "
                              "tensorboard (or drop the URI)")
        return
    module = {"mlflow": "mlflow", "tensorboard": "tensorboard"}[kind]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"run.tracking: {kind} needs the {module} package: pip install 'raydistill[tracking]'"
                          ) from None
    uri = tracking_uri(cfg, storage, name)
    key = "run.tracking_uri" if cfg.run.tracking_uri else "run.storage_path"
    if kind == "tensorboard":
        if "://" in uri:
            raise ConfigError(f"run.tracking_uri: {uri!r}: TensorBoard logs to a local directory here (torch's "
                              f"SummaryWriter); give a path")
        check_storage(Path(uri), key)
        return
    path, is_db = _local_path(uri)
    if path is None:
        return
    if is_db:
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise ConfigError(f"{key}: {uri!r}: {path} is not a writable database file")
        check_storage(path.parent, key)
    else:
        check_storage(path, key)


# ----------------------------------------------------------------------------------------------------
# following the jsonl logs


class _Follow:
    """New complete lines of one jsonl file; each line is kept once per x value (a resumed run repeats the
    steps after its checkpoint: the first value logged stays)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.offset, self.last = path, key, 0, None

    def new_lines(self) -> list[dict]:
        lines, self.offset = new_jsonl_lines(self.path, self.offset)
        out = []
        for m in lines:
            x = m.get(self.key)
            if x is None or (self.last is not None and x <= self.last):
                continue
            self.last = x
            out.append(m)
        return out


def _metrics(line: dict, prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in line.items()
            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (config -> MLflow params)."""
    if isinstance(d, dict):
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d) if not isinstance(d, str) else d}


class Tracker:
    """Follows ``<run_dir>/<stage>/{epochs,steps}.jsonl`` (and the teacher's) on a thread and logs them;
    :meth:`finish` logs the report and the exported student and closes the runs."""

    def __init__(self, cfg: Config, storage, name: str, run_dir: Path, teacher_logs: dict[str, Path] | None = None):
        """``teacher_logs``: each teacher trained by this job, its stage name -> its ``epochs.jsonl``."""
        self.cfg, self.name, self.run_dir = cfg, name, Path(run_dir)
        self.teacher_logs = dict(teacher_logs or {})
        self.kind, self.uri = cfg.run.tracking, tracking_uri(cfg, storage, name)
        self._follows: dict[str, list[_Follow]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._backend: _Backend | None = None

    def __enter__(self) -> "Tracker":
        self._backend = (_MLflow if self.kind == "mlflow" else _TensorBoard)(self.uri, self.name, self.cfg)
        self._thread = threading.Thread(target=self._loop, name="raydistill-tracking", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._backend is not None and not self._backend.closed:
            self._stop_thread()
            self.poll()
            self._backend.close(failed=exc_type is not None)
        return False

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        warned = False
        while not self._stop.wait(2.0):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - tracking never stops the job; the final poll raises
                # the lines of a failed poll are not logged again: say so once, in the job's log
                log.log(logging.DEBUG if warned else logging.WARNING, "run.tracking: logging to %s failed (%s: "
                        "%s); metrics of that poll are missing there", self.kind, type(exc).__name__, exc,
                        exc_info=warned)
                warned = True

    def _stage_dirs(self) -> dict[str, Path]:
        dirs = {p.parent.name: p.parent for p in self.run_dir.glob("*/epochs.jsonl")}
        dirs.update({p.parent.name: p.parent for p in self.run_dir.glob("*/steps.jsonl")})
        dirs.update({stage: log.parent for stage, log in self.teacher_logs.items() if log.is_file()})
        return dirs

    def poll(self) -> None:
        """Log the lines written since the last poll."""
        with self._lock:
            for stage, d in self._stage_dirs().items():
                if stage not in self._follows:
                    self._follows[stage] = [_Follow(d / "epochs.jsonl", "epoch"), _Follow(d / "steps.jsonl",
                                                                                          "global_step")]
                ep, st = self._follows[stage]
                for m in ep.new_lines():
                    self._backend.log(stage, _metrics(m) | {"epoch": float(m["epoch"])},
                                      int(m.get("global_step") or m["epoch"]))
                for m in st.new_lines():
                    self._backend.log(stage, _metrics(m, "step/"), int(m["global_step"]))

    def finish(self, report: dict) -> None:
        """The last lines, then the report files and the exported student; closes the runs."""
        self._stop_thread()
        self.poll()
        files = [self.run_dir / f for f in ("config.yaml", "report.json", "report.md", "curves.png")]
        export = report.get("export") or (report.get("student") or {}).get("export")
        self._backend.finish(report, [f for f in files if f.is_file()], Path(export) if export else None)


class _Backend:
    closed = False

    def log(self, stage: str, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, report: dict, files: list[Path], export: Path | None) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class _MLflow(_Backend):
    def __init__(self, uri: str, name: str, cfg: Config):
        try:
            self.client, self.exp_id = mlflow_experiment(uri, EXPERIMENT)
            self.parent = self.client.create_run(self.exp_id, run_name=name, tags={"raydistill.run": name}).info.run_id
        except Exception as exc:  # noqa: BLE001 - an unreachable server, a bad store: before Ray starts
            raise ConfigError(f"run.tracking_uri: cannot log to MLflow at {uri!r}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        self.children: dict[str, str] = {}
        params = flatten(cfg.model_dump(mode="json"))
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.parent, params=items[i:i + 100])

    def _run(self, stage: str) -> str:
        if stage not in self.children:
            self.children[stage] = self.client.create_run(
                self.exp_id, run_name=stage, tags={"mlflow.parentRunId": self.parent, "raydistill.stage": stage}
            ).info.run_id
        return self.children[stage]

    def log(self, stage, metrics, step):
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self._run(stage), metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])

    def finish(self, report, files, export):
        for f in files:
            self.client.log_artifact(self.parent, str(f))
        if export is not None and export.exists():
            if export.is_dir():
                self.client.log_artifacts(self.parent, str(export), artifact_path="student")
            else:
                self.client.log_artifact(self.parent, str(export), artifact_path="student")
        self.close(failed=False)

    def close(self, failed):
        status = "FAILED" if failed else "FINISHED"
        for rid in [*self.children.values(), self.parent]:
            self.client.set_terminated(rid, status=status)
        self.closed = True


def mlflow_experiment(uri: str, name: str):
    """(MlflowClient, experiment id) of experiment ``name`` at ``uri``, created if missing with its artifacts
    beside a local store (``<dir of mlflow.db>/mlartifacts``; MLflow's default is ./mlruns in the working
    directory). A ``file:`` store or a plain directory is what the user asked for: MLflow 3's refusal of
    its file store is lifted for it (``MLFLOW_ALLOW_FILE_STORE``)."""
    from mlflow.tracking import MlflowClient

    path, is_db = _local_path(uri)
    if path is not None and not is_db:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return client, exp.experiment_id
    where = (path.parent / "mlartifacts").resolve().as_uri() if is_db else None
    return client, client.create_experiment(name, artifact_location=where)


class _TensorBoard(_Backend):
    def __init__(self, uri: str, name: str, cfg: Config):
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.root, self.cls = Path(uri), SummaryWriter
        self.writers: dict[str, Any] = {}
        job = self._writer("job")
        job.add_text("config", "```yaml\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False) + "```")
        job.flush()

    def _writer(self, stage: str):
        if stage not in self.writers:
            self.writers[stage] = self.cls(log_dir=str(self.root / stage), flush_secs=10)
        return self.writers[stage]

    def log(self, stage, metrics, step):
        w = self._writer(stage)
        for k, v in metrics.items():
            w.add_scalar(k, v, step)

    def finish(self, report, files, export):
        job = self._writer("job")
        md = next((f for f in files if f.name == "report.md"), None)
        if md is not None:
            job.add_text("report", md.read_text())
        if export is not None:
            job.add_text("export", f"exported student: `{export}`")
        self.close(failed=False)

    def close(self, failed):
        for w in self.writers.values():
            w.flush()
            w.close()
        self.closed = True
