"""``raydistill bench kd-loss``: the fused distillation loss vs eager PyTorch vs torch.compile (vs Liger).

The loss benchmarked everywhere is the usual KD mix at T=2, alpha=0.5::

    alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) (batchmean) + (1 - alpha) * CE(student, labels)

* ``fused``   -- ``raydistill.ops.kd_loss`` (the compiled op; its forward also computes d loss / d student
  when the student requires grad, backward only scales it)
* ``eager``   -- ``log_softmax`` + ``kl_div(log_target=True)`` + ``cross_entropy`` in plain PyTorch
* ``compile`` -- the same eager function under ``torch.compile`` (inductor)
* ``liger``   -- Liger-Kernel's KL-div + cross-entropy losses, when importable on a CUDA device

Timings: median of ``--reps`` runs after ``--warmup`` runs. ``fwd`` is an inference forward (no grad);
``fwd+bwd`` is a training step of the loss (student requires grad; includes the backward).

Peak memory (``extra peak``): bytes allocated on top of what existed before the fwd+bwd call, the
kept ``student.grad`` included. CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. CPU: the process's peak resident set (``VmHWM`` from
``/proc/self/status``), reset before the call by writing ``5`` to ``/proc/self/clear_refs``, minus the
resident set before it. Large tensors are mmap-backed (glibc) and returned to the OS when freed, so this
is the real peak of the call; small allocator noise (< a few MiB) is included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.utils import machine_info as _machine_info, proc_status_bytes, results_dir

T_DEFAULT = 2.0
ALPHA_DEFAULT = 0.5

# (N, V, dtype) sweeps
CPU_QUICK = [(2048, 32000, "float32")]
CPU_FULL = [(2048, 32000, "float32"), (4096, 32000, "float32"), (2048, 32000, "bfloat16"),
            (1024, 50257, "float32"), (8192, 4096, "float32")]
CUDA_QUICK = [(8192, 128256, "bfloat16"), (4096, 32000, "float32")]
CUDA_FULL = [(8192, 128256, "bfloat16"), (4096, 32000, "float32"), (4096, 128256, "float32"),
             (16384, 32000, "bfloat16"), (8192, 50257, "bfloat16")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_kd(student, teacher, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
    """The plain-PyTorch way (what most KD training scripts do)."""
    s = student.float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature * temperature
    return alpha * kl + (1 - alpha) * F.cross_entropy(s, labels)


def fused_kd(student, teacher, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
    from raydistill.ops import kd_loss

    return kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha)


def _liger_fn():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception:  # noqa: BLE001 - optional
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss()

    def liger_kd(student, teacher, labels, temperature=T_DEFAULT, alpha=ALPHA_DEFAULT):
        log_ps = F.log_softmax(student.float() / temperature, dim=-1)
        log_pt = F.log_softmax(teacher.float() / temperature, dim=-1)
        return alpha * kl(log_ps, log_pt) * temperature * temperature + (1 - alpha) * ce(student, labels)

    return liger_kd


# ------------------------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _time(fn, device, warmup, reps) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":  # CUDA events around each call (host launch gaps inside a call count)
        from raydistill.utils import cuda_median_ms

        return cuda_median_ms(fn, reps=reps, warmup=0)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _peak_extra(step, device) -> int | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _reset_peak_rss():
        return None
    base = proc_status_bytes("VmRSS")
    step()
    peak = proc_status_bytes("VmHWM")
    return None if base is None or peak is None else max(0, peak - base)


def bench_case(name, fn, N, V, dtype, device, warmup, reps, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    student0 = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    teacher = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    student = student0.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return fn(student, teacher, labels)

    def fwd_bwd():
        student.grad = None
        loss = fn(student, teacher, labels)
        loss.backward()
        return loss

    value = float(fwd_bwd().detach())  # also compiles (torch.compile) before timing
    fwd_ms = _time(fwd, device, warmup, reps)
    fb_ms = _time(fwd_bwd, device, max(0, warmup - 1), reps)  # the first fwd_bwd above was a warmup
    student.grad = None
    peak = _peak_extra(fwd_bwd, device)
    student.grad = None
    res = {"impl": name, "N": N, "V": V, "dtype": str(dtype).replace("torch.", ""), "loss": value,
           "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "extra_peak_bytes": peak,
           "extra_peak_over_nv_fp32": None if peak is None else peak / (N * V * 4)}
    if device.type == "cuda":
        # minimum traffic of a fused loss: read student + teacher once, write the gradient once (fwd+bwd);
        # read both once (forward only). The floor is that over the copy bandwidth measured in this run.
        esz = student.element_size()
        min_bytes = N * V * (esz + teacher.element_size() + esz)
        min_fwd = N * V * (esz + teacher.element_size())
        res["min_bytes_moved"] = min_bytes
        res["fwd_bwd_eff_GBps"] = min_bytes / (fb_ms * 1e-3) / 1e9
        res["fwd_eff_GBps"] = min_fwd / (fwd_ms * 1e-3) / 1e9
        if COPY_BW.get(device.index or 0):
            bw = COPY_BW[device.index or 0]
            res["fwd_bwd_floor_ms"] = min_bytes / bw * 1e3
            res["fwd_floor_ms"] = min_fwd / bw * 1e3
            res["fwd_bwd_frac_of_floor"] = res["fwd_bwd_floor_ms"] / fb_ms
            res["fwd_frac_of_floor"] = res["fwd_floor_ms"] / fwd_ms
    del student, student0, teacher
    gc.collect()
    return res


COPY_BW: dict[int, float] = {}


def measure_copy_bandwidth(device, nbytes: int = 2**31, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of reps."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    bw = 2 * nbytes / statistics.median(times)
    COPY_BW[device.index or 0] = bw
    return bw


# ------------------------------------------------------------------------------------------- reporting

def machine_info(device) -> dict:
    """``raydistill.utils.machine_info`` plus whether the kd_loss sources differ from the commit."""
    info = _machine_info(str(device))
    try:
        root = Path(__file__).resolve().parents[2]
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc/kd_loss",
                                "raydistill/ops/_kd_loss.py", "raydistill/bench/kd_loss.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_dirty_kd_loss_files"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt_mib(b):
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def print_table(results, device):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kd_loss on {device} (T={T_DEFAULT}, alpha={ALPHA_DEFAULT}; median ms)")
    for col in ("N x V", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fused speedup (f+b)", "extra peak MiB",
                "peak / NxV fp32"):
        t.add_column(col, justify="right" if col not in ("impl", "dtype") else "left")
    if device.type == "cuda":
        t.add_column("eff GB/s", justify="right")
        t.add_column("floor ms (f+b)", justify="right")
        t.add_column("% of floor (f+b / fwd)", justify="right")
    by_case = {}
    for r in results:
        by_case.setdefault((r["N"], r["V"], r["dtype"]), []).append(r)
    for (N, V, dt), rs in by_case.items():
        fused = next((r for r in rs if r["impl"] == "fused"), None)
        for r in rs:
            sp = "" if fused is None or r is fused else f"{r['fwd_bwd_ms'] / fused['fwd_bwd_ms']:.2f}x"
            ratio = r["extra_peak_over_nv_fp32"]
            row = [f"{N} x {V}", dt, r["impl"], f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}", sp,
                   _fmt_mib(r["extra_peak_bytes"]), "n/a" if ratio is None else f"{ratio:.2f}"]
            if device.type == "cuda":
                row.append(f"{r.get('fwd_bwd_eff_GBps', 0):.0f}")
                row.append(f"{r.get('fwd_bwd_floor_ms', float('nan')):.2f}")
                row.append(f"{100 * r.get('fwd_bwd_frac_of_floor', float('nan')):.0f}% / "
                           f"{100 * r.get('fwd_frac_of_floor', float('nan')):.0f}%")
            t.add_row(*row)
        t.add_section()
    Console().print(t)


def check_targets(results) -> list[dict]:
    """The issue's CPU targets (fp32, V=32000, N=2048..4096)."""
    out = []
    by = {(r["N"], r["V"], r["dtype"], r["impl"]): r for r in results}
    for (N, V, dt, impl), r in by.items():
        if impl != "fused" or dt != "float32" or V != 32000 or not 2048 <= N <= 4096:
            continue
        eager, comp = by.get((N, V, dt, "eager")), by.get((N, V, dt, "compile"))
        if eager:
            out.append({"case": f"{N}x{V} fp32", "target": "fused fwd+bwd >= 4x faster than eager",
                        "value": eager["fwd_bwd_ms"] / r["fwd_bwd_ms"], "pass": eager["fwd_bwd_ms"] >= 4 * r["fwd_bwd_ms"]})
        if comp:
            out.append({"case": f"{N}x{V} fp32", "target": "fused fwd+bwd >= 1.5x faster than torch.compile",
                        "value": comp["fwd_bwd_ms"] / r["fwd_bwd_ms"],
                        "pass": comp["fwd_bwd_ms"] >= 1.5 * r["fwd_bwd_ms"]})
        if r["extra_peak_over_nv_fp32"] is not None:
            out.append({"case": f"{N}x{V} fp32", "target": "fused extra peak <= 1.25 x (N x V fp32)",
                        "value": r["extra_peak_over_nv_fp32"], "pass": r["extra_peak_over_nv_fp32"] <= 1.25})
    return out


