"""CPU time of one ``lm_default`` training step, with and without the teacher's forward, on one thread.

    PYTHONPATH=. python benchmarks/lm_step_cost.py [--storage runs] [--config lm_default] [--steps 20]

Uses the pipeline's pieces (the tokenized corpus cached under ``--storage`` by ``raydistill distill``,
the stage's ``Criterion`` over ``CausalLMTask.forward`` / ``prepare``) with untrained models (the cost does not depend on the weights).
Prints the CPU seconds (``time.process_time``, so other jobs on the machine change it little) of: a
from-scratch (cross-entropy) step; a distillation step that runs the teacher; the teacher's one pass over
the train blocks (``CausalLMTask.prepare``), per batch; a distillation step that uses that pass.
"""
import argparse
import time
from pathlib import Path

import torch

from raydistill.config import load_config
from raydistill.distill.spec import StageSpec
from raydistill.losses import Criterion
from raydistill.tasks import get_task
from raydistill.tasks.causal_lm import text_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="lm_default")
    ap.add_argument("--storage", default="runs", help="where the tokenized corpus is cached")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(a.config)
    td = text_data(cfg, Path(a.storage))
    info = {**td.info(), "seq_len": cfg.data.seq_len}
    task = get_task("causal_lm")
    train = torch.as_tensor(td.train, dtype=torch.int64)
    d, bs = cfg.distill, cfg.distill.batch_size
    teacher = task.build_model({"model": cfg.teacher.model, "kwargs": dict(cfg.teacher.kwargs)}, info)
    teacher = teacher.eval().requires_grad_(False)
    student = task.build_model({"model": cfg.student.model, "kwargs": dict(cfg.student.kwargs)}, info)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def spec_of(kind):
        return StageSpec(stage=kind, task="causal_lm", kind=kind, model={}, epochs=1, batch_size=bs, optimizer={},
                         lr_schedule={}, seed=0, progress_dir="", task_info=info, fused_linear=d.fused_linear,
                         **({"terms": tuple(cfg.loss_terms())} if kind == "kd" else {}))

    def criterion(spec):
        return Criterion(spec.terms, student=task.layout(student), teachers={"main": task.layout(teacher)})

    def step_cost(kind, data):
        spec = spec_of(kind)
        crit = criterion(spec)
        for i in range(3 + a.steps):
            if i == 3:
                t = time.process_time()
            out = task.forward(student, {k: v[i * bs:(i + 1) * bs] for k, v in data.items()}, spec,
                               {"main": teacher}, crit.needs())
            loss = crit(out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.process_time() - t) / a.steps

    ids = {"input_ids": train}
    print(f"{a.config}: batch {bs} x {cfg.data.seq_len}, {len(train)} train blocks, 1 thread, CPU seconds")
    print(f"  from-scratch step                   {step_cost('ce', ids):.4f}")
    print(f"  distillation step, teacher forward  {step_cost('kd', ids):.4f}")
    t = time.process_time()
    pre = task.prepare(ids, spec_of("kd"), {"main": teacher}, criterion(spec_of("kd")).needs())
    tp = time.process_time() - t
    print(f"  teacher pass (prepare), per batch   {tp / len(train) * bs:.4f}  ({tp:.1f} for all blocks)")
    print(f"  distillation step, after the pass   {step_cost('kd', pre):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
