"""raydistill::spmm / raydistill::sddmm and SparseLinear against a float64 dense reference."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from raydistill.ops.sparse import (SparseLinear, check_csr, csr_from_dense, csr_transpose, sparse_linear,
                                   sparse_linear_dense_reference, sparse_linear_reference)

TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel(a, b):
    b = b.double()
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _pattern(out_f, in_f, kind, g):
    if kind == "random":
        m = torch.rand(out_f, in_f, generator=g) < 0.35
        if out_f > 2:
            m[1] = False  # an empty row
    elif kind == "zero":
        m = torch.zeros(out_f, in_f, dtype=torch.bool)
    else:
        m = torch.ones(out_f, in_f, dtype=torch.bool)
    return m


def _check(ext, out_f, in_f, lead, kind, dtype, g, bias=True):
    from raydistill._build import op_backend

    if ext.loaded:
        assert op_backend("spmm", "cpu") == "compiled" and op_backend("sddmm", "cpu") == "compiled"
    w = torch.randn(out_f, in_f, generator=g)
    crow, col, vals = csr_from_dense(w, _pattern(out_f, in_f, kind, g))
    v = vals.to(dtype).requires_grad_()
    b = torch.randn(out_f, generator=g).to(dtype).requires_grad_() if bias else None
    x = torch.randn(*lead, in_f, generator=g).to(dtype).requires_grad_()
    y = sparse_linear(x, crow, col, v, b, transpose=csr_transpose(crow, col, (out_f, in_f)))
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    xr = x.detach().double().requires_grad_()
    vr = v.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if bias else None
    ref = sparse_linear_dense_reference(xr, crow, col, vr, br, in_f)
    gy = torch.randn(ref.shape, generator=g).to(dtype)
    y.backward(gy)
    ref.backward(gy.double())
    tol = TOL[dtype]
    assert _rel(y, ref) < tol, "forward"
    assert _rel(x.grad, xr.grad) < tol, "dx"
    assert _rel(v.grad, vr.grad) < tol, "dW at the pattern"
    if bias:
        assert _rel(b.grad, br.grad) < tol, "db"


@pytest.mark.parametrize("out_f,in_f,lead", [
    (1, 1, (1,)), (7, 5, (3,)), (33, 17, (70,)), (64, 40, (9,)), (13, 11, (2, 3)), (19, 23, (4,)),
    (10, 130, (2,)), (40, 9, (65,)), (8, 16, (16,)), (5, 7, (0,)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_dense_reference(ext, seeded, out_f, in_f, lead, dtype):
    _check(ext, out_f, in_f, lead, "random", dtype, seeded)


@pytest.mark.parametrize("kind", ["zero", "dense"])
@pytest.mark.parametrize("lead", [(1,), (3,), (20,)])
def test_all_zero_and_fully_dense(ext, seeded, kind, lead):
    _check(ext, 12, 10, lead, kind, torch.float32, seeded)


@pytest.mark.parametrize("lead", [(1,), (4,), (37,)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(ext, seeded, lead, dtype):
    _check(ext, 48, 72, lead, "random", dtype, seeded)


def test_no_bias(ext, seeded):
    _check(ext, 9, 14, (6,), "random", torch.float32, seeded, bias=False)


def test_every_tile_and_batch_path(ext, seeded):
    # N <= 4 uses a gathered dot product, larger N packed batch tiles of 8/16/32/64 (several tiles at 150)
    for n in (1, 2, 3, 4, 5, 8, 12, 16, 31, 33, 64, 150):
        _check(ext, 21, 35, (n,), "random", torch.float32, seeded)


def test_wide_input_uses_panels(ext, seeded, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_SPMM_PANEL_KB", "1")  # forces many panels of the input dim
    _check(ext, 17, 300, (20,), "random", torch.float32, seeded)
    _check(ext, 17, 300, (70,), "random", torch.float64, seeded)


def test_gradcheck_float64(ext, seeded):
    w = torch.randn(6, 5, generator=seeded)
    crow, col, vals = csr_from_dense(w, torch.rand(6, 5, generator=seeded) < 0.5)
    tr = csr_transpose(crow, col, (6, 5))
    x = torch.randn(3, 5, dtype=torch.float64, generator=seeded, requires_grad=True)
    v = vals.double().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=seeded, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, crow, col, v, b, transpose=tr), (x, v, b))
    # without the precomputed transpose the backward builds it
    assert torch.autograd.gradcheck(lambda x, v: sparse_linear(x, crow, col, v), (x, v))


def test_reference_path_matches(seeded):
    w = torch.randn(11, 13, generator=seeded)
    crow, col, vals = csr_from_dense(w, torch.rand(11, 13, generator=seeded) < 0.4)
    x = torch.randn(2, 5, 13, dtype=torch.float64, generator=seeded)
    b = torch.randn(11, dtype=torch.float64, generator=seeded)
    ref = sparse_linear_dense_reference(x, crow, col, vals.double(), b, 13)
    assert _rel(sparse_linear_reference(x, crow, col, vals.double(), b), ref) < 1e-12


def test_opcheck(ext, seeded):
    w = torch.randn(9, 7, generator=seeded)
    crow, col, vals = csr_from_dense(w, torch.rand(9, 7, generator=seeded) < 0.5)
    t = csr_transpose(crow, col, (9, 7))
    x = torch.randn(4, 7, generator=seeded, requires_grad=True)
    v = vals.clone().requires_grad_()
    b = torch.randn(9, generator=seeded, requires_grad=True)
    sparse_linear(x, crow, col, v, b)  # registers fake impls + autograd
    torch.library.opcheck(torch.ops.raydistill.spmm.default, (x, crow, col, v, b, 9, *t))
    torch.library.opcheck(torch.ops.raydistill.sddmm.default, (torch.randn(4, 9), x.detach(), crow, col))


def test_torch_compile_fullgraph(ext, seeded):
    lin = nn.Linear(12, 10)
    mask = torch.rand(10, 12, generator=seeded) < 0.5
    sl = SparseLinear.from_dense(lin, mask)
    f = torch.compile(lambda x: sl(x).square().sum(), fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 12, generator=seeded, requires_grad=True)
    f(x).backward()
    ref_lin = sl.to_dense()
    xr = x.detach().clone().requires_grad_()
    ref_lin(xr).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)
    assert torch.allclose(sl.values.grad, ref_lin.weight.grad[mask], atol=1e-5)


# ---- validation ---------------------------------------------------------------------------------------


def test_csr_validation_errors():
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="sorted"):
        check_csr(crow, torch.tensor([2, 1, 0], dtype=torch.int32), (2, 4))
    with pytest.raises(ValueError, match="out of range"):
        check_csr(crow, torch.tensor([0, 4, 1], dtype=torch.int32), (2, 4))
    with pytest.raises(ValueError, match="crow_indices"):
        check_csr(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), (2, 4))
    with pytest.raises(TypeError, match="col_indices"):
        check_csr(crow, torch.tensor([0.0, 1.0, 2.0]), (2, 4))
    with pytest.raises(ValueError, match="sorted"):
        SparseLinear.from_csr(crow, torch.tensor([1, 1, 0], dtype=torch.int32), torch.ones(3), in_features=4)


def test_kernel_rejects_out_of_range_columns(ext):
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([0, 9, 1], dtype=torch.int32)
    for n in (1, 20):
        with pytest.raises(ValueError, match="col_indices out of range"):
            torch.ops.raydistill.spmm(torch.randn(n, 4), crow, col, torch.ones(3), None, 2)
    with pytest.raises(ValueError, match="col_indices out of range"):
        torch.ops.raydistill.sddmm(torch.randn(3, 2), torch.randn(3, 4), crow, col)
    with pytest.raises(TypeError, match="values dtype"):
        torch.ops.raydistill.spmm(torch.randn(2, 4), crow, torch.tensor([0, 1, 1], dtype=torch.int32),
                                  torch.ones(3, dtype=torch.float64), None, 2)


def test_from_dense_errors():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="mask shape"):
        SparseLinear.from_dense(lin, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        SparseLinear.from_dense(lin, torch.ones(3, 4))
    with pytest.raises(TypeError, match="linear"):
        SparseLinear.from_dense(torch.ones(3, 4), None)
    sl = SparseLinear.from_dense(lin, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_features"):
        sl(torch.randn(2, 5))


# ---- module -------------------------------------------------------------------------------------------


def _layer(g, out_f=10, in_f=14, p=0.4):
    lin = nn.Linear(in_f, out_f)
    mask = torch.rand(out_f, in_f, generator=g) < p
    return lin, mask, SparseLinear.from_dense(lin, mask)


def test_module_matches_masked_linear_and_to_dense(ext, seeded):
    lin, mask, sl = _layer(seeded)
    x = torch.randn(3, 4, 14, generator=seeded)
    with torch.no_grad():
        lin.weight.mul_(mask)
    assert torch.allclose(sl(x), lin(x), atol=1e-5)
    d = sl.to_dense()
    assert isinstance(d, nn.Linear) and torch.equal(d.weight, lin.weight) and torch.equal(d.bias, lin.bias)
    assert torch.equal(sl.mask(), mask)
    r = repr(sl)
    assert "in_features=14" in r and "out_features=10" in r and f"density={mask.float().mean():.4f}" in r


def test_state_dict_round_trip_and_dtype(ext, seeded):
    _, _, sl = _layer(seeded)
    fresh = SparseLinear(14, 10)  # nnz 0: adopts the checkpoint's pattern
    fresh.load_state_dict(sl.state_dict())
    x = torch.randn(5, 14, generator=seeded)
    assert torch.equal(fresh(x), sl(x))
    bf = fresh.to(torch.bfloat16)
    for name in ("crow_indices", "col_indices", "t_crow_indices", "t_col_indices", "t_perm"):
        assert getattr(bf, name).dtype == torch.int32, name
    assert bf.values.dtype == torch.bfloat16 and bf.bias.dtype == torch.bfloat16
    y = bf(x.bfloat16())
    assert _rel(y, sl(x).detach()) < 2e-2


_DDP_CHILD = """
import faulthandler, gc, sys
import torch, torch.distributed as dist
from torch import nn
from raydistill._build import op_backend
from raydistill.ops.sparse import SparseLinear

faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)  # a hang prints its stacks and ends
assert op_backend("spmm", "cpu") == "compiled", op_backend("spmm", "cpu")
g = torch.Generator().manual_seed(int(sys.argv[2]))
lin = nn.Linear(14, 10)
mask = torch.rand(10, 14, generator=g) < 0.4
sl = SparseLinear.from_dense(lin, mask)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
ddp = nn.parallel.DistributedDataParallel(sl)
x = torch.randn(4, 14, generator=g)
ddp(x).sum().backward()
assert sl.values.grad is not None and sl.values.grad.shape == (int(mask.sum()),), sl.values.grad
assert torch.allclose(sl.bias.grad, torch.full((10,), 4.0)), sl.bias.grad
dense = x.t() @ torch.ones(4, 10)  # d(sum(x W^T))/dW = ones^T x, kept where the mask is set
assert torch.allclose(sl.values.grad, dense.t()[mask], atol=1e-5)
del ddp  # release DDP's Reducer (it holds the group) before the group is destroyed
gc.collect()
dist.destroy_process_group()
print("ok")
"""


def test_parameters_are_values_and_bias_and_ddp(ext, seeded, tmp_path):
    """DDP over SparseLinear: its parameters are exactly (values, bias) and both get gradients.

    The gloo process group lives in a child process with a time limit: a group created and torn down in the
    pytest process once hung the whole suite in ``~ProcessGroupGloo`` (joining its thread while DDP's Reducer
    was freed), depending on what ran before in the same process."""
    import subprocess
    import sys

    _, _, sl = _layer(seeded)
    assert [n for n, _ in sl.named_parameters()] == ["values", "bias"]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=seeded))
    r = subprocess.run([sys.executable, "-c", _DDP_CHILD, str(tmp_path / "store"), str(seed), "100"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout, r.stderr[-4000:])


def test_fallback_when_extension_disabled(seeded):
    """The reference path (used without the extension) has the same semantics as the op."""
    import subprocess
    import sys

    code = (
        "import torch, warnings; warnings.simplefilter('ignore')\n"
        "from raydistill.ops.sparse import *\n"
        "from raydistill._build import op_backend\n"
        "assert op_backend('spmm', 'cpu') == 'reference'\n"
        "torch.manual_seed(0); w = torch.randn(9, 7); m = torch.rand(9, 7) < .5\n"
        "sl = SparseLinear.from_dense(torch.nn.Linear(7, 9), m); x = torch.randn(3, 7, requires_grad=True)\n"
        "sl(x).sum().backward(); d = sl.to_dense(); xr = x.detach().requires_grad_(); d(xr).sum().backward()\n"
        "assert torch.allclose(x.grad, xr.grad, atol=1e-5)\n"
        "assert torch.allclose(sl.values.grad, d.weight.grad[m], atol=1e-5)\n"
    )
    env = dict(os.environ, RAYDISTILL_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
