"""Quick causal-LM distillation experiments in one process, without Ray, for tuning ``lm_default``.

    PYTHONPATH=. python benchmarks/lm_kd_quick.py [--config lm_default] [--set key=value ...]
        [--stages baseline,kd,kd_sparse] [--teacher-cache FILE.pt] [--seed 0] [--eval-every 1]

Uses the pipeline's own pieces: the tokenized corpus cached under ``--storage`` (``raydistill distill`` or
``text_data`` writes it; this script reads it), ``CausalLMTask`` (models, loss, metrics), the optimizer /
schedule builders and the gradual pruner, with the per-worker loop's batch order, so a stage's numbers
equal a 1-worker Ray Train stage's (the teacher's first epoch reproduces ``lm_default``'s to the digit).
``baseline`` is the student with cross-entropy; ``kd`` the dense distilled student; ``kd_sparse`` distilled
while pruned to ``compression.sparsity``; all three with the same data, steps, optimizer and grad clip.
The teacher is trained first (or loaded from ``--teacher-cache``). Prints validation / test perplexity.
"""
import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from raydistill.config import load_config
from raydistill.distill.loop import build_optimizer, build_scheduler
from raydistill.distill.spec import StageSpec
from raydistill.losses import Criterion
from raydistill.tasks import get_task
from raydistill.tasks.causal_lm import text_data
from raydistill.utils import machine_info, write_json_atomic


def train_stage(task, info, train, ev, model_spec, kind, epochs, bs, opt_cfg, sched_cfg, grad_clip, cfg, *,
                teacher=None, seed=0, sparsity=0.0, compression=None, eval_every=0, offline=None):
    """One stage as the per-worker loop runs it (1 worker): returns (model, metrics). ``offline``: the
    decoded columns of a teacher-output cache (``topk_values``, ``topk_indices``[, ``topk_tail``]) for the
    ``train`` blocks, which the first teacher's ``kd_logits`` terms read instead of running a teacher."""
    torch.manual_seed(seed)
    m = task.build_model(model_spec, info)
    spec = StageSpec(stage=kind, task="causal_lm", kind=kind, model=model_spec, epochs=epochs, batch_size=bs,
                     optimizer=opt_cfg, lr_schedule=sched_cfg, seed=seed, progress_dir="", task_info=info,
                     fused_linear=cfg.distill.fused_linear, **({"terms": tuple(cfg.loss_terms())} if kind == "kd" else {}),
                     offline_teacher="main" if offline is not None else None)
    teachers = {"main": teacher} if teacher is not None else {}
    crit = Criterion(spec.terms, student=task.layout(m), teachers={n: task.layout(t) for n, t in teachers.items()})
    steps = max(1, len(train) // bs)
    total = steps * epochs
    opt = build_optimizer(list(m.parameters()) + list(crit.parameters()), opt_cfg)
    sch = build_scheduler(opt, sched_cfg, total, opt_cfg["lr"])
    pruner = None
    if sparsity > 0:
        from raydistill.distill.loop import build_pruner

        pruner = build_pruner(m, types.SimpleNamespace(sparsity=sparsity, compression=compression), total)
    gs, t0, ls = 0, time.time(), 0.0
    # a kd stage: the teacher's outputs, once (or the offline teacher's, given)
    data = task.prepare({"input_ids": train, **(offline or {})}, spec, teachers, crit.needs())
    for ep in range(1, epochs + 1):
        g = torch.Generator().manual_seed(seed * 100003 + ep * 1009)  # loop.batches' order (rank 0)
        perm = torch.randperm(len(train), generator=g)
        m.train()
        ls = 0.0
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            loss = crit(task.forward(m, {k: v[idx] for k, v in data.items()}, spec, teachers, crit.needs()))
            opt.zero_grad()
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip)
            opt.step()
            sch.step()
            gs += 1
            if pruner is not None:
                pruner.step(gs)
            ls += float(loss.detach())
        if eval_every and ep % eval_every == 0 and ep < epochs:
            r = task.evaluate(m, ev, task_info=info)
            print(f"   epoch {ep}: loss {ls / steps:.3f} val ppl {r['val_perplexity']:.2f} "
                  f"test ppl {r['perplexity']:.2f}", flush=True)
    r = task.evaluate(m, ev, teacher=teacher, task_info=info)
    r.update(train_loss=ls / steps, seconds=time.time() - t0, steps=total)
    return m, r


