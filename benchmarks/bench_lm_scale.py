"""Training at scale (issue 22): tokens/s, peak memory and perplexity of the distillation in fp32 and bf16,
with and without activation checkpointing; ``--ray``: the scale rehearsal through the pipeline itself.

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

The train blocks the steps need are read from the head of the sharded train split (``CorpusInfo.head``),
not the whole split.

**The rehearsal** (``--ray``; issue 22 point 4)::

    PYTHONPATH=. python benchmarks/bench_lm_scale.py --ray [--corpus-mb 100] [--student 8x512]
        [--teacher 16x640] [--vocab 32000] [--seq 512] [--batch 12] [--steps 2] [--warmup 1] [--workers 2]
        [--val-fraction 0.0005] [--variants fp32,bf16,fp32+ckpt,bf16+ckpt] [--storage runs] [--out FILE]

A corpus of ``--corpus-mb`` MB that exists on every machine (the ``.py`` sources of the standard library
and the installed packages as jsonl, ``benchmarks/bench_corpus_scale.py``'s) is prepared by the pipeline
(Ray Data tokenizes and packs it into parquet shards; a BPE of ``--vocab`` on a seeded sample) and
**streamed** to ``--workers`` Ray Train workers (``data.materialize: false``: each worker reads its shard
with ``iter_torch_batches`` and a shuffle buffer). Each variant is one ``build_student_trainer(...).fit()``
in a fresh driver process: a step budget (``distill.max_steps`` = ``--warmup`` + ``--steps``, warmup +
cosine), forward KL + CE (alpha 0.5, T 1) through the fused ``kd_loss_linear``, from a teacher with random
initial weights (the same for every variant: comparing precisions needs no trained teacher). Reported:
tokens/s of the last epoch report (all workers), the validation and test perplexity after the budget, the
peak RSS of every Ray Train worker (``VmHWM``, sampled every 0.5 s while it runs: the whole process, Ray's and
torch's runtime included) and of the driver, and **the training's own memory**: rank 0's peak RSS after the
last step minus its RSS when its first step began (``peak_memory_mib - start_memory_mib`` of the run's
``steps.jsonl``: gradients, optimizer state, activations, the teacher's outputs; not the runtime, the models'
weights or the data). Writes a table and ``benchmarks/results/lm_rehearsal.json``.

Why a micro-batch of 12 x 512 tokens: mixed precision (fp32 master weights and optimizer state) and activation
checkpointing shrink the activations, not the states, so their savings show where activations are most of the
memory, as they are when users fill a GPU with micro-batches. At 4 x 512 the fixed part (the runtime, fp32
weights, AdamW state: about 3 GB of a 3.6 GB peak) hides them (``--batch 4``: see NOTES.md); 16 x 512 (6.7 GB a
worker) ran out of a 24 GiB machine shared with other jobs. Three optimizer steps
(the peak is reached from the second on: AdamW's state exists and a step's activations with it) keep a variant
near 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
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
    train = torch.as_tensor(np.load(data["train"]))
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


REHEARSAL = {"student": "8x512", "teacher": "16x640", "vocab": 32000, "seq": 512, "batch": 12, "steps": 2,
             "warmup": 1}
LOCAL = {"student": "2x256", "teacher": "4x256", "vocab": 4096, "seq": 256, "batch": 8, "steps": 20, "warmup": 2}


class _PeakPoller(_procmem.Poller):
    """Samples the peak RSS (``VmHWM``) of every Ray process under this driver every ``every`` seconds (a
    thread): the largest value seen per process, with its title (``ray::RayTrainWorker...``)."""

    def __init__(self, every: float = 0.5):
        super().__init__(every)
        self.seen = {}

    def _sample(self) -> None:
        import psutil

        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                title = " ".join(p.cmdline())[:80]
                status = Path(f"/proc/{p.pid}/status").read_text()
            except (psutil.Error, OSError):
                continue
            if not title.startswith("ray::"):
                continue
            hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:")), 0)
            old = self.seen.get(p.pid, {"peak_rss_mib": 0.0})
            self.seen[p.pid] = {"title": title, "peak_rss_mib": max(old["peak_rss_mib"], hwm / 2**20)}

    def train_workers(self) -> list[dict]:
        return [dict(v, pid=k) for k, v in self.seen.items() if "TrainWorker" in v["title"]]


def _rehearsal_config(a: dict, corpus: str, storage: Path, variant: str):
    from raydistill.config import load_config

    return load_config("lm_default", [
        f"data.path={corpus}", "data.max_bytes=null", f"data.vocab_size={a['vocab']}", f"data.seq_len={a['seq']}",
        f"data.val_fraction={a['val_fraction']}", "data.materialize=false", "data.samples=0",
        f"student.kwargs.config={json.dumps(_llama(a['student'], a['vocab'], a['seq']))}",
        f"teacher.kwargs.config={json.dumps(_llama(a['teacher'], a['vocab'], a['seq']))}",
        "distill.epochs=null", f"distill.max_steps={a['warmup'] + a['steps']}", f"distill.batch_size={a['batch']}",
        f"distill.lr_schedule={{name: cosine, warmup_steps: {a['warmup']}}}", f"distill.optimizer.lr={a['lr']}",
        "distill.log_every_steps=1", f"distill.precision={'bf16' if variant.startswith('bf16') else 'fp32'}",
        f"distill.gradient_checkpointing={str(variant.endswith('+ckpt')).lower()}", "distill.fused_linear=true",
        "compression.sparsity=0", f"scaling.num_workers={a['workers']}", f"run.storage_path={storage}",
        f"run.seed={a['seed']}"])


def _random_teacher(cfg, storage: Path):
    """A teacher artifact with random initial weights (seed 0), saved once under ``storage``."""
    import torch
    from safetensors.torch import save_file

    from raydistill.distill.spec import TeacherArtifact, model_dict
    from raydistill.models import build_model
    from raydistill.tasks.causal_lm import text_data

    td = text_data(cfg, storage)
    model = model_dict(cfg.teacher)
    path = storage / "rehearsal_teacher" / hashlib.sha256(json.dumps([model, td.vocab_size]).encode()).hexdigest()[:12]
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        net = build_model(model, vocab_size=td.vocab_size)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    return TeacherArtifact(path=str(path), accuracy=0.0, config_hash="random-init-" + path.name, model=model)


def rehearsal_variant(variant: str, a: dict, corpus: str) -> dict:
    """One variant in a fresh driver process: prepare (or reuse) the corpus, fit the distillation stage."""
    from raydistill.distill import build_student_trainer
    from raydistill.distill.loop import STEPS_LOG
    from raydistill.distill.session import ray_session
    from raydistill.tasks.causal_lm import text_data

    storage = Path(a["storage"]).resolve()
    cfg = _rehearsal_config(a, corpus, storage, variant)
    with ray_session(num_cpus=a["num_cpus"]):
        t0 = time.perf_counter()
        td = text_data(cfg, storage)
        teacher = _random_teacher(cfg, storage)
        prep_s = time.perf_counter() - t0
        name = f"rehearsal_{variant.replace('+', '_')}_{a['seed']}"
        run_dir = storage / "rehearsal" / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        rss0 = _procmem.rss()
        _procmem.reset_peak()
        trainer = build_student_trainer(cfg, teacher, storage_path=storage / "rehearsal", name=name)
        assert trainer.train_loop_config["spec"].materialize is False  # the workers stream their shards
        t1 = time.perf_counter()
        with _PeakPoller() as poll:
            trainer.fit()
        fit_s = time.perf_counter() - t1
        driver_peak = _procmem.peak()
    epochs = [json.loads(x) for x in (run_dir / "epochs.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (run_dir / STEPS_LOG).read_text().splitlines()]
    last = epochs[-1]
    workers = poll.train_workers()
    trained = steps[-1]  # rank 0's memory after the last step, before the epoch's evaluation
    start, peak = trained.get("start_memory_mib"), trained.get("peak_memory_mib")
    return {"variant": variant, "tokens_per_s": last.get("tokens_per_s"), "fit_s": fit_s, "prepare_s": prep_s,
            "global_step": last.get("global_step"), "epochs": len(epochs), "train_loss": last.get("train_loss"),
            "val_perplexity": last.get("val_perplexity"), "test_perplexity": last.get("perplexity"),
            "step_losses": [m["loss"] for m in steps],
            "worker_peak_rss_mib": [w["peak_rss_mib"] for w in workers],
            "worker_peak_rss_mib_max": max((w["peak_rss_mib"] for w in workers), default=None),
            "workers": workers, "rank0_start_rss_mib": start, "rank0_peak_rss_mib_training": peak,
            "rank0_training_mib": None if start is None or peak is None else peak - start,
            "driver_peak_rss_mib": driver_peak / 2**20, "driver_rss_before_fit_mib": rss0 / 2**20,
            "train_blocks": td.train_blocks, "train_tokens": td.num_tokens, "train_shards": len(td.train_files),
            "vocab_size": td.vocab_size}


def rehearsal(args) -> int:
    from bench_corpus_scale import make_corpus, source_files

    from raydistill.utils import machine_info, results_dir, write_json_atomic

    info = machine_info()
    a = vars(args)
    base = Path(args.storage).resolve() / "bench_corpus_scale"
    corpus = base / f"corpus-{args.corpus_mb}mb"
    meta = make_corpus(corpus, int(args.corpus_mb * 10**6), source_files())
    rows = []
    for v in args.variants.split(","):
        load0 = os.getloadavg()
        r = _procmem.in_fresh_process(rehearsal_variant, v, a, str(corpus))
        r.update(load_average_before=load0, load_average_after=os.getloadavg())
        rows.append(r)
        write_json_atomic(Path(args.out) if args.out else results_dir() / "lm_rehearsal.json",
                          {"args": a, "corpus": meta, "rows": rows, "partial": True, "machine": info,
                           "time": time.time()})  # a run stopped part-way keeps the variants done
        print(f"{v:10s} {r['tokens_per_s'] or 0:8.0f} tok/s  {r['global_step']} steps in {r['fit_s']:.0f} s  "
              f"workers peak {', '.join(f'{x:.0f}' for x in r['worker_peak_rss_mib'])} MiB  driver peak "
              f"{r['driver_peak_rss_mib']:.0f} MiB  rank 0 training {r['rank0_training_mib'] or 0:.0f} MiB above "
              f"{r['rank0_start_rss_mib'] or 0:.0f}  val ppl {r['val_perplexity']:.2f}  test ppl "
              f"{r['test_perplexity']:.2f}  load {load0[0]:.1f}", flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {}
    for x, y, key in (("bf16", "fp32", "bf16_vs_fp32"), ("fp32+ckpt", "fp32", "ckpt_vs_none_fp32"),
                      ("bf16+ckpt", "bf16", "ckpt_vs_none_bf16")):
        if x in by and y in by and by[x]["worker_peak_rss_mib_max"] and by[y]["worker_peak_rss_mib_max"]:
            ratios[f"{key}_worker_peak"] = by[x]["worker_peak_rss_mib_max"] / by[y]["worker_peak_rss_mib_max"]
            if by[x]["rank0_training_mib"] and by[y]["rank0_training_mib"]:
                ratios[f"{key}_training_memory"] = by[x]["rank0_training_mib"] / by[y]["rank0_training_mib"]
            ratios[f"{key}_val_perplexity"] = by[x]["val_perplexity"] / by[y]["val_perplexity"] - 1
            ratios[f"{key}_test_perplexity"] = by[x]["test_perplexity"] / by[y]["test_perplexity"] - 1
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    out = Path(args.out) if args.out else results_dir() / "lm_rehearsal.json"
    write_json_atomic(out, {"args": a, "corpus": meta, "rows": rows, "ratios": ratios, "machine": info,
                            "load_average_end": os.getloadavg(), "time": time.time()})
    print(out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--ray", action="store_true", help="the scale rehearsal through the pipeline (Ray Train workers)")
    for k, v in LOCAL.items():  # defaults: LOCAL, or REHEARSAL with --ray
        ap.add_argument(f"--{k}", type=type(v), default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-bytes", type=int, default=2_000_000)
    ap.add_argument("--variants", default="fp32,bf16,fp32+ckpt,bf16+ckpt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus-mb", type=int, default=100, help="--ray: the corpus size")
    ap.add_argument("--workers", type=int, default=2, help="--ray: Ray Train workers")
    ap.add_argument("--num-cpus", type=int, default=None, help="--ray: CPUs of the local Ray instance")
    ap.add_argument("--val-fraction", type=float, default=0.0005, help="--ray: held-out blocks (val + test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                    help="glibc's M_MMAP_THRESHOLD (bytes) for the variants' processes and their Ray workers: a fixed "
                         "threshold returns every freed tensor of that size or more to the system, so a peak RSS is "
                         "the memory training needs; 0: glibc's default (a threshold that grows, and a heap that "
                         "keeps freed pages: peaks then depend on allocation timing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.malloc_mmap_threshold:  # read by glibc when a process starts: the spawned variants and Ray's workers
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    for k, v in (REHEARSAL if args.ray else LOCAL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.ray:
        return rehearsal(args)
    import numpy as np

    from raydistill.config import load_config
    from raydistill.distill.session import ray_session
    from raydistill.tasks.causal_lm import text_data
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    cfg = load_config("lm_default", [f"data.max_bytes={args.max_bytes}", f"data.vocab_size={args.vocab}",
                                     f"data.seq_len={args.seq}",
                                     f"student.kwargs.config={json.dumps(_llama(args.student, args.vocab, args.seq))}",
                                     f"teacher.kwargs.config={json.dumps(_llama(args.teacher, args.vocab, args.seq))}"])
    need = (args.warmup + args.steps) * args.batch
    with ray_session():
        td = text_data(cfg, Path(args.storage).resolve())
        if td.train_blocks < need:
            raise SystemExit(f"{td.train_blocks} train blocks, fewer than the {need} the steps need: raise --max-bytes")
        tmp = Path(args.storage).resolve() / "bench_lm_scale"
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "train.npy", td.head(need).astype(np.int64))  # the head of the shards: a seeded random sample
        np.save(tmp / "val.npy", td.val.astype(np.int64))
    data = {"train": str(tmp / "train.npy"), "val": str(tmp / "val.npy"), "vocab_size": td.vocab_size,
            "pad_id": td.pad_id, "eos_id": td.eos_id}
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
    write_json_atomic(out, {"args": a, "train_blocks": td.train_blocks, "rows": rows, "ratios": ratios,
                            "machine": info, "load_average_end": os.getloadavg(), "time": time.time()})
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
