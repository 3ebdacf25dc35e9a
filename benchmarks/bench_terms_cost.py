"""The loss-term seam costs nothing on today's path: lm_default's dense distillation step through the
``Criterion`` (``kd_logits`` + ``ce``, expanded from ``distill.temperature`` / ``alpha``) against a direct
``ops.kd_loss_linear`` call on the same batch, side by side in one process.

    PYTHONPATH=. python benchmarks/bench_terms_cost.py [--seeds 0 1 2] [--reps 30] [--threads 1]

A step: zero the gradients, the student's forward (last hidden states, ``logits_to_keep=1``), the loss on
the teacher's kept last hidden states (``CausalLMTask.prepare``), backward. The two steps alternate (A B B A
...) so that load on a shared machine falls on both alike; each step's CPU time of this thread
(``time.thread_time``: what the step computes, not how long other processes held the CPU; torch runs
on this one thread) and wall time; per seed the median of each, then the median over seeds of the ratio
(CPU time: the target; wall time: reported beside it). Before timing, the loss and every gradient of the two steps are asserted
bitwise equal. Random token ids (lm_default's vocabulary, blocks and batch; some padding): the cost does
not depend on the text. Target: ratio <= 1.03. JSON: benchmarks/results/terms_cost.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from raydistill import ops
from raydistill.config import load_config
from raydistill.distill.spec import StageSpec
from raydistill.losses import Criterion
from raydistill.tasks import IGNORE_INDEX, get_task
from raydistill.tasks.causal_lm import next_token_labels
from raydistill.utils import machine_info, results_dir, write_json_atomic


def setup(cfg, seed: int):
    torch.manual_seed(seed)
    task = get_task("causal_lm")
    vocab, seq, bs = cfg.data.vocab_size, cfg.data.seq_len, cfg.distill.batch_size
    info = {"vocab_size": vocab, "pad_id": 1, "eos_id": 0, "seq_len": seq}
    student = task.build_model({"model": cfg.student.model, "kwargs": dict(cfg.student.kwargs)}, info)
    teacher = task.build_model({"model": cfg.teacher.model, "kwargs": dict(cfg.teacher.kwargs)}, info)
    teacher = teacher.eval().requires_grad_(False)
    ids = torch.randint(2, vocab, (bs, seq))
    ids[0, seq // 2:] = info["pad_id"]  # a padded tail: ignored targets
    spec = StageSpec(stage="student", task="causal_lm", kind="kd", model={}, epochs=1, batch_size=bs, optimizer={},
                     lr_schedule={}, seed=seed, progress_dir="", task_info=info, fused_linear=True,
                     terms=tuple(cfg.loss_terms()))
    crit = Criterion(spec.terms, student=task.layout(student), teachers={"main": task.layout(teacher)})
    batch = task.prepare({"input_ids": ids}, spec, {"main": teacher}, crit.needs())  # the teacher's states, once
    return task, spec, crit, student, teacher, batch


def criterion_step(task, spec, crit, student, teacher, batch):
    student.zero_grad(set_to_none=True)
    loss = crit(task.forward(student, batch, spec, {"main": teacher}, crit.needs()))
    loss.backward()
    return loss


def direct_step(cfg, student, teacher, batch, vocab: int, pad: int):
    d = cfg.distill
    student.zero_grad(set_to_none=True)
    ids = batch["input_ids"]
    h = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    w_s, b_s, head_t = student.lm_head.weight, student.lm_head.bias, teacher.lm_head
    loss = ops.kd_loss_linear(h, w_s[:vocab], batch["teacher.main.last"], head_t.weight, next_token_labels(ids, pad),
                              student_bias=None if b_s is None else b_s[:vocab], teacher_bias=head_t.bias,
                              temperature=d.temperature, alpha=d.alpha, divergence=d.divergence, beta=d.beta,
                              ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reps", type=int, default=30, help="timed steps of each kind per seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (lm_default's workers use 1)")
    ap.add_argument("--out", default=str(results_dir() / "terms_cost.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    info = machine_info("cpu")
    rows = []
    for seed in a.seeds:
        task, spec, crit, student, teacher, batch = setup(cfg, seed)
        vocab, pad = spec.task_info["vocab_size"], spec.task_info["pad_id"]
        # identical loss and gradients, bit for bit
        ref = direct_step(cfg, student, teacher, batch, vocab, pad)
        g_ref = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        got = criterion_step(task, spec, crit, student, teacher, batch)
        g_got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        assert torch.equal(got.detach(), ref.detach()), (float(got), float(ref))
        assert g_got.keys() == g_ref.keys() and all(torch.equal(g_got[n], g_ref[n]) for n in g_ref), \
            "gradients differ"
        cpu = {"direct": [], "criterion": []}
        wall = {"direct": [], "criterion": []}
        for i in range(2 + a.reps):
            order = ("direct", "criterion") if i % 2 == 0 else ("criterion", "direct")
            for kind in order:
                c0, t0 = time.thread_time(), time.perf_counter()
                if kind == "direct":
                    direct_step(cfg, student, teacher, batch, vocab, pad)
                else:
                    criterion_step(task, spec, crit, student, teacher, batch)
                if i >= 2:  # two warm-up rounds
                    cpu[kind].append(time.thread_time() - c0)
                    wall[kind].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in cpu.items()}
        med_wall = {k: statistics.median(v) for k, v in wall.items()}
        rows.append({"seed": seed, "loss": float(ref.detach()), "median_cpu_s": med, "median_wall_s": med_wall,
                     "ratio": med["criterion"] / med["direct"],
                     "ratio_wall": med_wall["criterion"] / med_wall["direct"], "loadavg": os.getloadavg()})
        print(f"seed {seed}: CPU direct {1e3 * med['direct']:.1f} ms, criterion {1e3 * med['criterion']:.1f} ms, "
              f"ratio {rows[-1]['ratio']:.4f} (wall {rows[-1]['ratio_wall']:.4f}; loss {float(ref.detach()):.5f}, "
              f"identical loss and gradients; load {os.getloadavg()[0]:.1f})", flush=True)
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median CPU-time ratio over seeds: {ratio:.4f} (target <= 1.03: {'met' if ratio <= 1.03 else 'NOT met'}); "
          f"wall-time ratio {statistics.median(r['ratio_wall'] for r in rows):.4f}")
    write_json_atomic(a.out, {
        "command": " ".join(["python", "benchmarks/bench_terms_cost.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": a.config, "threads": a.threads, "reps": a.reps, "machine": info, "loadavg_at_end": os.getloadavg(),
        "step": "zero_grad + student forward (logits_to_keep=1) + loss on kept teacher states + backward",
        "clock": "thread CPU time (time.thread_time); wall time beside it",
        "seeds": rows, "median_ratio": ratio, "median_ratio_wall": statistics.median(r["ratio_wall"] for r in rows),
        "target": "<= 1.03", "met": ratio <= 1.03})
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
