"""Crafted or corrupted sparse patterns never crash the process: files written by save_sparse /
save_compressed with one tensor changed are refused at load time (ValueError naming the file, the layer and
the rule), and the ops themselves refuse a malformed pattern with a ValueError instead of reading outside it.

Each scenario runs in a subprocess (a read outside a buffer would kill pytest itself): the subprocess must
exit normally (rc 0) having caught a ValueError for every case."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The cases run one after another in one subprocess (imports once); each prints one JSON line as it ends,
# so a crash (rc -11) shows which case it was.
_PRELUDE = r"""
import json, sys, torch
from torch import nn
from safetensors.torch import load_file, save_file
from safetensors import safe_open
torch.manual_seed(0)

def report(case, fn):
    try:
        fn()
        out = {"case": case, "caught": None, "msg": ""}
    except Exception as exc:  # what was raised, checked by the test
        out = {"case": case, "caught": type(exc).__name__, "msg": str(exc)}
    print(json.dumps(out), flush=True)

def net():
    return nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 5))

def crafted(src, dst, edit):
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
    t = load_file(src)
    edit(t)
    save_file({k: v.contiguous() for k, v in t.items()}, dst, metadata=meta)
    return dst
"""

_FILES = _PRELUDE + r"""
from raydistill.compress import compress, save_sparse, load_sparse, save_compressed, load_compressed
from raydistill.ops.sparse import SparseLinear
d = sys.argv[1]
m = net(); compress(m, 0.5, exclude=["2"])
save_sparse(m, f"{d}/s.safetensors")
save_compressed(m, f"{d}/c.safetensors")
x = torch.randn(6, 20)

def crow_huge(t, k="0.crow_indices"): t[k][1] = 2**30
def crow_decreasing(t): c = t["0.crow_indices"]; c[3], c[4] = c[4].clone() + 2, c[3].clone()
def col_out_of_range(t): t["0.col_indices"][3] = 20 + 7
def col_negative(t): t["0.col_indices"][0] = -3
def crow_float(t): t["0.crow_indices"] = t["0.crow_indices"].float()
def col_int64(t): t["0.col_indices"] = t["0.col_indices"].long() + 2**32
def values_int(t): t["0.values"] = t["0.values"].long()
def t_perm_out_of_range(t): t["0.t_perm"][0] = 10**6
def crow_2d(t): t["0.crow_indices"] = t["0.crow_indices"][None]

cases = [("crow_huge", crow_huge), ("crow_decreasing", crow_decreasing), ("col_out_of_range", col_out_of_range),
         ("col_negative", col_negative), ("crow_float", crow_float), ("col_int64", col_int64),
         ("values_int", values_int), ("t_perm_out_of_range", t_perm_out_of_range), ("crow_2d", crow_2d)]
for name, edit in cases:
    p = crafted(f"{d}/s.safetensors", f"{d}/s_{name}.safetensors", edit)
    report("sparse:" + name, lambda: load_sparse(net, p)(x))
for name, edit in cases[:3]:
    p = crafted(f"{d}/c.safetensors", f"{d}/c_{name}.safetensors", edit)
    report("compressed:" + name, lambda: load_compressed(net, p)(x))

# int8 layers: 16-bit CSR indices and the 1-bit-per-weight row bitmap (in_features 20: 4 padding bits)
for index in ("csr", "bitmap"):
    q = net(); q[0] = SparseLinear.from_dense(q[0], torch.rand(24, 20) < 0.5).quantize(bits=8, index=index)
    src = f"{d}/q_{index}.safetensors"
    save_compressed(q, src)
    edits = [("crow_huge", crow_huge)]
    if index == "csr":
        edits += [("col_out_of_range", lambda t: t["0.col_indices"].__setitem__(2, 65535)),
                  ("col_int8", lambda t: t.__setitem__("0.col_indices", t["0.col_indices"].to(torch.int8)))]
    else:
        edits += [("bit_flipped", lambda t: t["0.col_indices"].__setitem__((5, 0), t["0.col_indices"][5, 0] ^ 1)),
                  ("bit_past_in_features", lambda t: t["0.col_indices"].__setitem__((0, 2), 0xFF)),
                  ("bitmap_shape", lambda t: t.__setitem__("0.col_indices", t["0.col_indices"][:, :2].contiguous()))]
    for name, edit in edits:
        p = crafted(src, f"{d}/q_{index}_{name}.safetensors", edit)
        for n in (2, 16):  # the small-batch gather kernels and the tiled ones
            report(f"int8_{index}:{name}:n{n}", lambda: load_compressed(net, p)(torch.randn(n, 20)))
"""

_OPS = _PRELUDE + r"""
from raydistill._build import load_extension
from raydistill.ops.sparse import SparseLinear, sparse_linear, sparse_linear_int8
load_extension()  # torch.ops.raydistill.* (absent with RAYDISTILL_DISABLE_EXT=1)
lin = nn.Linear(20, 24)
sl = SparseLinear.from_dense(lin, torch.rand(24, 20) < 0.5)
crow, col, val = sl.crow_indices, sl.col_indices, sl.values.detach()
def bad_crow():
    c = crow.clone(); c[1] = 2**30; return c
def dec_crow():
    c = crow.clone(); c[3], c[4] = c[4].clone() + 2, c[3].clone(); return c
def bad_col():
    c = col.clone(); c[4] = 1000; return c
