"""What the per-call pattern checks of the sparse CPU ops cost: single-call time of SparseLinear /
SparseLinearInt8 forward, this checkout against another one (e.g. the commit before the checks), side by side.

The two builds cannot live in one process (same op names), so each round runs one worker process per
checkout, alternating A B A B ..., and each worker times single calls in turn (as a model calls a layer:
``--calls`` calls after a warm-up, median). The table gives, per layer, the median over rounds of each
checkout's per-round median and their ratio. JSON to benchmarks/results/ (machine, load average, both commits).

    python benchmarks/bench_spmm_checks.py --base ../main --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# (name, out, in, sparsity, batch, kind): the cases where an O(rows) check weighs most are small calls
CASES = [
    ("fp32 4096x4096 s0.99 b1", 4096, 4096, 0.99, 1, "fp32"),
    ("fp32 4096x4096 s0.90 b1", 4096, 4096, 0.90, 1, "fp32"),
    ("fp32 4096x4096 s0.90 b16", 4096, 4096, 0.90, 16, "fp32"),
    ("fp32 1024x1024 s0.90 b1", 1024, 1024, 0.90, 1, "fp32"),
    ("int8 4096x4096 s0.90 b16", 4096, 4096, 0.90, 16, "int8"),
    ("int8 4096x4096 s0.99 b1", 4096, 4096, 0.99, 1, "int8"),
]


def worker(calls: int, threads: int) -> dict:
    import torch

    from raydistill._build import load_extension, op_backend
    from raydistill.ops.sparse import SparseLinear

    torch.set_num_threads(threads)
    load_extension()
    assert op_backend("spmm", "cpu") == "compiled", "the extension did not load"
    out = {}
    for name, o, i, s, b, kind in CASES:
        g = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(i, o)
        layer = SparseLinear.from_dense(lin, torch.rand(o, i, generator=g) >= s)
        if kind == "int8":
            layer = layer.quantize(bits=8)
        x = torch.randn(b, i, generator=g)
        times = []
        with torch.no_grad():
            for _ in range(20):
                layer(x)
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                layer(x)
                times.append(time.perf_counter_ns() - t0)
        out[name] = statistics.median(times) / 1e3  # microseconds
    return out


def _commit(path: Path) -> str | None:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=False, help="the other checkout (its raydistill and its extension build)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.calls, a.threads)))
        return 0
    if not a.base:
        p.error("--base is required")
    checkouts = {"base": Path(a.base).resolve(), "this": HERE}
    load_before = os.getloadavg()
    per: dict[str, dict[str, list[float]]] = {k: {} for k in checkouts}
    for r in range(a.rounds):
        for label, root in checkouts.items():
            env = dict(os.environ, PYTHONPATH=str(root))
            res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--calls", str(a.calls),
                                  "--threads", str(a.threads)], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=1800)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            for name, us in json.loads(res.stdout.strip().splitlines()[-1]).items():
                per[label].setdefault(name, []).append(us)
        print(f"round {r + 1}/{a.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    rows = []
    print(f"{'layer (single call, us)':28s} {'base':>10s} {'this':>10s} {'this/base':>10s}")
    for name, *_ in CASES:
        b, t = statistics.median(per["base"][name]), statistics.median(per["this"][name])
        rows.append({"case": name, "base_us": b, "this_us": t, "ratio": t / b,
                     "base_rounds_us": per["base"][name], "this_rounds_us": per["this"][name]})
        print(f"{name:28s} {b:10.1f} {t:10.1f} {t / b:10.3f}")
    sys.path.insert(0, str(HERE))
    from raydistill.utils import machine_info, results_dir, write_json_atomic

    doc = {"benchmark": "spmm per-call checks, single calls in turn", "rounds": a.rounds, "calls": a.calls,
           "threads": a.threads, "base_commit": _commit(checkouts["base"]), "this_commit": _commit(HERE),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine_info("cpu"),
           "rows": rows}
    out = Path(a.out) if a.out else results_dir() / "spmm_checks_cpu.json"
    write_json_atomic(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