def _short(r: dict) -> dict:
    return {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--set", dest="ov", action="append", default=[])
    ap.add_argument("--storage", default="runs", help="where the tokenized corpus is cached")
    ap.add_argument("--teacher-cache", default=None, help="a .pt state dict: loaded if present, else written")
    ap.add_argument("--stages", default="baseline,kd", help="comma-separated: baseline, kd, kd_sparse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config, [*a.ov, f"run.seed={a.seed}"])
    td = text_data(cfg, Path(a.storage))
    info = {**td.info(), "seq_len": cfg.data.seq_len}
    task = get_task("causal_lm")
    train = torch.as_tensor(td.train, dtype=torch.int64)
    ev = {"input_ids": torch.as_tensor(np.concatenate([td.val, td.test]), dtype=torch.int64),
          "split": torch.as_tensor([0] * len(td.val) + [1] * len(td.test))}
    print(f"train blocks {tuple(train.shape)}, val {len(td.val)}, test {len(td.test)}, vocab {info['vocab_size']}",
          flush=True)
    d, t = cfg.distill, cfg.teacher.training
    tm = {"model": cfg.teacher.model, "kwargs": dict(cfg.teacher.kwargs)}
    sm = {"model": cfg.student.model, "kwargs": dict(cfg.student.kwargs)}
    stages = a.stages.split(",")
    teacher, t_metrics = None, None
    tc = Path(a.teacher_cache) if a.teacher_cache else None
    if any(s.startswith("kd") for s in stages):
        if tc is not None and tc.exists():
            teacher = task.build_model(tm, info)
            teacher.load_state_dict(torch.load(tc))
            t_metrics = task.evaluate(teacher, ev, task_info=info)
            print("teacher (cached)", _short(t_metrics), flush=True)
        else:
            teacher, r = train_stage(task, info, train, ev, tm, "ce", t.epochs, t.batch_size, t.optimizer.model_dump(),
                                     t.lr_schedule.model_dump(), None, cfg, seed=a.seed, eval_every=a.eval_every)
            t_metrics = r
            print("teacher", _short(r), flush=True)
            if tc is not None:
                torch.save(teacher.state_dict(), tc)
        teacher.eval().requires_grad_(False)
    res = {}
    for s in stages:
        kind = "ce" if s == "baseline" else "kd"
        _, r = train_stage(task, info, train, ev, sm, kind, d.epochs, d.batch_size, d.optimizer.model_dump(),
                           d.lr_schedule.model_dump(), d.grad_clip, cfg, teacher=teacher if kind == "kd" else None,
                           seed=a.seed, sparsity=cfg.compression.sparsity if s == "kd_sparse" else 0.0,
                           compression=cfg.compression.model_dump(mode="json"), eval_every=a.eval_every)
        res[s] = r
        print(s, _short(r), flush=True)
    for s in res:
        if s != "baseline" and "baseline" in res:
            print(f"{s} vs baseline: val {res[s]['val_perplexity'] / res['baseline']['val_perplexity'] - 1:+.1%} "
                  f"test {res[s]['perplexity'] / res['baseline']['perplexity'] - 1:+.1%}")
    print("overrides", a.ov)
    if a.out:
        write_json_atomic(a.out, {
            "command": " ".join(["python", "benchmarks/lm_kd_quick.py", *(sys.argv[1:] if argv is None else argv)]),
            "config": a.config, "overrides": a.ov, "seed": a.seed, "teacher_cache": a.teacher_cache,
            "machine": machine_info("cpu"), "loadavg_at_end": os.getloadavg(),
            "teacher": t_metrics, "stages": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
