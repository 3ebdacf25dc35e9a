"""What a job leaves behind: ``report.json`` (the report dict), ``report.md`` and ``curves.png`` (train loss,
validation and test metric per epoch of every stage)."""

from __future__ import annotations

import json
from pathlib import Path

from raydistill.utils import write_json_atomic


def build_report(cfg, name: str, run_dir: Path, teachers: dict, assistants: list[dict], evals: dict[str, dict],
                 sparse: bool, structured_report: dict | None, timings: dict, corpus: dict | None = None) -> dict:
    """The report dict of a job (``report.json``): every teacher's and stage's evaluation, the headline
    comparisons (``Task.compare``: accuracy points, or a perplexity ratio - 1) and the verdict on
    distillation (:func:`raydistill.distill.verdict.distillation_verdict`)."""
    from raydistill.distill.verdict import distillation_verdict, strip_items
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    first = next(iter(teachers.values()))
    corpus = corpus or {}
    verdict = distillation_verdict(evals, lm=task.metric == "perplexity",  # paired over items' NLL, else correct
                                   distilled="dense_student" if sparse else "student", **corpus)
    strip_items(evals)
    for a in assistants:
        a.pop("_items", None)
    report = {
        "name": name, "run_dir": str(run_dir), "task": cfg.data.task,
        "teacher": {**first.to_dict(), "accuracy": first.accuracy},
        "teachers": {n: {**t.to_dict(), "accuracy": t.accuracy} for n, t in teachers.items()},
        "loss_terms": [{k: v for k, v in t.items() if k != "key"} for t in cfg.loss_terms()],
        "assistants": assistants,
        "baseline": evals["baseline"],
        "student": evals["student"],
        **({"dense_student": evals["dense_student"]} if sparse else {}),
        **({"dense_student_ptq": evals["dense_student_ptq"]} if "dense_student_ptq" in evals else {}),
        "compression_steps": [t for t, _ in cfg.compression.steps()],
        **({"prune_structured": structured_report} if structured_report else {}),
        "config": cfg.model_dump(mode="json"),
        "timings": timings,
        "corpus": corpus,
        "verdict": verdict,
    }
    report[task.baseline_key] = task.compare(evals["student"], evals["baseline"])
    if sparse:
        report["sparse_vs_dense"] = task.compare(evals["student"], evals["dense_student"])
    return report


