"""The verdict on distillation (raydistill.distill.verdict), its report and terminal lines, and the latency
reading's contention flag (no Ray)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from raydistill.distill.verdict import corpus_warning, distillation_verdict


def _lm_eval(nll_per_tok, tok, teacher_nll_per_tok=None):
    items = {"nll": (nll_per_tok * tok).tolist(), "tokens": tok.tolist()}
    if teacher_nll_per_tok is not None:
        items["teacher_nll"] = (teacher_nll_per_tok * tok).tolist()
    return {"perplexity": float(np.exp((nll_per_tok * tok).sum() / tok.sum())), "eval_tokens": int(tok.sum()),
            "_items": items}


def _difficulty(rng, m):
    return rng.normal(4.0, 0.8, m)  # per-block NLL per token: blocks differ a lot


def test_helped_when_the_paired_interval_is_below_zero():
    rng = np.random.default_rng(0)
    m, tok = 120, np.full(120, 63.0)
    d = _difficulty(rng, m)
    evals = {"baseline": _lm_eval(d, tok), "student": _lm_eval(d - 0.12 + rng.normal(0, 0.02, m), tok, d - 0.4)}
    v = distillation_verdict(evals, lm=True, distilled="student")
    assert v["verdict"] == "helped" and v["distilled_vs_baseline"]["ci95"][1] < 0
    assert v["summary"].startswith("distillation helped") and not v["causes"]


def test_hurt_with_a_weak_teacher_names_the_teacher_and_the_small_corpus():
    """The reported case: teacher 84.5, scratch 86.6, distilled 102.2 on 1,701 tokens of a 120 KB corpus."""
    rng = np.random.default_rng(1)
    m, tok = 27, np.full(27, 63.0)
    d = _difficulty(rng, m)
    evals = {"baseline": _lm_eval(d, tok),
             "dense_student": _lm_eval(d + np.log(102.2 / 86.6) + rng.normal(0, 0.02, m), tok,
                                       d + np.log(84.5 / 86.6))}
    v = distillation_verdict(evals, lm=True, distilled="dense_student", train_tokens=38_000, teacher_params=3_700_000)
    assert v["verdict"] == "hurt"
    assert v["distilled_vs_baseline"]["change"] == pytest.approx(102.2 / 86.6 - 1, abs=0.01)
    text = v["summary"]
    assert "did NOT help" in text and "barely better" in text and "corpus is small for the teacher" in text
    assert "1,701 test tokens" in text and "Try:" in text
    assert v["teacher_test"]["ci95"][0] < v["teacher_test"]["perplexity"] < v["teacher_test"]["ci95"][1]


def test_inconclusive_on_too_few_evaluation_tokens():
    rng = np.random.default_rng(2)
    m, tok = 6, np.full(6, 20.0)
    d = _difficulty(rng, m)
    evals = {"baseline": _lm_eval(d, tok), "student": _lm_eval(d - 0.01 + rng.normal(0, 0.1, m), tok, d - 1.0)}
    v = distillation_verdict(evals, lm=True, distilled="student")
    lo, hi = v["distilled_vs_baseline"]["ci95"]
    assert lo < 0 < hi and v["verdict"] == "inconclusive"
    assert "cannot separate the stages" in v["summary"] and "barely better" not in v["summary"]


def test_classification_points_and_teacher_margin():
    rng = np.random.default_rng(4)
    y_base = (rng.random(1000) < 0.7).astype(float)
    worse = y_base.copy()
    worse[np.flatnonzero(y_base == 1)[:80]] = 0.0  # 8 points worse
    evals = {"baseline": {"eval_examples": 1000, "_items": {"correct": y_base.tolist()}},
             "student": {"eval_examples": 1000, "_items": {"correct": worse.tolist(), "teacher_correct":
                                                           y_base.tolist()}}}
    v = distillation_verdict(evals, lm=False, distilled="student")
    assert v["verdict"] == "hurt" and v["distilled_vs_baseline"]["change"] == pytest.approx(-0.08)
    assert "barely better" in v["summary"] and "points" in v["summary"]


def test_corpus_warning_threshold():
    assert corpus_warning(10_000, 3_700_000) is not None and "0.003 tokens per parameter" in \
        corpus_warning(10_000, 3_700_000)
    assert corpus_warning(50_000_000, 3_700_000) is None
    assert corpus_warning(None, 3_700_000) is None and corpus_warning(10, None) is None


def _report(verdict_evals_lm=True):
    rng = np.random.default_rng(5)
    tok = np.full(30, 63.0)
    d = _difficulty(rng, 30)
    evals = {"baseline": _lm_eval(d, tok), "student": _lm_eval(d + 0.2, tok, d - 0.01)}
    v = distillation_verdict(evals, lm=True, distilled="student")
    for e in evals.values():
        e.update(next_token_accuracy=0.3, sparsity=0.0, compression_ratio=1.0, nonzero_params=10, params=10,
                 perplexity_ci95=[1.0, 2.0])
        e.pop("_items")
    return {"name": "r", "task": "causal_lm", "wall_seconds": 3.0, "perplexity_vs_baseline": 0.2,
            "teacher": {"accuracy": 0.4, "metrics": {"perplexity": 50.0}, "cached": True}, "verdict": v, **evals}


def test_report_markdown_and_terminal_carry_the_verdict_and_full_stage_names(capsys):
    from raydistill.distill.cli import _print_summary
    from raydistill.distill.report import report_markdown

    r = _report()
    r["dense_student"] = dict(r["student"])
    md = report_markdown(r)
    assert "## Did distillation help?" in md and "Distillation did NOT help" in md and "(1.00-2.00)" in md
    _print_summary(r)  # stderr is not a terminal here, as in a log or CI
    err = capsys.readouterr().err
    assert "dense_student" in err and "teacher (cached)" in err and "…" not in err
    assert "Distillation did NOT help" in " ".join(err.split())


def _burn(stop_at):
    while time.time() < stop_at:
        pass


def test_latency_reading_under_load_is_marked():
    import torch

    from raydistill.distill.steps import measure_latency

    net = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_burn, args=(time.time() + 30,)) for _ in range(os.cpu_count() or 1)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # the burners are running
        out = measure_latency(net, lambda b: torch.randn(b, 40), (1, 256), repeats=200)
    finally:
        for p in procs:
            p.terminate()
            p.join()
    assert out["latency_under_load"] and out["latency_other_cpu"] > 0.25
    for b in (1, 256):
        lo, hi = out[f"latency_spread_ms_b{b}"]
        assert lo <= out[f"latency_ms_b{b}"] <= hi
    assert len(out["latency_loadavg"]) == 3 and out["latency_threads"] == torch.get_num_threads()


def test_tune_rows_get_latency_measured_again_after_the_search(tmp_path):
    """A trial's last-epoch latency was read while other trials trained; after the search each checkpoint is
    timed again, one at a time, converted as the evaluation converts it (masks -> SparseLinear)."""
    import torch

    from raydistill.config import load_config
    from raydistill.distill.checkpointing import save_checkpoint_dir
    from raydistill.models import build_model
    from raydistill.tune.search import remeasure_latency

    cfg = load_config("mnist1d_tiny", [f"run.storage_path={tmp_path}"])
    spec = {"model": cfg.student.model, "kwargs": dict(cfg.student.kwargs)}
    net = build_model(spec)
    masks = {n: torch.rand_like(m.weight) > 0.8 for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    ck = save_checkpoint_dir(tmp_path / "ck", model=net, meta={"epoch": 1, "model": spec}, state={}, masks=masks)
    rows = [{"latency_ms_b1": 999.0, "latency_ms_b256": 999.0, "checkpoint_path": str(ck), "overrides": {}},
            {"latency_ms_b1": None, "latency_ms_b256": None, "checkpoint_path": str(ck), "overrides": {}}]
    remeasure_latency(rows, cfg.model_dump(mode="json"), lambda d: type(cfg).model_validate(d))
    assert 0 < rows[0]["latency_ms_b256"] < 999.0 and 0 < rows[0]["latency_ms_b1"] < 999.0
    assert isinstance(rows[0]["latency_under_load"], bool)
    assert rows[1]["latency_ms_b256"] is None and "latency_under_load" not in rows[1]
