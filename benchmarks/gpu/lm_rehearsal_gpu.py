"""Issue 22's scale rehearsal on one GPU (point 5): the causal-LM distillation step in bf16 with the fused
``kd_loss_linear``, sized for one H100 (80 GB) in under 10 minutes; writes one JSON.

    PYTHONPATH=. python benchmarks/gpu/lm_rehearsal_gpu.py [--corpus-mb 100] [--sample-mb 32] [--vocab 32000]
        [--seq 512] [--student 8x512] [--teacher 16x640] [--batch 32] [--steps 600] [--warmup 30]
        [--variants bf16,fp32,bf16+ckpt] [--budget-s 150] [--out benchmarks/results/lm_rehearsal_gpu.json]

What the GPU machines have: torch, transformers, tokenizers, safetensors; no Ray and no pydantic. So this
script runs the rehearsal's pieces without them: the corpus (the ``.py`` sources of the standard library and
the installed packages, ``benchmarks/bench_corpus_scale.py``'s documents, ``--corpus-mb`` MB), a byte-level
BPE of ``--vocab`` (the special tokens of ``raydistill.data.text``) trained on a seeded sample of
``--sample-mb`` MB of documents, every document encoded with an ``<|endoftext|>`` after it and the stream cut
into blocks of ``--seq``, the blocks permuted by the seed and ``--val-blocks`` of them held out. Models:
Llama student / teacher ``LAYERSxWIDTH`` (``bench_lm_scale``'s), the teacher with random initial weights (a
comparison of precisions needs no trained teacher). The step: the teacher's last hidden states (no grad),
the student's, ``raydistill.ops.kd_loss_linear`` over both lm_heads (forward KL + CE, alpha 0.5, T 1),
AdamW with fp32 master weights, warmup + cosine; ``bf16``: the pipeline's scheme (``distill.precision``:
the student on a bf16 copy of its float32 master weights, ``raydistill.distill.precision.Precision``, the
frozen teacher in bf16, under autocast); ``+ckpt``: the student's
activation checkpointing (transformers'). Each variant runs ``--steps`` optimizer steps or until
``--budget-s`` seconds; reported: tokens/s over the steps after the first 10, peak GPU memory
(``max_memory_allocated``), the final loss, the validation perplexity, and which kd_loss backend ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_corpus_scale import iter_documents, source_files  # noqa: E402
from bench_lm_scale import _llama  # noqa: E402

EOS, PAD = "<|endoftext|>", "<pad>"  # raydistill.data.text's special tokens (that module needs pydantic)


def build_corpus(a: dict) -> dict:
    """Tokenizer and packed blocks (train / val) in memory: a one-GPU machine has the RAM for 100 MB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t0 = time.perf_counter()
    docs = list(iter_documents(source_files(), int(a["corpus_mb"] * 10**6)))
    rng = np.random.default_rng(a["seed"])
    sample, size = [], 0
    for i in rng.permutation(len(docs)):  # the BPE's bounded, seeded sample of documents
        sample.append(docs[i])
        size += len(docs[i])
        if size >= a["sample_mb"] * 2**20:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainer=trainers.BpeTrainer(
        vocab_size=a["vocab"], special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe_s = time.perf_counter() - t0
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    parts = []
    for i in range(0, len(docs), 512):
        for enc in tok.encode_batch(docs[i:i + 512], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], np.int32))
    ids = np.concatenate(parts)
    blocks = ids[: len(ids) // a["seq"] * a["seq"]].reshape(-1, a["seq"])
    blocks = blocks[rng.permutation(len(blocks))]
    val, train = blocks[: a["val_blocks"]], blocks[a["val_blocks"]:]
    return {"train": torch.from_numpy(train.astype(np.int64)), "val": torch.from_numpy(val.astype(np.int64)),
            "vocab": tok.get_vocab_size(), "pad_id": pad, "eos_id": eos, "documents": len(docs),
            "corpus_bytes": sum(len(d.encode()) for d in docs), "sample_documents": len(sample),
            "tokens": int(len(ids)), "bpe_s": bpe_s, "prepare_s": time.perf_counter() - t0}


def run_variant(variant: str, a: dict, data: dict, dev: torch.device) -> dict:
    from raydistill.distill.precision import Precision, lean_activations
    from raydistill.models import build_model
    from raydistill.ops import kd_loss_linear
    from raydistill.tasks.causal_lm import lm_metrics, next_token_labels

    bf16 = variant.startswith("bf16")
    vocab = data["vocab"]
    torch.manual_seed(0)
    teacher = build_model({"model": "hf", "kwargs": {"config": _llama(a["teacher"], vocab, a["seq"])}},
                          vocab_size=vocab).to(dev).eval().requires_grad_(False)
    torch.manual_seed(1)
    student = build_model({"model": "hf", "kwargs": {"config": _llama(a["student"], vocab, a["seq"])}},
                          vocab_size=vocab).to(dev).train()
    if bf16:
        teacher = teacher.to(torch.bfloat16)  # frozen: its weights in the compute dtype
    lean_activations(student, gradient_checkpointing=variant.endswith("+ckpt"))  # the pipeline's own
    student.config.use_cache = False
    prec = Precision("bf16" if bf16 else "fp32", dev)
    model = prec.compute_model(student)  # bf16: a bf16 copy; student keeps the float32 master weights
    opt = torch.optim.AdamW(prec.optimized_parameters(model), lr=a["lr"], weight_decay=0.01, fused=True)
    total = a["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a["warmup"]) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - a["warmup"]) / max(1, total - a["warmup"])))))
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    train, b = data["train"], a["batch"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, t_start, t_timed, timed_tokens, step = [], time.perf_counter(), None, 0, 0
    for step in range(total):
        ids = train[(step * b) % (len(train) - b):][:b].to(dev, non_blocking=True)
        labels = next_token_labels(ids, data["pad_id"])
        prec.sync()
        with amp:
            with torch.no_grad():
                t_h = teacher.model(input_ids=ids).last_hidden_state
            s_h = model.model(input_ids=ids).last_hidden_state
            w = model.lm_head.weight.to(s_h.dtype)
            loss = kd_loss_linear(s_h.flatten(0, 1), w, t_h.flatten(0, 1).to(s_h.dtype),
                                  teacher.lm_head.weight.to(s_h.dtype), labels.flatten(), temperature=1.0, alpha=0.5)
        loss.backward()
        prec.step(opt, prec.master_gradients(model), grad_clip=1.0)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 9:
            torch.cuda.synchronize()
            t_timed = time.perf_counter()
        elif step > 9:
            timed_tokens += ids.numel()
        if step % 50 == 0 or step == total - 1:
            losses.append([step + 1, float(loss)])
        if time.perf_counter() - t_start > a["budget_s"]:
            break
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - (t_timed or t_start)
    peak = torch.cuda.max_memory_allocated()
    with amp:
        ev = lm_metrics(student, data["val"].to(dev), data["pad_id"], vocab, batch_size=16)
    return {"variant": variant, "steps": step + 1, "tokens_per_s": timed_tokens / elapsed if t_timed else None,
            "peak_gpu_mib": peak / 2**20, "losses": losses, "val_perplexity": ev["perplexity"],
            "val_tokens": ev["eval_tokens"], "wall_s": time.perf_counter() - t_start,
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-mb", type=int, default=100)
    ap.add_argument("--sample-mb", type=float, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--student", default="8x512")
    ap.add_argument("--teacher", default="16x640")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-blocks", type=int, default=256)
    ap.add_argument("--variants", default="bf16,fp32,bf16+ckpt")
    ap.add_argument("--budget-s", type=float, default=150.0, help="per variant: stop after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_rehearsal_gpu.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("lm_rehearsal_gpu.py needs a CUDA GPU")
    a = vars(args)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    data = build_corpus(a)
    print(f"corpus: {data['corpus_bytes'] / 1e6:.0f} MB, {data['documents']} documents, {data['tokens'] / 1e6:.1f} M "
          f"tokens, {len(data['train'])} train blocks, BPE {data['bpe_s']:.0f} s, prepared in {data['prepare_s']:.0f} s",
          flush=True)
    try:
        from raydistill._build import op_backend

        backend = op_backend("kd_loss_fwd", "cuda")
    except Exception as exc:  # noqa: BLE001 - recorded: the reference fallback runs then
        backend = f"unknown ({type(exc).__name__}: {exc})"
    rows = []
    for v in args.variants.split(","):
        r = run_variant(v, a, data, dev)
        rows.append(r)
        print(f"{v:10s} {r['tokens_per_s'] or 0:10.0f} tok/s  {r['steps']} steps  peak {r['peak_gpu_mib']:8.0f} MiB  "
              f"loss {r['losses'][-1][1]:.3f}  val ppl {r['val_perplexity']:.2f}", flush=True)
        torch.cuda.empty_cache()
    p = torch.cuda.get_device_properties(0)
    import subprocess

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"args": a, "git_commit": commit or None, "rows": rows, "kd_loss_backend": backend,
           "corpus": {k: v for k, v in data.items() if not isinstance(v, torch.Tensor)},
           "gpu": f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB", "torch": torch.__version__,
           "load_average": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