for n in (2, 16):
    x = torch.randn(n, 20)
    report(f"spmm:crow_huge:n{n}", lambda: torch.ops.raydistill.spmm(x, bad_crow(), col, val, None, 24))
    report(f"spmm:crow_decreasing:n{n}", lambda: torch.ops.raydistill.spmm(x, dec_crow(), col, val, None, 24))
    report(f"spmm:col_out_of_range:n{n}", lambda: torch.ops.raydistill.spmm(x, crow, bad_col(), val, None, 24))
    report(f"sparse_linear:crow_huge:n{n}", lambda: sparse_linear(x, bad_crow(), col, val))
    report(f"sddmm:crow_huge:n{n}", lambda: torch.ops.raydistill.sddmm(torch.randn(n, 24), x, bad_crow(), col))
    for index in ("csr", "bitmap"):
        for acts in (None, "int16"):
            q = sl.quantize(bits=8, index=index, activations=acts)
            report(f"int8_{index}_{acts}:crow_huge:n{n}",
                   lambda: sparse_linear_int8(x, bad_crow(), q.col_indices, q.values, q.scales, q.bias,
                                              activations=acts))
            report(f"int8_{index}_{acts}:crow_decreasing:n{n}",
                   lambda: sparse_linear_int8(x, dec_crow(), q.col_indices, q.values, q.scales, q.bias,
                                              activations=acts))
# a layer's own buffers changed in place after construction
layer = SparseLinear.from_dense(lin, torch.rand(24, 20) < 0.5)
with torch.no_grad():
    layer.crow_indices[1] = 2**30
report("layer:crow_huge", lambda: layer(torch.randn(8, 20)))
"""


def _run(script: str, *args: str, env: dict | None = None) -> tuple[int, list[dict], str]:
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **(env or {})))
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r.returncode, lines, r.stderr[-3000:]


def _assert_all_refused(rc, lines, err, expected, words):
    assert rc == 0, f"the process died (rc {rc}) after {[c['case'] for c in lines]}:\n{err}"
    got = {c["case"]: c for c in lines}
    assert sorted(got) == sorted(expected)
    for case, c in got.items():
        assert c["caught"] == "ValueError", f"{case}: {c}"
        for w in words(case):
            assert w in c["msg"], f"{case}: {w!r} not in {c['msg']!r}"


_RULE = {"crow_huge": "crow_indices must be non-decreasing", "crow_decreasing": "non-decreasing",
         "col_out_of_range": "col_indices out of range", "col_negative": "col_indices out of range",
         "crow_float": "crow_indices must be int32", "col_int64": "col_indices must be int32",
         "values_int": "values must be float", "t_perm_out_of_range": "t_perm must be the transpose",
         "crow_2d": "crow_indices must be 1-D", "col_int8": "col_indices must be uint16 or int32 or uint8",
         "bit_flipped": "bitmap disagrees with crow_indices", "bit_past_in_features": "at or beyond in_features",
         "bitmap_shape": "bitmap must have shape"}


def test_crafted_sparse_and_compressed_files_are_refused_at_load(ext, tmp_path):
    rc, lines, err = _run(_FILES, str(tmp_path))
    expected = [f"sparse:{k}" for k in ("crow_huge", "crow_decreasing", "col_out_of_range", "col_negative",
                                        "crow_float", "col_int64", "values_int", "t_perm_out_of_range", "crow_2d")]
    expected += [f"compressed:{k}" for k in ("crow_huge", "crow_decreasing", "col_out_of_range")]
    expected += [f"int8_csr:{k}:n{n}" for k in ("crow_huge", "col_out_of_range", "col_int8") for n in (2, 16)]
    expected += [f"int8_bitmap:{k}:n{n}" for k in ("crow_huge", "bit_flipped", "bit_past_in_features", "bitmap_shape")
                 for n in (2, 16)]

    def words(case):
        kind, name = case.split(":")[:2]
        fn = "load_sparse" if kind == "sparse" else "load_compressed"
        stem = {"sparse": "s", "compressed": "c"}.get(kind, "q_" + kind.removeprefix("int8_"))
        return [fn, str(tmp_path / f"{stem}_{name}.safetensors"), "'0'", _RULE[name]]

    _assert_all_refused(rc, lines, err, expected, words)


_OPS_CASES = [f"{op}:{k}:n{n}" for n in (2, 16) for op, k in
              (("spmm", "crow_huge"), ("spmm", "crow_decreasing"), ("spmm", "col_out_of_range"),
               ("sparse_linear", "crow_huge"), ("sddmm", "crow_huge"))]
_OPS_CASES += [f"int8_{i}_{a}:{k}:n{n}" for n in (2, 16) for i in ("csr", "bitmap") for a in (None, "int16")
               for k in ("crow_huge", "crow_decreasing")]
_OPS_CASES += ["layer:crow_huge"]


def test_ops_refuse_a_malformed_pattern_instead_of_reading_outside_it(ext):
    rc, lines, err = _run(_OPS)
    _assert_all_refused(rc, lines, err, _OPS_CASES, lambda case: [_RULE[case.split(":")[1]]])


def test_reference_path_refuses_a_malformed_pattern():
    """Without the extension the PyTorch reference runs: the same patterns are ValueErrors there too."""
    rc, lines, err = _run(_OPS, env={"RAYDISTILL_DISABLE_EXT": "1"})
    assert rc == 0, err
    assert sorted(c["case"] for c in lines) == sorted(_OPS_CASES)
    # torch.ops.raydistill.* do not exist without the extension: those cases fail with AttributeError
    for c in lines:
        if c["case"].startswith(("spmm:", "sddmm:")):
            assert c["caught"] == "AttributeError", c
        else:
            assert c["caught"] == "ValueError", c
            assert _RULE[c["case"].split(":")[1]] in c["msg"], c
