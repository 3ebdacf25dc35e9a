"""Did distillation help? The job's last word, in the terminal, ``report.md`` and ``report.json``.

The distilled student is compared with the student trained from scratch (the baseline) on the same test
items (LM blocks, classification examples) with a paired bootstrap (:mod:`raydistill.tasks.stats`): the
change and its 95% interval. When the interval excludes zero the verdict is "helped" or "hurt", else
"inconclusive". When distillation did not clearly help, the likely causes are named from what was
measured -- the teacher's own margin over the baseline on the same items, the training tokens per teacher
parameter, the number of evaluation tokens -- each with what to try.
"""

from __future__ import annotations

import math

from raydistill.tasks import stats

# a teacher whose perplexity is less than this much lower than the baseline's (relative), or whose accuracy
# is less than this many points higher, has little to teach the student
TEACHER_MARGIN_PPL = 0.10
TEACHER_MARGIN_POINTS = 0.02
# fewer training tokens than this many per teacher parameter: the corpus is small for the teacher
MIN_TOKENS_PER_TEACHER_PARAM = 1.0


def corpus_warning(train_tokens: int | None, teacher_params: int | None) -> str | None:
    """A warning before training when the corpus is small for the teacher (None: no warning)."""
    if not train_tokens or not teacher_params:
        return None
    ratio = train_tokens / teacher_params
    if ratio >= MIN_TOKENS_PER_TEACHER_PARAM:
        return None
    return (f"the corpus is small for the teacher: {train_tokens:,} training tokens for "
            f"{teacher_params / 1e6:.1f} M teacher parameters ({ratio:.3f} tokens per parameter; language models "
            f"are usually trained on 20 or more). On so little text a teacher may be barely better than a "
            f"student trained from scratch, and then distillation cannot help; the report says whether it did")


def _fmt_change(lm: bool, d: dict) -> str:
    if lm:
        return f"{d['change']:+.1%} (95% CI {d['ci95'][0]:+.1%} .. {d['ci95'][1]:+.1%})"
    return (f"{100 * d['change']:+.1f} points (95% CI {100 * d['ci95'][0]:+.1f} .. "
            f"{100 * d['ci95'][1]:+.1f})")


def _paired(lm: bool, a: dict, b: dict, key_a: str = None) -> dict | None:
    """The paired change of A against B (perplexity: ratio - 1; accuracy: difference) from their items."""
    ia, ib = a.get("_items") or {}, b.get("_items") or {}
    if lm:
        na = ia.get(key_a or "nll")
        if na is None or ib.get("nll") is None or len(na) != len(ib["nll"]):
            return None
        return stats.paired_perplexity_change(na, ib["nll"], ib["tokens"])
    ca = ia.get(key_a or "correct")
    if ca is None or ib.get("correct") is None or len(ca) != len(ib["correct"]):
        return None
    return stats.paired_mean_difference(ca, ib["correct"])


def compare_stages(evals: dict[str, dict], new: str, ref: str, *, lm: bool) -> dict | None:
    """Stage ``new`` against stage ``ref`` on the same test items (paired bootstrap): ``{"change", "ci95"}``
    (perplexity: ratio - 1; accuracy: difference), or None without per-item results."""
    if new not in evals or ref not in evals:
        return None
    return _paired(lm, evals[new], evals[ref])


