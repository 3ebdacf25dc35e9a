"""SparseLinear's CPU kernels run on torch's intra-op OpenMP team (the one MKL uses) and honour
torch.set_num_threads (issue 9: a second pool competed with MKL's spinning threads for the cores).

Each check runs in a fresh interpreter: thread pools are per process and set up on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import torch.nn.functional as F
    from raydistill._build import load_extension
    from raydistill.ops.sparse import SparseLinear, sparse_linear_dense_reference

    nt = int(sys.argv[1])
    torch.set_num_threads(nt)
    assert load_extension().loaded
    main_tid = __import__("threading").get_native_id()

    def ticks():  # per-thread user+system CPU ticks
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                out[int(tid)] = int(f[11]) + int(f[12])
            except OSError:
                pass
        return out

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(1024, 768)
    sl = SparseLinear.from_dense(lin, torch.rand(768, 1024, generator=g) < 0.5)
    q = sl.quantize(bits=8)
    x = torch.randn(16, 1024, generator=g)
    w = torch.randn(1024, 1024)
    F.linear(torch.randn(64, 1024), w)  # MKL: starts torch's OpenMP team (with nt > 1)
    torch.randn(1 << 22).exp_()         # at::parallel_for on the same team
    time.sleep(0.2)                     # let the team stop spinning
    t0 = ticks()
    res = {"ok": True}
    with torch.no_grad():
        for _ in range(40):             # our kernels only: other threads work only if they use them
            for m in (sl, q):
                y = m(x)
        tk = ticks()
        for _ in range(20):
            for m in (sl, q):
                y = m(x)
            F.linear(x, w)              # MKL in between, as in a real model
    t1 = ticks()
    ref = sparse_linear_dense_reference(x, sl.crow_indices, sl.col_indices, sl.values.detach(), sl.bias.detach(), 1024)
    res["ok"] = bool(((sl(x).double() - ref).abs().max() / ref.abs().max()) < 2e-5)
    res["new_threads"] = sorted(set(t1) - set(t0))
    res["other_ticks"] = sum(tk[t] - t0.get(t, 0) for t in tk if t != main_tid)
    res["other_ticks_all"] = sum(t1[t] - t0.get(t, 0) for t in t1 if t != main_tid)
    print(json.dumps(res))
""")


def _run(nt: int, pool: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("RAYDISTILL_SPMM_SERIAL", None)
    if pool:
        env["RAYDISTILL_SPMM_POOL"] = pool
    else:
        env.pop("RAYDISTILL_SPMM_POOL", None)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(nt)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_runs_on_the_openmp_team_that_mkl_uses(ext):
    if not ext.loaded:
        pytest.skip("extension disabled on purpose")
    r = _run(2)
    assert r["ok"]
    # no second pool: every thread that ran our parts already existed (MKL/at::parallel_for's team) ...
    assert r["new_threads"] == [], f"the kernels started threads of their own: {r}"
    # ... and a second thread ran our kernels' parts (torch.get_num_threads() == 2 is honoured)
    assert r["other_ticks"] > 0, r
    # the old design (helpers on torch's inter-op pool) starts a pool next to MKL's: this test tells them apart
    r = _run(2, pool="interop")
    assert r["ok"] and r["new_threads"], r


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_one_thread_is_honoured(ext):
    if not ext.loaded:
        pytest.skip("extension disabled on purpose")
    r = _run(1)
    assert r["ok"] and r["new_threads"] == [], r
    assert r["other_ticks_all"] <= 2, f"work ran off the calling thread with torch.set_num_threads(1): {r}"
