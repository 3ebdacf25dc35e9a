"""``raydistill bench kd-loss-linear``: lm_head matmul + distillation loss, fused vs materialised logits.

One training step of the LM distillation loss from the last hidden states: student logits
``h_s @ W_s^T``, teacher logits ``h_t @ W_t^T`` (a constant), T=2, alpha=0.5::

    alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) (mean over tokens) + (1 - alpha) * CE(student, labels)

forward and backward (gradients w.r.t. ``h_s`` and ``W_s``). Implementations:

* ``fused``   -- ``raydistill.ops.kd_loss_linear`` (row chunks: matmuls + the fused kd_loss kernel, gradient
  computed in the forward; no tokens x V tensor)
* ``eager``   -- both logits materialised, then ``log_softmax`` + ``kl_div`` + ``cross_entropy`` (plain PyTorch)
* ``compile`` -- the same eager function under ``torch.compile`` (inductor)
* ``liger``   -- Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (beta=0: forward KL), CUDA only, when
  importable (its soft loss is not T^2-scaled, so its loss value differs; the work is the same)
* ``matmuls`` -- only the four matmuls (student and teacher forward, d hidden, d weight) on materialised
  tensors: the time floor of any implementation, not a loss

Timings: median of ``--reps`` fwd+bwd steps after ``--warmup`` steps, implementations interleaved
round-robin (a slow period of a shared machine hits all of them). Extra peak memory is counted as in
``raydistill bench kd-loss``: CUDA ``torch.cuda.max_memory_allocated`` minus the allocated bytes before the
step; CPU the peak resident set (VmHWM after resetting it through /proc/self/clear_refs) minus the resident
set before the step; both include the kept ``.grad`` of the hidden states and the weight.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from raydistill.bench.kd_loss import _fmt_mib, _peak_extra, _sync, eager_kd, machine_info

T_DEFAULT = 2.0
ALPHA_DEFAULT = 0.5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_CASE = (4096, 512, 32000, "float32")
CUDA_CASE = (8192, 4096, 128256, "bfloat16")
# the targets
CPU_PEAK_VS_EAGER, CPU_TIME_VS_EAGER = 0.20, 0.80
CUDA_TIME_MS = 53.0


def eager_linear(sh, sw, th, tw, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
    """The plain-PyTorch way: both logits materialised, then the usual KD loss."""
    student = sh @ sw.t()
    with torch.no_grad():
        teacher = th @ tw.t()
    return eager_kd(student, teacher, labels, temperature, alpha)


def make_fused(chunk_size):
    def fused_linear(sh, sw, th, tw, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
        from raydistill.ops import kd_loss_linear

        return kd_loss_linear(sh, sw, th, tw, labels, temperature=temperature, alpha=alpha, chunk_size=chunk_size)

    return fused_linear


def matmuls_only(sh, sw, th, tw, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
    """The four matmuls of any fwd+bwd, on materialised tensors (returns a dummy scalar)."""
    with torch.no_grad():
        s = sh @ sw.t()
        t = th @ tw.t()
        gh = s @ sw
        gw = s.t() @ sh
    del t
    return gh[0, 0] + gw[0, 0]


def _liger_fn():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception:  # noqa: BLE001 - optional
        return None
    want = {"weight_hard_loss": 1 - ALPHA_DEFAULT, "weight_soft_loss": ALPHA_DEFAULT, "beta": 0.0,
            "temperature": T_DEFAULT, "compiled": True, "chunk_size": 1024}
    params = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    loss_mod = LigerFusedLinearJSDLoss(**{k: v for k, v in want.items() if k in params})

    def liger_linear(sh, sw, th, tw, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
        return loss_mod(sh, sw, th, tw, labels)

    return liger_linear


def _inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # weights scaled so the logits are O(3): a non-trivial softmax, like a trained lm_head
    sh = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    sw = (torch.randn(V, H, generator=g) * (3 / H ** 0.5)).to(device=device, dtype=dtype).requires_grad_(True)
    th = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    tw = (torch.randn(V, H, generator=g) * (3 / H ** 0.5)).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return sh, sw, th, tw, labels


def run_case(impls, N, H, V, dtype, device, warmup, reps) -> list[dict]:
    sh, sw, th, tw, labels = _inputs(N, H, V, dtype, device)

    def step(fn):
        sh.grad = sw.grad = None
        loss = fn(sh, sw, th, tw, labels)
        if loss.requires_grad:
            loss.backward()
        return loss

    values = {}
    for name, fn in list(impls.items()):  # first call: warm-up and, for compile, compilation
        try:
            values[name] = float(step(fn).detach())
        except Exception as e:  # noqa: BLE001 - an optional third-party row must not sink the run
            if name != "liger":
                raise
            print(f"note: dropping {name}: {type(e).__name__}: {e}", file=sys.stderr)
            impls = {k: v for k, v in impls.items() if k != name}
            continue
        for _ in range(warmup - 1):
            step(fn)
    times = {name: [] for name in impls}
    for _ in range(reps):  # round-robin
        for name, fn in impls.items():
            _sync(device)
            t0 = time.perf_counter()
            step(fn)
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = []
    for name, fn in impls.items():
        sh.grad = sw.grad = None
        peak = _peak_extra(lambda: step(fn), device)
        sh.grad = sw.grad = None
        gc.collect()
        out.append({"impl": name, "tokens": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""),
                    "loss": values[name], "fwd_bwd_ms": statistics.median(times[name]),
                    "fwd_bwd_ms_all": times[name], "extra_peak_bytes": peak,
                    "logits_fp32_bytes": N * V * 4})
        print(f"  {N}x{H}x{V} {out[-1]['dtype']} {name}: fwd+bwd {out[-1]['fwd_bwd_ms']:.1f} ms, "
              f"extra peak {_fmt_mib(peak)} MiB", flush=True)
    flops = 4 * 2 * N * H * V
    by = {r["impl"]: r for r in out}
    for r in out:
        r["matmul_tflop"] = flops / 1e12
        r["achieved_tflops"] = flops / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        for ref in ("eager", "compile"):
            if ref in by:
                r[f"time_vs_{ref}"] = r["fwd_bwd_ms"] / by[ref]["fwd_bwd_ms"]
                pe, pr = r["extra_peak_bytes"], by[ref]["extra_peak_bytes"]
                r[f"peak_vs_{ref}"] = None if pe is None or not pr else pe / pr
        if "eager" in by and r["impl"] in ("fused", "compile"):
            r["rel_diff_vs_eager"] = abs(r["loss"] - by["eager"]["loss"]) / max(1e-12, abs(by["eager"]["loss"]))
    return out


def check_targets(results, device) -> list[dict]:
    by = {r["impl"]: r for r in results}
    f = by.get("fused")
    out = []
    if f is None:
        return out
    case = f"{f['tokens']}x{f['H']}x{f['V']} {f['dtype']}"
    if device.type == "cpu":
        if "eager" in by and f.get("peak_vs_eager") is not None:
            out.append({"case": case, "target": f"fused extra peak <= {CPU_PEAK_VS_EAGER:.0%} of eager",
                        "value": f["peak_vs_eager"], "pass": f["peak_vs_eager"] <= CPU_PEAK_VS_EAGER})
        if "eager" in by:
            out.append({"case": case, "target": f"fused time <= {CPU_TIME_VS_EAGER}x eager",
                        "value": f["time_vs_eager"], "pass": f["time_vs_eager"] <= CPU_TIME_VS_EAGER})
        if "compile" in by:
            out.append({"case": case, "target": "fused time <= torch.compile of eager",
                        "value": f["time_vs_compile"], "pass": f["time_vs_compile"] <= 1.0})
    else:
        out.append({"case": case, "target": f"fused fwd+bwd <= {CUDA_TIME_MS} ms", "value": f["fwd_bwd_ms"],
                    "pass": f["fwd_bwd_ms"] <= CUDA_TIME_MS})
        lg = by.get("liger")
        if lg is not None and lg["extra_peak_bytes"] and f["extra_peak_bytes"] is not None:
            ratio = f["extra_peak_bytes"] / lg["extra_peak_bytes"]
            out.append({"case": case, "target": "fused extra peak <= Liger's", "value": ratio, "pass": ratio <= 1.0})
    return out


def print_table(results, device):
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    t = Table(title=f"kd_loss_linear on {device}: tokens={r0['tokens']} H={r0['H']} V={r0['V']} {r0['dtype']}, "
                    f"T={T_DEFAULT}, alpha={ALPHA_DEFAULT}; fwd+bwd, median")
    cols = ["impl", "fwd+bwd ms", "vs eager", "vs compile", "extra peak MiB", "peak vs eager", "matmul TFLOP/s"]
    for c in cols:
        t.add_column(c, justify="left" if c == "impl" else "right")
    for r in results:
        def ratio(key):
            v = r.get(key)
            return "-" if v is None else f"{v:.2f}x"
        t.add_row(r["impl"], f"{r['fwd_bwd_ms']:.1f}", ratio("time_vs_eager"), ratio("time_vs_compile"),
                  _fmt_mib(r["extra_peak_bytes"]), ratio("peak_vs_eager"), f"{r['achieved_tflops']:.3f}")
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydistill bench kd-loss-linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=3, help="timed fwd+bwd steps per implementation (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impls", default="fused,eager,compile,liger,matmuls",
                   help="comma-separated subset of fused,eager,compile,liger,matmuls")
    p.add_argument("--case", default=None, metavar="TOKENSxHxV:dtype",
                   help="default 4096x512x32000:float32 on cpu, 8192x4096x128256:bfloat16 on cuda")
    p.add_argument("--chunk-size", default=None,
                   help="fused chunk_size (default: automatic); a comma-separated list times one fused row per "
                        "size, round-robin with the others (rows 'fused@<size>', the first one also 'fused')")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kd_loss_linear_<device>.json)")
    a = p.parse_args(argv)
    try:
        chunks = [int(c) for c in a.chunk_size.split(",") if c] if a.chunk_size else [None]
    except ValueError:
        chunks = []
    if not chunks or any(c is not None and c < 1 for c in chunks):
        print(f"--chunk-size must be positive integers separated by commas, got {a.chunk_size!r}", file=sys.stderr)
        return 2

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("raydistill bench kd-loss-linear: --device cuda but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    if a.case:
        nhv, _, dt = a.case.partition(":")
        N, H, V = (int(x) for x in nhv.lower().split("x"))
        dt = dt or "float32"
    else:
        N, H, V, dt = CPU_CASE if device.type == "cpu" else CUDA_CASE
    dtype = DTYPES[dt]

    from raydistill._build import load_extension, op_backend

    st = load_extension()
    backend = op_backend("kd_loss_fwd", device.type)
    if backend != "compiled":
        print(f"warning: kd_loss has no compiled {device.type} kernel ({st.reason or 'no kernel'}); 'fused' "
              "materialises the logits", file=sys.stderr)

    wanted = [x for x in a.impls.split(",") if x]
    impls = {}
    for name in wanted:
        if name == "fused":
            impls[name] = make_fused(chunks[0])
            for c in chunks[1:]:
                impls[f"fused@{c}"] = make_fused(c)
        elif name == "eager":
            impls[name] = eager_linear
        elif name == "compile":
            impls[name] = torch.compile(eager_linear)
        elif name == "matmuls":
            impls[name] = matmuls_only
        elif name == "liger":
            fn = _liger_fn() if device.type == "cuda" else None
            if fn is not None:
                impls[name] = fn
            elif device.type == "cuda":
                print("note: liger_kernel not importable; skipping the liger row", file=sys.stderr)
        else:
            print(f"unknown impl {name!r}", file=sys.stderr)
            return 2

    machine = machine_info(device)
    t_start = time.perf_counter()
    from raydistill.ops._kd_loss_linear import auto_chunk_size

    chunk = chunks[0] or auto_chunk_size(N, V, device.type, torch.empty(0, dtype=dtype).element_size(),
                                            torch.empty(0, dtype=dtype).element_size())
    print(f"kd_loss_linear bench: {N}x{H}x{V} {dt} on {device}, chunk_size {chunk}, impls {list(impls)}",
          flush=True)
    results = run_case(impls, N, H, V, dtype, device, a.warmup, a.reps)
    print_table(results, device)
    targets = check_targets(results, device)
    for tg in targets:
        print(f"[{'PASS' if tg['pass'] else 'FAIL'}] {tg['case']}: {tg['target']} (measured {tg['value']:.3f})")
    out = Path(a.out) if a.out else (Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                                     f"kd_loss_linear_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "kd_loss_linear", "temperature": T_DEFAULT, "alpha": ALPHA_DEFAULT, "reps": a.reps,
        "warmup": a.warmup, "chunk_size": chunk, "chunk_size_auto": chunks[0] is None,
        "other_chunk_sizes": chunks[1:],
        "kd_loss_backend": backend, "machine": machine,
        "memory_method": ("cuda: torch.cuda.max_memory_allocated - memory_allocated before the fwd+bwd step"
                          if device.type == "cuda" else
                          "cpu: peak RSS (VmHWM, reset via /proc/self/clear_refs=5) minus RSS before the fwd+bwd "
                          "step"),
        "timing_method": "median of reps fwd+bwd steps, implementations interleaved round-robin; grads of hidden "
                         "and weight kept",
        "results": results, "targets": targets, "elapsed_s": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
