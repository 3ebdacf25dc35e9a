"""What a search leaves behind under ``<storage-path>/<name>/``.

* ``trials.csv``       one row per trial: its searched values (plus temperature/alpha/sparsity always),
                       final metrics, epochs run, whether the scheduler stopped it early, status.
* ``pareto.json``      the non-dominated trials in (quality, compression_ratio) + the teacher's and the
                       from-scratch baseline's quality.
* ``pareto.png``       quality vs compression ratio for every trial, front highlighted, teacher and
                       from-scratch baseline as horizontal lines.
* ``pareto_size.png``  when the trials' students differ in parameter count (a search over
                       ``student.init``'s target shape): quality vs parameters and vs CPU latency, each
                       front highlighted.

The quality is the task's test metric (:func:`quality_for`): ``accuracy`` (maximised) for classification,
``perplexity`` (minimised) for a causal LM.
* ``best_config.yaml`` a complete distill config (no ``search`` section) for the best trial, or the best
                       with ``compression.sparsity >= min_sparsity``.

Rows are plain dicts (see :data:`TRIAL_COLUMNS`), so everything here is testable without Ray.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from raydistill.tune.pareto import OBJECTIVES, pareto_indices


@dataclass(frozen=True)
class Quality:
    """The metric a front and its plot rank trials by: a test metric ``key`` and its direction."""

    key: str       # the row / report metric
    mode: str      # "max" | "min"
    label: str     # axis label
    fmt: str       # number format
    latency: str = "latency_ms_b256"   # the latency its fronts use (the task's largest timed batch)

    @property
    def objective(self) -> str:
        """For :mod:`raydistill.tune.pareto` (which maximises): ``-key`` when lower is better."""
        return self.key if self.mode == "max" else f"-{self.key}"

    def objectives(self, size: str = "compression_ratio") -> tuple[str, str]:
        return (self.objective, size)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


ACCURACY = Quality("accuracy", "max", "test accuracy", ".4f")
PERPLEXITY = Quality("perplexity", "min", "test perplexity (lower is better)", ".2f", "latency_ms_b1")


def quality_for(task: str) -> Quality:
    """The front's quality metric of a task (``Config.data.task``): its headline test metric and direction
    (``raydistill.tasks.Task.metric``, ``higher_is_better``)."""
    from raydistill.tasks import get_task

    try:
        t = get_task(task)
    except ValueError:
        raise ValueError(f"no search quality metric for task {task!r}") from None
    latency = f"latency_ms_b{max(t.latency_batches)}"  # the task's largest timed batch
    for q in (ACCURACY, PERPLEXITY):
        if q.key == t.metric:
            return dataclasses.replace(q, latency=latency)
    return Quality(t.metric, "max" if t.higher_is_better else "min", t.metric_label, t.metric_fmt, latency)

# Always present, in this order, after the searched parameters.
CONFIG_COLUMNS = ("temperature", "alpha", "sparsity")
METRIC_COLUMNS = ("accuracy", "val_accuracy", "perplexity", "val_perplexity", "next_token_accuracy",
                  "teacher_agreement", "compression_ratio", "achieved_sparsity", "train_loss", "lr",
                  "bits", "model_bytes", "model_params", "latency_ms_b1", "latency_ms_b256", "latency_under_load")
# written only when some trial reports them (a classification search has no perplexity column)
TASK_COLUMNS = ("accuracy", "val_accuracy", "perplexity", "val_perplexity", "next_token_accuracy",
                "teacher_agreement")
TRIAL_COLUMNS = (
    "trial_id", "status", "stopped_early", "epochs_run", "epochs_configured",
    *CONFIG_COLUMNS,
    # searched parameters other than the three above are inserted here
    *METRIC_COLUMNS,
    "time_s", "checkpoint_path", "error",
)
FRONT_FIELDS = (
    "trial_id", "temperature", "alpha", "sparsity", "accuracy", "compression_ratio", "achieved_sparsity",
    "val_accuracy", "epochs_run", "stopped_early", "checkpoint_path", "bits", "model_bytes", "model_params",
    "latency_ms_b1", "latency_ms_b256", "latency_under_load",
)
LM_FRONT_FIELDS = ("perplexity", "val_perplexity", "next_token_accuracy", "teacher_agreement")

FINISHED = ("TERMINATED",)  # trials whose last report is a real, finished-or-stopped model


def csv_columns(rows: Sequence[dict]) -> list[str]:
    """TRIAL_COLUMNS with any extra searched parameter (e.g. ``lr_searched``) after the config ones; the
    task metrics (accuracy, perplexity, ...) only when some row has them."""
    base = [c for c in TRIAL_COLUMNS
            if c not in TASK_COLUMNS or not rows or any(r.get(c) is not None for r in rows)]
    extra: list[str] = []
    for r in rows:
        for k in r.get("params", {}):
            if k not in base and k not in extra:
                extra.append(k)
    i = base.index(CONFIG_COLUMNS[-1]) + 1
    return base[:i] + extra + base[i:]


def _flat(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("params", "overrides")}
    out.update(row.get("params", {}))
    return out


def write_trials_csv(rows: Sequence[dict], path: Path) -> Path:
    cols = csv_columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = _flat(r)
            w.writerow({c: ("" if flat.get(c) is None else flat.get(c)) for c in cols})
    return path


def front_candidates(rows: Sequence[dict], objectives: Sequence[str] = OBJECTIVES) -> list[dict]:
    """Trials that may enter the front: finished (run to the end or stopped early by the scheduler)
    with both objectives reported.  A stopped trial counts with the model of its last epoch, which is
    a real checkpoint; errored / unfinished trials do not count."""
    return [r for r in rows if r.get("status") in FINISHED
            and all(_finite(r.get(k.lstrip("-"))) for k in objectives)]


def compute_front(rows: Sequence[dict], objectives: Sequence[str] = OBJECTIVES) -> list[dict]:
    """The non-dominated finished trials; ``objectives`` as in :mod:`raydistill.tune.pareto` (``-key``:
    minimised), by default (accuracy, compression_ratio); a causal LM's is
    ``PERPLEXITY.objectives()`` = (-perplexity, compression_ratio)."""
    cands = front_candidates(rows, objectives)
    return [cands[i] for i in pareto_indices(cands, objectives)]


def compute_fronts(rows: Sequence[dict], quality: Quality = ACCURACY) -> dict[str, list[dict]]:
    """The fronts over (quality, bytes at real bit widths), (quality, parameters) and (quality, CPU latency:
    batch 256 of a classifier, one sequence of a causal LM); trials without those metrics take no part."""
    return {f"{quality.key}_bytes": compute_front(rows, quality.objectives("-model_bytes")),
            f"{quality.key}_params": compute_front(rows, quality.objectives("-model_params")),
            f"{quality.key}_latency": compute_front(rows, quality.objectives(f"-{quality.latency}"))}


def sizes_differ(rows: Sequence[dict]) -> bool:
    """The trials' students differ in parameter count (a search over the student's shape)."""
    return len({r.get("model_params") for r in front_candidates(rows, ("model_params",))}) > 1


def plot_size_fronts(rows: Sequence[dict], fronts: dict[str, list[dict]], path: Path, *, quality: Quality = ACCURACY,
                     teacher: float | None = None, title: str = "") -> Path:
    """Quality against parameters and against CPU latency, one panel each, every finished trial and its
    front (``fronts``: :func:`compute_fronts`), labelled with the trial's searched values."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    q = quality.key
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    for ax, (x, label, front) in zip(axes, (
            ("model_params", "parameters", fronts.get(f"{q}_params", [])),
            (quality.latency, f"CPU latency, ms ({quality.latency.removeprefix('latency_ms_')})",
             fronts.get(f"{q}_latency", [])))):
        cands = front_candidates(rows, (quality.objective, x))
        ax.scatter([r[x] for r in cands], [r[q] for r in cands], s=26, color="tab:blue", alpha=0.7, label="trial")
        if front:
            pts = sorted(front, key=lambda r: r[x])
            ax.step([r[x] for r in pts], [r[q] for r in pts], where="post", color="tab:red", lw=1.2, alpha=0.7)
            ax.scatter([r[x] for r in pts], [r[q] for r in pts], s=70, facecolors="none", edgecolors="tab:red",
                       lw=1.8, zorder=3, label="Pareto front")
        for r in cands:
            ax.annotate(" ".join(f"{k}={v}" for k, v in r.get("params", {}).items()), (r[x], r[q]),
                        textcoords="offset points", xytext=(4, 4), fontsize=6, color="dimgray")
        if _finite(teacher):
            ax.axhline(float(teacher), color="tab:green", ls="--", lw=1.2, label=f"teacher ({float(teacher):{quality.fmt}})")
        ax.set_xlabel(label)
        ax.set_ylabel(quality.label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title or f"{q} vs size and latency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def size_front_table(front: Sequence[dict], *, quality: Quality = ACCURACY, title: str = "Pareto front"):
    """A front over parameters (or latency) as a table: the trial's searched values, quality, parameters,
    latency."""
    from rich.table import Table

    t = Table(title=title)
    for c, j in (("trial", "left"), ("searched", "left"), (quality.key, "right"), ("parameters", "right"),
                 (quality.latency, "right")):
        t.add_column(c, justify=j)
    for r in front:
        t.add_row(str(r["trial_id"]), " ".join(f"{k}={v}" for k, v in r.get("params", {}).items()),
                  _fmt(r.get(quality.key), quality.fmt), _fmt(r.get("model_params"), ",.0f"),
                  _fmt(r.get(quality.latency), ".2f"))
    return t


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _front_row(r: dict) -> dict:
    flat = _flat(r)
    fields = FRONT_FIELDS + tuple(k for k in LM_FRONT_FIELDS if flat.get(k) is not None)
    return {k: flat.get(k) for k in fields} | {"params": r.get("params", {})}


def write_pareto_json(front: Sequence[dict], path: Path, *, teacher: float | None, baseline: float | None,
                      quality: Quality = ACCURACY, extra: dict | None = None) -> Path:
    """``teacher`` / ``baseline``: their test ``quality`` (written as ``teacher_<key>``, ``baseline_<key>``)."""
    doc = {
        "objectives": {quality.key: quality.mode, "compression_ratio": "max"},
        "ties": "equal points are all kept",
        f"teacher_{quality.key}": teacher,
        f"baseline_{quality.key}": baseline,
        **(extra or {}),
        "front": [_front_row(r) for r in front],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def plot_pareto(rows: Sequence[dict], front: Sequence[dict], path: Path, *, teacher: float | None,
                baseline: float | None, quality: Quality = ACCURACY, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    q = quality.key
    cands = front_candidates(rows, quality.objectives())
    front_ids = {r["trial_id"] for r in front}
    full = [r for r in cands if not r.get("stopped_early") and r["trial_id"] not in front_ids]
    stopped = [r for r in cands if r.get("stopped_early") and r["trial_id"] not in front_ids]

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    if full:
        ax.scatter([r["compression_ratio"] for r in full], [r[q] for r in full], s=28,
                   color="tab:blue", alpha=0.75, label="trial (all epochs)")
    if stopped:
        ax.scatter([r["compression_ratio"] for r in stopped], [r[q] for r in stopped], s=28,
                   marker="x", color="tab:gray", alpha=0.8, label="trial (stopped early by ASHA)")
    if front:
        xs = [r["compression_ratio"] for r in front]
        ys = [r[q] for r in front]
        ax.step(xs, ys, where="post", color="tab:red", lw=1.2, alpha=0.7)
        ax.scatter(xs, ys, s=70, facecolors="none", edgecolors="tab:red", lw=1.8, zorder=3,
                   label="Pareto front")
        for r in front:
            ax.annotate(f"T={r.get('temperature', float('nan')):.3g} a={r.get('alpha', float('nan')):.2f} "
                        f"s={r.get('sparsity', float('nan')):.2f}",
                        (r["compression_ratio"], r[q]), textcoords="offset points", xytext=(5, -11),
                        fontsize=7, color="tab:red")
    if _finite(teacher):
        ax.axhline(float(teacher), color="tab:green", ls="--", lw=1.2,
                   label=f"teacher ({float(teacher):{quality.fmt}})")
    if _finite(baseline):
        ax.axhline(float(baseline), color="tab:orange", ls=":", lw=1.5,
                   label=f"student from scratch ({float(baseline):{quality.fmt}})")
    xs_all = [r["compression_ratio"] for r in cands]
    if xs_all and max(xs_all) / max(min(xs_all), 1e-9) > 8:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({round(x, 1) for x in xs_all if x >= 0.95}))
    ax.set_xlabel("compression ratio (dense size / compressed size)")
    ax.set_ylabel(quality.label)
    ax.set_title(title or f"{quality.key} vs compression")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def select_best(rows: Sequence[dict], metric: str, mode: str, min_sparsity: float | None = None) -> dict | None:
    """The finished trial with the best ``metric``; with ``min_sparsity``, only among trials whose
    target ``sparsity`` (the config value they trained for) is >= it.  Ties go to the higher
    compression ratio, then the lower trial id (deterministic)."""
    cands = [r for r in rows if r.get("status") in FINISHED and _finite(r.get(metric))]
    if min_sparsity is not None:
        cands = [r for r in cands if _finite(r.get("sparsity")) and float(r["sparsity"]) >= min_sparsity - 1e-9]
    if not cands:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(cands, key=lambda r: (sign * float(r[metric]), float(r.get("compression_ratio") or 0.0),
                                     _neg_id(r["trial_id"])))


def _neg_id(tid: str) -> tuple:
    return tuple(-ord(c) for c in str(tid))


def write_best_config(best: dict, base: dict, path: Path, *, build: Callable[[dict], Any],
                      dump: Callable[[Any, Path], Any], run_name: str | None = None) -> Path:
    """Write ``base`` (a full config dict) with the best trial's overrides, no ``search`` section,
    through the config package's own ``dump`` so ``raydistill distill`` loads it unchanged."""
    from raydistill.tune.space import apply_trial_config

    data = apply_trial_config(base, best.get("overrides", {}))
    data.pop("search", None)
    if run_name is not None and isinstance(data.get("run"), dict) and "name" in data["run"]:
        data["run"]["name"] = run_name
    cfg = build(data)
    if getattr(cfg, "search", None) is not None:  # keep the export free of the search section
        cfg = cfg.model_copy(update={"search": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    dump(cfg, path)
    return path


def _fmt(v: Any, spec: str) -> str:
    return format(float(v), spec) if _finite(v) else "-"


def front_table(front: Sequence[dict], *, teacher: float | None = None, baseline: float | None = None,
                quality: Quality = ACCURACY, title: str = "Pareto front"):
    from rich.table import Table

    caption = []
    if _finite(teacher):
        caption.append(f"teacher {float(teacher):{quality.fmt}}")
    if _finite(baseline):
        caption.append(f"student from scratch {float(baseline):{quality.fmt}}")
    t = Table(title=title, caption=" | ".join(caption) or None)
    for c, j in (("trial", "left"), ("temperature", "right"), ("alpha", "right"), ("sparsity", "right"),
                 (quality.key, "right"), ("compression", "right"), ("epochs", "right"), ("stopped", "center")):
        t.add_column(c, justify=j)
    for r in front:
        t.add_row(str(r["trial_id"]), _fmt(r.get("temperature"), ".3g"), _fmt(r.get("alpha"), ".3f"),
                  _fmt(r.get("sparsity"), ".3f"), _fmt(r.get(quality.key), quality.fmt),
                  _fmt(r.get("compression_ratio"), ".2f") + "x", str(r.get("epochs_run", "-")),
                  "yes" if r.get("stopped_early") else "")
    return t


def front_markdown(front: Sequence[dict], quality: Quality = ACCURACY) -> str:
    """The front as a markdown table (for docs/tune.md)."""
    lines = [f"| trial | temperature | alpha | sparsity | {quality.key} | compression | epochs | stopped early |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in front:
        lines.append(
            f"| {r['trial_id']} | {_fmt(r.get('temperature'), '.3g')} | {_fmt(r.get('alpha'), '.3f')} | "
            f"{_fmt(r.get('sparsity'), '.3f')} | {_fmt(r.get(quality.key), quality.fmt)} | "
            f"{_fmt(r.get('compression_ratio'), '.2f')}x | {r.get('epochs_run', '-')} | "
            f"{'yes' if r.get('stopped_early') else ''} |")
    return "\n".join(lines)


def summarize(rows: Iterable[dict]) -> dict:
    rows = list(rows)
    finished = [r for r in rows if r.get("status") in FINISHED]
    stopped = [r for r in finished if r.get("stopped_early")]
    return {
        "trials": len(rows),
        "finished": len(finished),
        "stopped_early": len(stopped),
        "errored": sum(1 for r in rows if r.get("status") == "ERROR"),
        "unfinished": sum(1 for r in rows if r.get("status") not in ("TERMINATED", "ERROR")),
        "stopped_fraction": (len(stopped) / len(rows)) if rows else 0.0,
    }
