"""Distillation step throughput and extra peak memory: raydistill's own per-worker loop vs TRL's GKDTrainer.

    pip install --no-deps trl accelerate && pip install datasets     # benchmark-only (never another torch)
    PYTHONPATH=. python benchmarks/bench_vs_trl.py [--rounds 3] [--steps 20] [--warmup 3] [--threads 2]

The case of issue 22: vocabulary 32000, sequence 256, batch 4, teacher and student both Llama 2 layers x 256
(intermediate 688, 4 heads), forward KL at T = 1 on the teacher's soft targets only, AdamW (lr 1e-4,
gradient norm clipped to 1, constant schedule), fp32, ``--threads`` torch threads, random token ids.

* raydistill: ``raydistill.distill.loop.train_epoch`` on a ``Stage`` built as a worker builds it (the same
  function Ray Train runs, without Ray around it): ``CausalLMTask.prepare`` runs the teacher once over the
  rows (its last hidden states are kept), then every step is the fused ``kd_loss_linear`` (no logits
  tensor), backward, clip, AdamW, schedule and the loop's own bookkeeping (``steps.jsonl``). Reported both
  per step (``step``) and with the teacher pass's share per batch added (``step+teacher``: one teacher
  forward per row, as TRL's step has), the latter being the headline.
* TRL: ``trl.experimental.gkd.GKDTrainer`` off-policy (``lmbda=0``, ``seq_kd=False``, ``beta=0``: forward
  KL, ``temperature=1``), the same models, data (collated to input_ids / attention_mask / labels) and
  optimizer settings; its step is timed by a TrainerCallback (step begin to step end).

Each measurement runs in a fresh process (spawned; ``benchmarks/_procmem.py``; the loop without Ray:
``benchmarks/_local_loop.py``), the two alternating for ``--rounds`` rounds; the
medians are reported. Extra peak memory = the process's peak RSS during training (``VmHWM``, reset through
``/proc/self/clear_refs`` just before) minus its RSS before it (models, data and trainer built). Writes a
table and ``benchmarks/results/bench_vs_trl.json`` (machine, load average, git commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _procmem  # noqa: E402

VOCAB, SEQ, BATCH = 32000, 256, 4
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": SEQ,
         "tie_word_embeddings": False}
LR = 1e-4


def _setup(threads: int, rows: int):
    import torch

    from raydistill.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = build_model({"model": "hf", "kwargs": {"config": LLAMA}}, vocab_size=VOCAB).eval().requires_grad_(False)
    student = build_model({"model": "hf", "kwargs": {"config": LLAMA}}, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)  # id 0 is the pad id: none in the data
    return teacher, student, ids


def run_raydistill(threads: int, warmup: int, steps: int) -> dict:
    from _local_loop import lm_spec, local_stage, timed_epochs

    teacher, student, ids = _setup(threads, (warmup + steps) * BATCH)
    spec = lm_spec(vocab=VOCAB, seq=SEQ, batch=BATCH, lr=LR, threads=threads)  # forward KL, T 1, alpha 1
    rss0 = _procmem.rss()
    exact = _procmem.reset_peak()
    st, teacher_s, teacher_cpu = local_stage(spec, student, teacher, ids)  # the teacher pass: counted
    assert "teacher.main.last" in st.train  # the teacher pass kept its last hidden states
    m = timed_epochs(st, warmup, steps)
    peak = _procmem.peak()
    per_batch = len(ids) / BATCH
    return {"step_s": m["step_s"], "step_cpu_s": m["step_cpu_s"], "teacher_pass_s_per_batch": teacher_s / per_batch,
            "teacher_pass_cpu_s_per_batch": teacher_cpu / per_batch,
            "step_with_teacher_s": m["step_s"] + teacher_s / per_batch,
            "step_with_teacher_cpu_s": m["step_cpu_s"] + teacher_cpu / per_batch, "train_loss": m["train_loss"],
            "extra_peak_bytes": peak - rss0, "peak_reset": exact, "rss_before": rss0}


def run_trl(threads: int, warmup: int, steps: int) -> dict:
    import os as _os

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, student, ids = _setup(threads, (warmup + steps) * BATCH)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2},
                                                                       unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    ds = Dataset.from_dict({"input_ids": ids.tolist()})

    def collate(rows):
        x = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    times: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t, time.process_time() - self.c))

    tmp = tempfile.mkdtemp(prefix="bench-vs-trl-")
    args = GKDConfig(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=warmup + steps, learning_rate=LR,
                     lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, lmbda=0.0, beta=0.0,
                     seq_kd=False, temperature=1.0, max_length=SEQ, use_cpu=True, bf16=False, fp16=False,
                     report_to=[], save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
                     disable_dropout=True, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, data_collator=collate,
                         processing_class=tok, callbacks=[StepTimer()])
    rss0 = _procmem.rss()
    exact = _procmem.reset_peak()
    res = trainer.train()
    peak = _procmem.peak()
    step_s = statistics.mean(t for t, _ in times[warmup:])
    cpu_s = statistics.mean(c for _, c in times[warmup:])
    return {"step_s": step_s, "step_with_teacher_s": step_s, "step_cpu_s": cpu_s, "step_with_teacher_cpu_s": cpu_s, "train_loss": float(res.training_loss),
            "extra_peak_bytes": peak - rss0, "peak_reset": exact, "rss_before": rss0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_vs_trl.json)")
    a = ap.parse_args(argv)
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    info = machine_info()
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {"raydistill": [], "trl": []}
    for r in range(a.rounds):
        for name, fn in (("raydistill", "run_raydistill"), ("trl", "run_trl")):
            m = _procmem.in_fresh_process(globals()[fn], a.threads, a.warmup, a.steps)
            runs[name].append(m)
            print(f"round {r + 1}/{a.rounds} {name:10s} step {m['step_s'] * 1e3:7.1f} ms"
                  + (f" (+ teacher pass {m['teacher_pass_s_per_batch'] * 1e3:.1f} ms/batch)"
                     if "teacher_pass_s_per_batch" in m else "")
                  + f"  extra peak {m['extra_peak_bytes'] / 2**20:7.1f} MiB  loss {m['train_loss']:.4f}"
                  + f"  load {os.getloadavg()[0]:.1f}", flush=True)
    tokens = BATCH * SEQ
    med = {k: {f: statistics.median(m[f] for m in v) for f in ("step_s", "step_with_teacher_s", "step_cpu_s",
                                                               "step_with_teacher_cpu_s", "extra_peak_bytes")}
           for k, v in runs.items()}
    ours, trl = med["raydistill"], med["trl"]
    result = {
        "case": {"vocab": VOCAB, "seq": SEQ, "batch": BATCH, "teacher": LLAMA, "student": LLAMA, "threads": a.threads,
                 "divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0, "lr": LR, "grad_clip": 1.0,
                 "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds},
        "tokens_per_s": {"raydistill_step": tokens / ours["step_s"],
                         "raydistill_step_with_teacher_pass": tokens / ours["step_with_teacher_s"],
                         "trl_gkd": tokens / trl["step_s"]},
        "speedup_vs_trl": trl["step_s"] / ours["step_with_teacher_s"],
        "speedup_vs_trl_cached_teacher": trl["step_s"] / ours["step_s"],
        # CPU seconds of the process per step (time.process_time): less sensitive to other jobs on the machine
        "speedup_vs_trl_cpu_time": trl["step_cpu_s"] / ours["step_with_teacher_cpu_s"],
        "extra_peak_mib": {"raydistill": ours["extra_peak_bytes"] / 2**20, "trl_gkd": trl["extra_peak_bytes"] / 2**20},
        "extra_peak_ratio": ours["extra_peak_bytes"] / trl["extra_peak_bytes"],
        "targets": {"speedup >= 1.8": trl["step_s"] / ours["step_with_teacher_s"] >= 1.8,
                    "extra_peak_ratio <= 0.5": ours["extra_peak_bytes"] <= 0.5 * trl["extra_peak_bytes"]},
        "runs": runs,
        "machine": info, "load_average_start": load0, "load_average_end": os.getloadavg(),
    }
    import trl

    result["versions"] = {"trl": trl.__version__}
    print(f"\n{'':28s}{'tokens/s':>10s}{'extra peak MiB':>16s}")
    print(f"{'raydistill (step+teacher)':28s}{result['tokens_per_s']['raydistill_step_with_teacher_pass']:10.0f}"
          f"{result['extra_peak_mib']['raydistill']:16.1f}")
    print(f"{'raydistill (step)':28s}{result['tokens_per_s']['raydistill_step']:10.0f}")
    print(f"{'TRL GKDTrainer':28s}{result['tokens_per_s']['trl_gkd']:10.0f}{result['extra_peak_mib']['trl_gkd']:16.1f}")
    print(f"speedup (CPU time) {result['speedup_vs_trl_cpu_time']:.2f}x")
    print(f"speedup {result['speedup_vs_trl']:.2f}x (>= 1.8: {result['targets']['speedup >= 1.8']}), "
          f"extra peak ratio {result['extra_peak_ratio']:.2f} (<= 0.5: {result['targets']['extra_peak_ratio <= 0.5']})")
    out = Path(a.out) if a.out else results_dir() / "bench_vs_trl.json"
    write_json_atomic(out, result)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
