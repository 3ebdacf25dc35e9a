"""Experiment tracking of a search (``run.tracking``): Ray Tune's own MLflow / TensorBoard logger callbacks
(one MLflow run, or one TensorBoard directory, per trial: its config and every epoch's result), and the
search's report files logged at the end (:func:`log_search_summary`). Where they go:
:func:`raydistill.distill.tracking.tracking_uri`."""

from __future__ import annotations

from pathlib import Path

from ray.tune.logger import TBXLoggerCallback

from raydistill.distill.tracking import EXPERIMENT, mlflow_experiment, tracking_uri


class TrialDirTBX(TBXLoggerCallback):
    """Ray's TensorBoard logger writing each trial's events to ``<log dir>/<trial id>`` (Ray's own writes
    them into the trial's directory)."""

    def __init__(self, logdir: str):
        super().__init__()
        self.logdir = logdir

    def log_trial_start(self, trial):
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        self._trial_writer[trial] = self._summary_writer_cls(str(Path(self.logdir) / trial.trial_id), flush_secs=30)
        self._trial_result[trial] = {}


def experiment_name(name: str) -> str:
    return f"{EXPERIMENT}-tune-{name}"


def tune_callbacks(cfg, storage, name: str) -> list:
    kind = cfg.run.tracking
    if kind == "none":
        return []
    uri = tracking_uri(cfg, storage, name)
    if kind == "tensorboard":
        return [TrialDirTBX(uri)]
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    mlflow_experiment(uri, experiment_name(name))  # created here, with its artifacts beside a local store
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment_name(name))]


def log_search_summary(cfg, storage, name: str, exp_dir: Path) -> None:
    """The search's report files (trials.csv, pareto.json, pareto.png, best_config.yaml): artifacts of an
    MLflow run named ``search``; with TensorBoard, the front table as text."""
    kind = cfg.run.tracking
    if kind == "none":
        return
    uri = tracking_uri(cfg, storage, name)
    files = [exp_dir / f for f in ("trials.csv", "pareto.json", "pareto.png", "best_config.yaml")]
    files = [f for f in files if f.is_file()]
    if kind == "mlflow":
        client, exp_id = mlflow_experiment(uri, experiment_name(name))
        run = client.create_run(exp_id, run_name="search", tags={"raydistill.search": name}).info.run_id
        for f in files:
            client.log_artifact(run, str(f))
        client.set_terminated(run)
        return
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(Path(uri) / "search"))
    for f in files:
        if f.suffix in (".json", ".csv", ".yaml"):
            w.add_text(f.name, "```\n" + f.read_text()[:100_000] + "\n```")
    w.close()
