"""What a job leaves behind: ``report.json`` (the report dict), ``report.md`` and ``curves.png`` (train loss,
validation and test metric per epoch of every stage)."""

from __future__ import annotations

import json
from pathlib import Path

from raydistill.utils import write_json_atomic


def build_report(cfg, name: str, run_dir: Path, teacher, assistants: list[dict], evals: dict[str, dict],
                 sparse: bool, structured_report: dict | None, timings: dict, corpus: dict | None = None, *,
                 student_init: dict | None = None) -> dict:
    """The report dict of a job (``report.json``): every stage's evaluation, the headline comparisons and
    the verdict on distillation (:func:`raydistill.distill.verdict.distillation_verdict`) -- of the student
    distilled from random init when there is one (``dense_student``). ``student_init``: the pruning report
    of a student made from the teacher (``student.init.from: teacher``): the report then also compares it
    with the student distilled from random init (``pruned_vs_random_init``, paired over test items)."""
    from raydistill.distill.verdict import compare_stages, distillation_verdict, strip_items

    corpus = corpus or {}
    lm = cfg.data.task == "causal_lm"
    has_dense = "dense_student" in evals
    verdict = distillation_verdict(evals, lm=lm, distilled="dense_student" if has_dense else "student", **corpus)
    pruned_vs_random = compare_stages(evals, "student", "dense_student", lm=lm) if student_init else None
    strip_items(evals)
    for a in assistants:
        a.pop("_items", None)
    report = {
        "name": name, "run_dir": str(run_dir), "task": cfg.data.task,
        "teacher": {**teacher.to_dict(), "accuracy": teacher.accuracy},
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
    if lm:
        report["perplexity_vs_baseline"] = evals["student"]["perplexity"] / evals["baseline"]["perplexity"] - 1
        if sparse:
            report["sparse_vs_dense"] = evals["student"]["perplexity"] / evals["dense_student"]["perplexity"] - 1
    else:
        report["gain_over_baseline"] = evals["student"]["accuracy"] - evals["baseline"]["accuracy"]
        if sparse:
            report["sparse_vs_dense"] = evals["student"]["accuracy"] - evals["dense_student"]["accuracy"]
    return report


def write_report(report: dict, run_dir: Path, stages: list[str], teacher_log: Path | None) -> None:
    """``curves.png`` from the stages' ``epochs.jsonl`` (and the teacher's, when it trained), then
    ``report.json`` and ``report.md``."""
    curves = {s: _read_log(run_dir / s / "epochs.jsonl") for s in stages}
    if teacher_log is not None:
        curves["teacher"] = _read_log(teacher_log)
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


def report_markdown(r: dict) -> str:
    if r.get("task") == "causal_lm":
        return _report_markdown_lm(r)
    fmt = (lambda v, f: "" if v is None else f.format(v))
    rows = [("teacher", r["teacher"]["model"].get("model", "?"),
             {"accuracy": r["teacher"]["accuracy"], "accuracy_ci95": _teacher_ci(r)})]
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
        lines.append(f"| {st} | {m} | {_with_ci(e.get('accuracy'), e.get('accuracy_ci95'), '{:.2%}')} | "
                     f"{fmt(e.get('macro_f1'), '{:.3f}')} | "
                     f"{fmt(e.get('macro_precision'), '{:.3f}')} | {fmt(e.get('macro_recall'), '{:.3f}')} | "
                     f"{fmt(e.get('sparsity'), '{:.1%}')} | {fmt(e.get('compression_ratio'), '{:.2f}x')} | "
                     f"{fmt(e.get('model_bytes'), '{:,}')} | {fmt(rel, '{:.1%}')} | "
                     f"{_latency(e, 'latency_ms_b1')} | {_latency(e, 'latency_ms_b256')} |")
    lines += _verdict_lines(r)
    if any(e.get("latency_under_load") for _, _, e in rows):
        lines += ["", "\\* measured while other processes used more than a quarter of the machine's CPU time: the "
                  "reading is the machine's contention, not the model's latency; time it again on an idle machine "
                  "(`latency_spread_ms_*`, `latency_other_cpu` and `latency_loadavg` in report.json)"]
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
             "| stage | test perplexity (95% CI) | next-token accuracy | teacher agreement | tokens/s | sparsity "
             "| compression |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    t = r["teacher"].get("metrics") or {}
    lines.append(f"| teacher | {_with_ci(t.get('perplexity'), _teacher_ci(r), '{:.2f}')} | "
                 f"{fmt(t.get('next_token_accuracy'), '{:.2%}')} "
                 "| | | | |")
    for key in ("baseline", "dense_student", "student"):
        if key in r:
            e = r[key]
            lines.append(f"| {stage_label(r, key)} | {_with_ci(e['perplexity'], e.get('perplexity_ci95'), '{:.2f}')} | "
                         f"{e['next_token_accuracy']:.2%} | "
                         f"{fmt(e.get('teacher_agreement'), '{:.2%}')} | {fmt(e.get('tokens_per_s'), '{:,.0f}')} | "
                         f"{e['sparsity']:.1%} | {e['compression_ratio']:.2f}x |")
    lines += _verdict_lines(r)
    ev = r["student"].get("eval_tokens")
    who = "student (pruned from the teacher, distilled)" if r.get("student_init") else "distilled student"
    lines += ["", f"- {who} vs baseline: perplexity {r['perplexity_vs_baseline'] * 100:+.1f}%"
              + (f" ({ev:,} test tokens)" if ev else "")]
    if "sparse_vs_dense" in r:
        lines.append(f"- sparse vs dense distilled student: perplexity {r['sparse_vs_dense'] * 100:+.1f}%")
    lines += student_init_lines(r)
    if r.get("export"):
        lines.append(f"- exported student (save_pretrained + tokenizer): `{r['export']}`")
    lines += [f"- wall time: {r['wall_seconds']:.0f} s", "", "## greedy samples (student)", ""]
    for smp in r["student"].get("samples", []):
        lines += ["```", smp["prompt"] + "→" + smp["continuation"], "```"]
    lines += ["", "![curves](curves.png)", ""]
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
    d = r.get("pruned_vs_random_init")
    if d:  # a student made from the teacher is a decoder LM: the change is in perplexity
        out.append(f"- {pruned_vs_random_text(d)}")
    return out


def pruned_vs_random_text(d: dict) -> str:
    return (f"pruned from the teacher vs random init, both distilled: perplexity {d['change']:+.1%} "
            f"(95% CI {d['ci95'][0]:+.1%} .. {d['ci95'][1]:+.1%})")


def _with_ci(v, ci, f: str) -> str:
    """``v (lo-hi)`` with the 95% interval when there is one."""
    if v is None:
        return ""
    if not ci or any(c is None or c != c for c in ci):
        return f.format(v)
    return f"{f.format(v)} ({f.format(ci[0])}-{f.format(ci[1])})"


def _latency(e: dict, key: str) -> str:
    v = e.get(key)
    return "" if v is None else f"{v:.3f}" + ("\\*" if e.get("latency_under_load") else "")


def _teacher_ci(r: dict):
    return ((r.get("verdict") or {}).get("teacher_test") or {}).get("ci95")


def _verdict_lines(r: dict) -> list[str]:
    v = r.get("verdict") or {}
    if not v.get("summary"):
        return []
    return ["", "## Did distillation help?", "", v["summary"][0].upper() + v["summary"][1:] + "."]