def distillation_verdict(evals: dict[str, dict], *, lm: bool, distilled: str, train_tokens: int | None = None,
                         teacher_params: int | None = None) -> dict:
    """``{"verdict": helped | hurt | inconclusive | unknown, "summary", "causes", "suggestions",
    "distilled_vs_baseline", "teacher_vs_baseline", ...}`` for the stage ``distilled`` of ``evals`` against
    ``evals["baseline"]``. Lower perplexity / higher accuracy is better. The teacher's items come with the
    distilled student's evaluation (``teacher_nll`` / ``teacher_correct``: the same test items)."""
    base, dist = evals["baseline"], evals[distilled]
    d = _paired(lm, dist, base)
    out: dict = {"distilled_stage": distilled, "verdict": "unknown", "causes": [], "suggestions": []}
    if d is None:
        out["summary"] = "distillation's effect could not be measured (no per-item test results)"
        return out
    better = d["ci95"][1] < 0 if lm else d["ci95"][0] > 0
    worse = d["ci95"][0] > 0 if lm else d["ci95"][1] < 0
    out["verdict"] = "helped" if better else "hurt" if worse else "inconclusive"
    out["distilled_vs_baseline"] = d
    unit = "tokens" if lm else "examples"
    n_eval = int(dist.get("eval_tokens") if lm else dist.get("eval_examples") or 0)
    out["eval_items"] = n_eval
    what = "perplexity" if lm else "accuracy"
    head = {"helped": "distillation helped", "hurt": "distillation did NOT help (the student is worse)",
            "inconclusive": "distillation made no measurable difference"}[out["verdict"]]
    summary = (f"{head}: {distilled} {what} {_fmt_change(lm, d)} vs the student trained from scratch, on "
               f"{n_eval:,} test {unit}")
    t = _paired(lm, dist, base, key_a="teacher_nll" if lm else "teacher_correct")
    if t is not None:
        out["teacher_vs_baseline"] = t
        out["teacher_test"] = _teacher_test(lm, dist["_items"])
    if out["verdict"] != "helped":
        causes, tries = out["causes"], out["suggestions"]
        if t is not None:
            weak = (t["change"] > -TEACHER_MARGIN_PPL) if lm else (t["change"] < TEACHER_MARGIN_POINTS)
            if weak:
                causes.append(f"the teacher is barely better than the student trained from scratch: teacher "
                              f"{what} {_fmt_change(lm, t)} vs the baseline on the same test {unit}; a teacher "
                              f"that knows little more than the student can learn alone has little to teach")
                tries.append("train a stronger teacher: more data, more teacher epochs (teacher.training.epochs), "
                             "or a larger teacher; check the teacher's own test metric first")
        if train_tokens and teacher_params and train_tokens / teacher_params < MIN_TOKENS_PER_TEACHER_PARAM:
            causes.append(f"the corpus is small for the teacher: {train_tokens:,} training tokens for "
                          f"{teacher_params / 1e6:.1f} M teacher parameters "
                          f"({train_tokens / teacher_params:.3f} per parameter)")
            tries.append("use a larger corpus (data.max_bytes, data.path) or a smaller teacher")
        if out["verdict"] == "inconclusive":
            causes.append(f"{n_eval:,} test {unit} cannot separate the stages: the 95% interval of the change "
                          f"includes zero")
            tries.append("evaluate on more text (data.val_fraction, a larger corpus)" if lm else
                         "evaluate on more examples (data.num_test)")
        if out["verdict"] == "hurt" and not causes:
            causes.append("the teacher is clearly better than the baseline, but its soft targets did not transfer "
                          "in this budget")
        if out["verdict"] == "hurt":
            tries.append("weigh the hard labels more (a lower distill.alpha) or use distill.temperature 1-2; "
                         "search both with `raydistill tune`")
        if causes:
            summary += ". Likely cause" + ("s" if len(causes) > 1 else "") + ": " + "; ".join(causes)
        if tries:
            summary += ". Try: " + "; ".join(tries)
    out["summary"] = summary
    return out


def _teacher_test(lm: bool, items: dict) -> dict:
    """The teacher's test metric and its 95% interval on the items the students were scored on."""
    import numpy as np

    if lm:
        nll, tok = np.asarray(items["teacher_nll"]), np.asarray(items["tokens"])
        return {"perplexity": float(np.exp(min(nll.sum() / max(tok.sum(), 1.0), 50.0))),
                "ci95": stats.perplexity_ci(nll, tok)}
    c = np.asarray(items["teacher_correct"])
    return {"accuracy": float(c.mean()), "ci95": stats.mean_ci(c)}


def strip_items(evals: dict[str, dict]) -> None:
    """Drop the per-item lists (``_items``) before a report is written."""
    for e in evals.values():
        if isinstance(e, dict):
            e.pop("_items", None)


