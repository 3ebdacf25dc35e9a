"""What a job leaves behind: ``report.json`` (the report dict), ``report.md`` and ``curves.png`` (train loss,
validation and test metric per epoch of every stage)."""

from __future__ import annotations

import json
from pathlib import Path

from raydistill.utils import write_json_atomic


def build_report(cfg, name: str, run_dir: Path, teachers: dict, assistants: list[dict], evals: dict[str, dict],
                 sparse: bool, structured_report: dict | None, timings: dict, corpus: dict | None = None, *,
                 student_init: dict | None = None) -> dict:
    """The report dict of a job (``report.json``): every teacher's and stage's evaluation, the headline
    comparisons (``Task.compare``: accuracy points, or a perplexity ratio - 1) and the verdict on
    distillation (:func:`raydistill.distill.verdict.distillation_verdict`) -- of the student distilled from
    random init when there is one (``dense_student``). ``student_init``: the pruning report of a student
    made from the teacher (``student.init.from: teacher``): the report then also compares it with the
    student distilled from random init (``pruned_vs_random_init``, paired over test items)."""
    from raydistill.distill.verdict import compare_stages, distillation_verdict, strip_items
    from raydistill.tasks import get_task

    task = get_task(cfg.data.task)
    first = next(iter(teachers.values()))
    corpus = corpus or {}
    lm = task.metric == "perplexity"  # paired over items' NLL, else correct
    has_dense = "dense_student" in evals
    verdict = distillation_verdict(evals, lm=lm, distilled="dense_student" if has_dense else "student", **corpus)
    pruned_vs_random = compare_stages(evals, "student", "dense_student", lm=lm) if student_init else None
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
        **({"dense_student": evals["dense_student"]} if has_dense else {}),
        **({"student_init": student_init} if student_init else {}),
        **({"dense_student_ptq": evals["dense_student_ptq"]} if "dense_student_ptq" in evals else {}),
        "compression_steps": [t for t, _ in cfg.compression.steps()],
        **({"prune_structured": structured_report} if structured_report else {}),
        "config": cfg.model_dump(mode="json"),
        "timings": timings,
        "corpus": corpus,
        "verdict": verdict,
    }
    if pruned_vs_random is not None:
        report["pruned_vs_random_init"] = pruned_vs_random
    sparse = sparse and not student_init  # the student differs from dense_student in its init too
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
    rows += [(stage_label(r, k), smodel, r[k]) for k in ("baseline", "dense_student", "dense_student_ptq", "student")
             if k in r]
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
              f"- {'student (pruned from the teacher, distilled)' if r.get('student_init') else 'distilled student'}"
              f" vs baseline: {task.compare_text.format(100 * r[task.baseline_key])}"
              + (f" ({r['student']['eval_tokens']:,} test tokens)" if r["student"].get("eval_tokens") else "")]
    if "sparse_vs_dense" in r:
        lines.append(f"- compressed vs dense distilled student: {task.compare_text.format(100 * r['sparse_vs_dense'])}")
    s = r["student"]
    if "projected_sparse_int8_bytes" in s:
        lines.append(f"- student bytes as int8 SparseLinear (projected, int16 indices): "
                     f"{s['projected_sparse_int8_bytes']:,}")
    lines.append(f"- student parameters: {s['nonzero_params']:,} nonzero of {s['params']:,}")
    lines += student_init_lines(r)
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


STAGE_LABELS_FROM_TEACHER = {"baseline": "baseline (from scratch)", "dense_student": "dense_student (random init)",
                             "student": "student (pruned from the teacher)"}


def stage_label(r: dict, key: str) -> str:
    """A student stage's name in tables; with a student made from the teacher, what each one started from."""
    return STAGE_LABELS_FROM_TEACHER.get(key, key) if r.get("student_init") else key


def student_init_lines(r: dict) -> list[str]:
    """report.md lines on a student made from the teacher: the pruned shape and the comparison with the
    student distilled from random init."""
    si = r.get("student_init")
    if not si:
        return []
    a, b = si["shape_after"], si["shape_before"]
    out = [f"- student made from the teacher: {b['num_hidden_layers']} x {b['hidden_size']} pruned to "
           f"{a['num_hidden_layers']} layer{'s' * (a['num_hidden_layers'] != 1)} x {a['hidden_size']} "
           f"({a['num_attention_heads']} heads, "
           f"{a['num_key_value_heads']} KV heads of {a['head_dim']}, intermediate {a['intermediate_size']}; "
           f"{si['params_after']:,} parameters) on {si['calibration_blocks']} calibration blocks; "
           f"calibration perplexity {si['calibration_perplexity_teacher']:.2f} (teacher) -> "
           f"{si['calibration_perplexity_pruned']:.2f} (pruned, before distillation)"
           + (f"; removed layers {si['removed_layers']}" if si.get("removed_layers") else "")]
    out += [f"  - {n}" for n in si.get("notes") or []]
    if r.get("pruned_vs_random_init"):
        out.append(f"- {pruned_vs_random_text(r)}")
    return out


def pruned_vs_random_text(r: dict) -> str:
    """The student made from the teacher against the one distilled from random init (``Task.compare_text``)."""
    from raydistill.tasks import get_task

    d, text = r["pruned_vs_random_init"], get_task(r["task"]).compare_text
    lo, hi = d["ci95"]
    return (f"pruned from the teacher vs random init, both distilled: {text.format(100 * d['change'])} "
            f"(95% CI {100 * lo:+.1f} .. {100 * hi:+.1f})")


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