def check_targets_cuda(results) -> list[dict]:
    """Issue 13's GPU targets (H100/H200): 8192 x 128256 bf16 fwd+bwd <= 2.2 ms, >= 67% of the floor and
    >= 3x torch.compile; 4096 x 32000 fp32 >= 2x torch.compile; forward >= 80% of its floor."""
    out = []
    by = {(r["N"], r["V"], r["dtype"], r["impl"]): r for r in results}
    for (N, V, dt, impl), r in by.items():
        if impl != "fused":
            continue
        comp = by.get((N, V, dt, "compile"))
        case = f"{N}x{V} {dt}"
        if (N, V, dt) == (8192, 128256, "bfloat16"):
            out.append({"case": case, "target": "fwd+bwd <= 2.2 ms", "value": r["fwd_bwd_ms"],
                        "pass": r["fwd_bwd_ms"] <= 2.2})
            if "fwd_bwd_frac_of_floor" in r:
                out.append({"case": case, "target": "fwd+bwd >= 67% of the copy-bandwidth floor",
                            "value": r["fwd_bwd_frac_of_floor"], "pass": r["fwd_bwd_frac_of_floor"] >= 0.67})
            if comp:
                out.append({"case": case, "target": "fwd+bwd >= 3x torch.compile",
                            "value": comp["fwd_bwd_ms"] / r["fwd_bwd_ms"],
                            "pass": comp["fwd_bwd_ms"] >= 3 * r["fwd_bwd_ms"]})
        if (N, V, dt) == (4096, 32000, "float32") and comp:
            out.append({"case": case, "target": "fwd+bwd >= 2x torch.compile",
                        "value": comp["fwd_bwd_ms"] / r["fwd_bwd_ms"], "pass": comp["fwd_bwd_ms"] >= 2 * r["fwd_bwd_ms"]})
        if "fwd_frac_of_floor" in r:
            out.append({"case": case, "target": "fwd (no grad) >= 80% of its floor",
                        "value": r["fwd_frac_of_floor"], "pass": r["fwd_frac_of_floor"] >= 0.8})
    return out


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raydistill bench kd-loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one case, fewer repetitions (< 1 min on CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median); default 5 (quick: 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--impls", default="fused,eager,compile,liger",
                   help="comma-separated subset of fused,eager,compile,liger")
    p.add_argument("--case", action="append", default=None, metavar="NxV:dtype",
                   help="override the sweep, e.g. --case 2048x32000:float32 (repeatable)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kd_loss_<device>[_quick].json)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("raydistill bench kd-loss: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    reps = a.reps or (3 if a.quick else 5)
    if a.case:
        cases = []
        for c in a.case:
            nv, _, dt = c.partition(":")
            n, v = nv.lower().split("x")
            cases.append((int(n), int(v), dt or "float32"))
    elif device.type == "cuda":
        cases = CUDA_QUICK if a.quick else CUDA_FULL
    else:
        cases = CPU_QUICK if a.quick else CPU_FULL

    from raydistill._build import load_extension, op_backend

    st = load_extension()
    backend = op_backend("kd_loss_fwd", device.type)
    if backend != "compiled":
        print(f"warning: kd_loss runs its PyTorch reference on {device.type} ({st.reason or 'no kernel'}); "
              "'fused' numbers are not the fused op", file=sys.stderr)

    impls = {"fused": fused_kd, "eager": eager_kd}
    wanted = set(a.impls.split(","))
    if "compile" in wanted:
        impls["compile"] = torch.compile(eager_kd)
    if "liger" in wanted and device.type == "cuda":
        lf = _liger_fn()
        if lf is not None:
            impls["liger"] = lf
    impls = {k: v for k, v in impls.items() if k in wanted}

    results = []
    t_start = time.perf_counter()
    machine = machine_info(device)
    if device.type == "cuda":
        bw = measure_copy_bandwidth(device)
        machine["copy_bandwidth_GBps"] = bw / 1e9
        print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write), the ceiling for the floors below")
    out = Path(a.out) if a.out else (results_dir() /
                                     f"kd_loss_{device.type}{'_quick' if a.quick else ''}.json")

    def write_json(complete: bool) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        machine["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        payload = {
            "benchmark": "kd_loss", "quick": a.quick, "complete": complete, "temperature": T_DEFAULT,
            "alpha": ALPHA_DEFAULT, "reps": reps, "warmup": a.warmup, "kd_loss_backend": backend,
            "machine": machine,
            "memory_method": ("cuda: torch.cuda.max_memory_allocated - memory_allocated before the fwd+bwd call"
                              if device.type == "cuda" else
                              "cpu: peak RSS (VmHWM, reset via /proc/self/clear_refs=5) minus RSS before the "
                              "fwd+bwd call; includes the kept student.grad"),
            "timing_method": "median of reps after warmup; fwd = no-grad forward, fwd_bwd = loss + backward",
            "results": results,
            "targets": check_targets(results) if device.type == "cpu" else check_targets_cuda(results),
            "elapsed_s": time.perf_counter() - t_start,
        }
        out.write_text(json.dumps(payload, indent=2))
        return out

    for N, V, dt in cases:
        dtype = DTYPES[dt]
        case_res = []
        for name, fn in impls.items():
            if name == "compile":
                torch._dynamo.reset()
            r = bench_case(name, fn, N, V, dtype, device, a.warmup, reps)
            case_res.append(r)
            print(f"  {N}x{V} {dt} {name}: fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwd_bwd_ms']:.1f} ms, "
                  f"extra peak {_fmt_mib(r['extra_peak_bytes'])} MiB", flush=True)
        ref = next((r for r in case_res if r["impl"] == "eager"), None)
        fused = next((r for r in case_res if r["impl"] == "fused"), None)
        if ref and fused:
            rel = abs(fused["loss"] - ref["loss"]) / max(1e-12, abs(ref["loss"]))
            fused["rel_diff_vs_eager"] = rel
            if rel > 1e-2:
                print(f"warning: fused loss {fused['loss']} differs from eager {ref['loss']} (rel {rel:.2e})",
                      file=sys.stderr)
        results += case_res
        write_json(False)  # partial results survive an interrupted sweep

    print_table(results, device)
    targets = check_targets(results) if device.type == "cpu" else check_targets_cuda(results)
    for tg in targets:
        print(f"[{'PASS' if tg['pass'] else 'FAIL'}] {tg['case']}: {tg['target']} (measured {tg['value']:.2f})")
    out = write_json(True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
