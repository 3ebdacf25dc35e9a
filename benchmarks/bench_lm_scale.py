"""Training at scale, the training part of issue 22's rehearsal: tokens/s, peak memory and perplexity of the
distillation loop in fp32 and bf16, with and without activation checkpointing.

    PYTHONPATH=. python benchmarks/bench_lm_scale.py [--storage runs] [--steps 20] [--warmup 2]
        [--student 2x256] [--teacher 4x256] [--vocab 4096] [--seq 256] [--batch 8] [--max-bytes 2000000]
        [--variants fp32,bf16,fp32+ckpt,bf16+ckpt] [--threads 2] [--out FILE]

The corpus: ``data.name: text`` (the Python standard library's sources, ``--max-bytes`` of them, a BPE of
``--vocab`` tokens, blocks of ``--seq``), tokenized by the pipeline (``text_data``, cached under
``--storage``). Models: Llama students / teachers ``LAYERSxWIDTH`` (intermediate 8/3 x width, heads of 64),
random initial weights (a trained teacher is not needed to compare precisions: the student learns the data
through the hard-label half of the loss, alpha 0.5, T 1). Each variant runs in a fresh process: the per-
worker loop (``raydistill.distill.loop.train_epoch``, fused ``kd_loss_linear``, AdamW, one worker without
Ray: ``benchmarks/_local_loop.py``) for ``--warmup`` + ``--steps`` optimizer steps from the same initial
weights and batches, then the validation perplexity (float32 evaluation). Peak memory: the process's peak
RSS (``VmHWM``) over the teacher pass and training, and that minus the RSS before them (models and data
loaded). Writes a table and ``benchmarks/results/lm_scale.json``.

Issue 22's rehearsal itself (a 100 MB corpus through Ray Data, a 30-60 M-parameter student, 2 Ray Train
workers) is wave 2 of the issue; this script is its training part on a smaller case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _procmem  # noqa: E402


def _llama(spec: str, vocab: int, seq: int) -> dict:
    layers, width = (int(x) for x in spec.lower().split("x"))
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": (8 * width // 3 + 63) // 64 * 64,
            "num_hidden_layers": layers, "num_attention_heads": max(1, width // 64),
            "num_key_value_heads": max(1, width // 64), "max_position_embeddings": seq,
            "tie_word_embeddings": False}


def run_variant(variant: str, a: dict, data: dict) -> dict:
    import numpy as np
    import torch

    from _local_loop import local_stage, lm_spec, timed_epochs
    from raydistill.models import build_model
    from raydistill.tasks.causal_lm import lm_metrics

    torch.set_num_threads(a["threads"])
    precision = "bf16" if variant.startswith("bf16") else "fp32"
    vocab = int(data["vocab_size"])
    torch.manual_seed(0)
    teacher = build_model({"model": "hf", "kwargs": {"config": _llama(a["teacher"], vocab, a["seq"])}}, vocab_size=vocab)
    student = build_model({"model": "hf", "kwargs": {"config": _llama(a["student"], vocab, a["seq"])}}, vocab_size=vocab)
    train = torch.as_tensor(np.load(data["train"]))[: (a["warmup"] + a["steps"]) * a["batch"]]
    val = torch.as_tensor(np.load(data["val"]))
    spec = lm_spec(vocab=vocab, seq=a["seq"], batch=a["batch"], lr=a["lr"], alpha=0.5, precision=precision,
                   gradient_checkpointing=variant.endswith("+ckpt"), threads=a["threads"],
                   schedule={"name": "cosine", "warmup_fraction": 0.0, "warmup_steps": a["warmup"]})
    spec = spec.replace(task_info={**spec.task_info, "pad_id": int(data["pad_id"]), "eos_id": int(data["eos_id"])})
    rss0 = _procmem.rss()
    _procmem.reset_peak()
    st, teacher_s, _ = local_stage(spec, student, teacher, train)
    m = timed_epochs(st, a["warmup"], a["steps"])
    peak = _procmem.peak()
    ev = lm_metrics(student, val, int(data["pad_id"]), vocab)
    params = sum(p.numel() for p in student.parameters())
    return {"variant": variant, "tokens_per_s": m["tokens_per_s"], "step_s": m["step_s"], "step_cpu_s": m["step_cpu_s"],
            "train_loss": m["train_loss"], "val_perplexity": ev["perplexity"], "peak_rss_mib": peak / 2**20,
            "extra_peak_mib": (peak - rss0) / 2**20, "rss_before_mib": rss0 / 2**20, "teacher_pass_s": teacher_s,
            "student_params": params, "teacher_params": sum(p.numel() for p in teacher.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--student", default="2x256")
    ap.add_argument("--teacher", default="4x256")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-bytes", type=int, default=2_000_000)
    ap.add_argument("--variants", default="fp32,bf16,fp32+ckpt,bf16+ckpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import numpy as np

    from raydistill.config import load_config
    from raydistill.distill.session import ray_session
    from raydistill.tasks.causal_lm import text_data
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    cfg = load_config("lm_default", [f"data.max_bytes={args.max_bytes}", f"data.vocab_size={args.vocab}",
                                     f"data.seq_len={args.seq}",
                                     f"student.kwargs.config={json.dumps(_llama(args.student, args.vocab, args.seq))}",
                                     f"teacher.kwargs.config={json.dumps(_llama(args.teacher, args.vocab, args.seq))}"])
    with ray_session():
        td = text_data(cfg, Path(args.storage).resolve())
    tmp = Path(args.storage).resolve() / "bench_lm_scale"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "train.npy", td.train.astype(np.int64))
    np.save(tmp / "val.npy", td.val.astype(np.int64))
    data = {"train": str(tmp / "train.npy"), "val": str(tmp / "val.npy"), "vocab_size": td.vocab_size,
            "pad_id": td.pad_id, "eos_id": td.eos_id}
    need = (args.warmup + args.steps) * args.batch
    if len(td.train) < need:
        raise SystemExit(f"{len(td.train)} train blocks, fewer than the {need} the steps need: raise --max-bytes")
    info = machine_info()
    a = vars(args)
    rows = []
    for v in args.variants.split(","):
        r = _procmem.in_fresh_process(run_variant, v, a, data)
        r["load_average"] = os.getloadavg()
        rows.append(r)
        print(f"{v:10s} {r['tokens_per_s']:9.0f} tok/s  step {r['step_s']:.2f} s (CPU {r['step_cpu_s']:.2f} s)  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB (+{r['extra_peak_mib']:.0f})  val ppl {r['val_perplexity']:.3f}"
              f"  load {r['load_average'][0]:.1f}", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {}
    if "fp32" in by and "bf16" in by:
        ratios["bf16_vs_fp32_extra_peak"] = by["bf16"]["extra_peak_mib"] / by["fp32"]["extra_peak_mib"]
        ratios["bf16_vs_fp32_perplexity"] = by["bf16"]["val_perplexity"] / by["fp32"]["val_perplexity"] - 1
    if "fp32" in by and "fp32+ckpt" in by:
        ratios["ckpt_vs_none_extra_peak_fp32"] = by["fp32+ckpt"]["extra_peak_mib"] / by["fp32"]["extra_peak_mib"]
    if "bf16" in by and "bf16+ckpt" in by:
        ratios["ckpt_vs_none_extra_peak_bf16"] = by["bf16+ckpt"]["extra_peak_mib"] / by["bf16"]["extra_peak_mib"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    out = Path(args.out) if args.out else results_dir() / "lm_scale.json"
    write_json_atomic(out, {"args": a, "train_blocks": len(td.train), "rows": rows, "ratios": ratios,
                            "machine": info, "load_average_end": os.getloadavg(), "time": time.time()})
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