def write_report(report: dict, run_dir: Path, stages: list[str], teacher_logs: dict[str, Path]) -> None:
    """``curves.png`` from the stages' ``epochs.jsonl`` (and those of the teachers trained here:
    ``{stage name: log}``), then ``report.json`` and ``report.md``."""
    curves = {s: _read_log(run_dir / s / "epochs.jsonl") for s in stages}
    curves.update({s: _read_log(p) for s, p in teacher_logs.items()})
    report["curves_png"] = str(_plot(curves, run_dir / "curves.png"))
    write_json_atomic(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(report_markdown(report))


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


def stage_rows(r: dict) -> list[tuple[str, str, dict]]:
    """(stage, model, metrics) of every row of a report table: the teachers, assistants and students."""
    teachers = r.get("teachers") or {"main": r["teacher"]}
    rows = [("teacher" if len(teachers) == 1 else f"teacher:{n}", (t.get("model") or {}).get("model", "?"),
             {"accuracy": t.get("accuracy"), **(t.get("metrics") or {})}) for n, t in teachers.items()]
    ci = _teacher_ci(r)  # the verdict's interval of the student's teacher on the same test items
    if ci:
        rows[0][2].update({f"{k}_ci95": ci for k in ("accuracy", "perplexity") if k in rows[0][2]})
    rows += [(a["stage"], a["model"], a) for a in r.get("assistants", [])]
    smodel = ((r.get("config") or {}).get("student") or {}).get("model", "?")
    rows += [(k, smodel, r[k]) for k in ("baseline", "dense_student", "dense_student_ptq", "student") if k in r]
    return rows


def fmt(v, f: str) -> str:
    return "" if v is None else f.format(v)


def cell(e: dict, key: str, f: str, mark: str = "\\*") -> str:
    """A table cell: the value, its 95% interval when the evaluation has one (``<key>_ci95``), and ``mark``
    on a latency read while other processes used the CPU (``latency_under_load``)."""
    if e.get(key) is None:
        return ""
    return _with_ci(e[key], e.get(f"{key}_ci95"), f) + \
        (mark if key.startswith("latency_ms") and e.get("latency_under_load") else "")


UNDER_LOAD_NOTE = ("measured while other processes used more than a quarter of the machine's CPU time: the reading "
                   "is the machine's contention, not the model's latency; time it again on an idle machine")


def report_markdown(r: dict) -> str:
    from raydistill.tasks import get_task

    task = get_task(r["task"])
    cols = task.report_columns
    lines = [f"# raydistill run `{r['name']}` ({r['task']})", "",
             "| stage | model | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    rows = stage_rows(r)
    for st, model, e in rows:
        lines.append(f"| {st} | {model} | " + " | ".join(cell(e, k, f) for _, k, f in cols) + " |")
    lines += _verdict_lines(r)
    if any(e.get("latency_under_load") for _, _, e in rows):
        lines += ["", f"\\* {UNDER_LOAD_NOTE} (`latency_spread_ms_*`, `latency_other_cpu` and `latency_loadavg` "
                  "in report.json)"]
    terms = ", ".join(f"{t['type']}" + (f" ({', '.join(t['teachers'])})" if t.get("teachers") else
                                        f" ({t['teacher']})" if t.get("teacher") else "") + f" x{t['weight']:g}"
                      for t in r.get("loss_terms", []))
    values = ", ".join(f"{k} {v:.4g}" for k, v in (r["student"].get("terms") or {}).items())
    lines += ["", f"- loss terms: {terms or 'n/a'}" + (f"; the student's last epoch: {values}" if values else ""),
              f"- compression steps: {', '.join(r.get('compression_steps') or []) or 'none'}",
              f"- distilled student vs baseline: {task.compare_text.format(100 * r[task.baseline_key])}"
              + (f" ({r['student']['eval_tokens']:,} test tokens)" if r["student"].get("eval_tokens") else "")]
    if "sparse_vs_dense" in r:
        lines.append(f"- compressed vs dense distilled student: {task.compare_text.format(100 * r['sparse_vs_dense'])}")
    s = r["student"]
    if "projected_sparse_int8_bytes" in s:
        lines.append(f"- student bytes as int8 SparseLinear (projected, int16 indices): "
                     f"{s['projected_sparse_int8_bytes']:,}")
    lines.append(f"- student parameters: {s['nonzero_params']:,} nonzero of {s['params']:,}")
    if r.get("export"):
        lines.append(f"- exported student (save_pretrained + tokenizer): `{r['export']}`")
    lines += [f"- wall time: {r['wall_seconds']:.0f} s", ""]
    if s.get("samples"):
        lines += ["## greedy samples (student)", ""]
        for smp in s["samples"]:
            lines += ["```", smp["prompt"] + "→" + smp["continuation"], "```"]
        lines.append("")
    lines += ["![curves](curves.png)", ""]
    return "\n".join(lines)


def _with_ci(v, ci, f: str) -> str:
    """``v (lo-hi)`` with the 95% interval when there is one."""
    if v is None:
        return ""
    if not ci or any(c is None or c != c for c in ci):
        return f.format(v)
    return f"{f.format(v)} ({f.format(ci[0])}-{f.format(ci[1])})"


def _teacher_ci(r: dict):
    return ((r.get("verdict") or {}).get("teacher_test") or {}).get("ci95")


def _verdict_lines(r: dict) -> list[str]:
    v = r.get("verdict") or {}
    if not v.get("summary"):
        return []
    return ["", "## Did distillation help?", "", v["summary"][0].upper() + v["summary"][1:] + "."]
