"""Every compiled kernel against the float64 reference on every visible device.

CPU always runs; a CUDA device is added to the parametrisation when one is visible, so the same checks
run the CUDA kernels on a GPU machine (they are compile-checked only where there is none). The backend
assertion makes sure the compiled kernel for that device, not the PyTorch fallback, is what ran.
"""

from __future__ import annotations

import os

import pytest
import torch

from raydistill._build import op_backend
from raydistill.compress import magnitude_mask
from raydistill.ops import SparseLinear, kd_loss, kd_loss_reference, kd_loss_topk
from raydistill.ops.sparse import sparse_linear_dense_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _assert_backend(op: str, device: str):
    if os.environ.get("RAYDISTILL_DISABLE_EXT", "0") in ("", "0"):
        assert op_backend(op, device) == "compiled", f"{op} has no compiled {device} kernel"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [3, 1000, 32000])
def test_kd_loss_on_device(ext, device, divergence, dtype, V):
    _assert_backend("kd_loss_fwd", device)
    g, n = _gen(), 12
    s = (torch.randn(n, V, generator=g) * 3).to(dtype)
    t = (torch.randn(n, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    y[1] = -100
    sd = s.detach().clone().to(device).requires_grad_(True)
    loss = kd_loss(sd, t.to(device), y.to(device), temperature=2.0, alpha=0.5, divergence=divergence)
    loss.backward()
    s64 = s.detach().to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, t.to(F64), y, temperature=2.0, alpha=0.5, divergence=divergence)
    ref.backward()
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert loss.dtype == torch.float32 and loss.device.type == device
    torch.testing.assert_close(loss.cpu().to(F64), ref.detach(), rtol=rtol, atol=1e-5)
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=rtol, atol=rtol * scale + 1e-6)
    assert sd.grad[1].abs().max().item() == 0.0  # the ignored row gets no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_kd_loss_topk_on_device(ext, device):
    _assert_backend("kd_loss_topk_fwd", device)
    g, n, V, k = _gen(), 9, 5003, 16
    s = torch.randn(n, V, generator=g) * 2
    t = torch.randn(n, V, generator=g) * 2
    vals, idx = t.topk(k, dim=-1)
    y = torch.randint(0, V, (n,), generator=g)
    sd = s.detach().clone().to(device).requires_grad_(True)
    loss = kd_loss_topk(sd, vals.to(device), idx.to(device), y.to(device), temperature=3.0, alpha=0.7)
    loss.backward()
    s64 = s.detach().to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, vals.to(F64), y, temperature=3.0, alpha=0.7, teacher_topk_indices=idx)
    ref.backward()
    torch.testing.assert_close(loss.cpu().to(F64), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [300, 5003])  # a warp per row / a block per row on CUDA
def test_kd_loss_topk_tail_on_device(ext, device, divergence, dtype, V):
    """The top-k teacher with its tail (mass outside the top-k): CUDA's shared-memory bitmap of the k ids."""
    _assert_backend("kd_loss_topk_fwd", device)
    g, n, k, T = _gen(), 9, 40, 1.5
    s = (torch.randn(n, V, generator=g) * 2).to(dtype)
    t = torch.randn(n, V, generator=g, dtype=F64) * 2
    vals, idx = t.topk(k, dim=-1)
    tail = torch.log1p(-torch.softmax(t / T, -1).gather(-1, idx).sum(-1))
    y = torch.randint(0, V, (n,), generator=g)
    y[2] = -100
    sd = s.detach().clone().to(device).requires_grad_(True)
    kw = dict(temperature=T, alpha=0.6, divergence=divergence, reduction="sum")
    loss = kd_loss_topk(sd, vals.float().to(device), idx.to(device), y.to(device),
                        teacher_topk_tail=tail.float().to(device), **kw)
    loss.backward()
    s64 = s.detach().to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, vals, y, teacher_topk_indices=idx, teacher_topk_tail=tail, **kw)
    ref.backward()
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(loss.cpu().to(F64), ref.detach(), rtol=rtol, atol=1e-5)
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=rtol, atol=rtol * scale + 1e-6)
    assert sd.grad[2].abs().max().item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparse_linear_on_device(ext, device, batch, sparsity):
    _assert_backend("spmm", device)
    g = _gen()
    lin = torch.nn.Linear(67, 45)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(45, 67, generator=g))
        lin.bias.copy_(torch.randn(45, generator=g))
    sl = SparseLinear.from_dense(lin, magnitude_mask(lin.weight, sparsity)).to(device)
    x = torch.randn(batch, 67, generator=g)
    xd = x.detach().clone().to(device).requires_grad_(True)
    y = sl(xd)
    dy = torch.randn(batch, 45, generator=g)
    y.backward(dy.to(device))

    crow, col, vals = (b.detach().cpu() for b in (sl.crow_indices, sl.col_indices, sl.values))
    x64 = x.detach().to(F64).requires_grad_(True)
    v64 = vals.to(F64).requires_grad_(True)
    b64 = sl.bias.detach().cpu().to(F64).requires_grad_(True)
    ref = sparse_linear_dense_reference(x64, crow, col, v64, b64, 67)
    ref.backward(dy.to(F64))
    torch.testing.assert_close(y.detach().cpu().to(F64), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xd.grad.cpu().to(F64), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.values.grad.cpu().to(F64), v64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.bias.grad.cpu().to(F64), b64.grad, rtol=1e-5, atol=1e-5)


# ---- the one-pass cluster kernel (sm_90, opt-in with RAYDISTILL_KD_KERNEL=cluster): shapes it takes (V a
# multiple of 8, same dtypes), checked against float64 and against the generic kernel on every device.

def _kd_case(g, n, V, dtype, mask_frac=0.0):
    s = (torch.randn(n, V, generator=g) * 3).to(dtype)
    t = (torch.randn(n, V, generator=g) * 3).to(dtype)
    if mask_frac:
        m = torch.rand(n, V, generator=g) < mask_frac
        s = s.masked_fill(m, float("-inf"))
        t = t.masked_fill(m, float("-inf"))
    y = torch.randint(0, V, (n,), generator=g)
    y[0] = -100
    if mask_frac:  # labels on unmasked entries
        y[1:] = torch.where(torch.isinf(s[1:].float()), -1e9, s[1:].float()).argmax(-1)
    return s, t, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype,V", [(torch.bfloat16, 128256), (torch.float32, 32000), (torch.float16, 50264),
                                     (torch.bfloat16, 4096)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kd_loss_large_vocab(ext, device, divergence, dtype, V, temperature, reduction, monkeypatch):
    if device == "cpu":
        V = min(V, 8192)  # the CPU kernel's share of this grid stays quick (test_kd_loss.py covers it)
    g, n = _gen(), 6
    s, t, y = _kd_case(g, n, V, dtype, mask_frac=0.02 if divergence == "forward_kl" else 0.0)
    kw = dict(temperature=temperature, alpha=0.5, divergence=divergence, reduction=reduction)
    monkeypatch.setenv("RAYDISTILL_KD_KERNEL", "cluster")  # the one-pass kernel where it applies (sm_90)
    sd = s.clone().to(device).requires_grad_(True)
    loss = kd_loss(sd, t.to(device), y.to(device), **kw)
    loss.backward()
    s64 = s.to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, t.to(F64), y, **kw)
    ref.backward()
    rtol = 1e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(loss.detach().cpu().to(F64), ref.detach(), rtol=rtol, atol=1e-4)
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=rtol, atol=rtol * scale + 1e-7)
    assert sd.grad[0].abs().max().item() == 0.0
    if device == "cuda":  # the generic kernel agrees (same inputs)
        monkeypatch.setenv("RAYDISTILL_KD_KERNEL", "generic")
        sg = s.clone().to(device).requires_grad_(True)
        lg = kd_loss(sg, t.to(device), y.to(device), **kw)
        lg.backward()
        torch.testing.assert_close(loss.detach(), lg.detach(), rtol=rtol, atol=1e-4)
        torch.testing.assert_close(sd.grad.float(), sg.grad.float(), rtol=rtol, atol=rtol * scale + 1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kd_loss_topk_large_vocab(ext, device, divergence, dtype, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_KD_KERNEL", "cluster")
    g, n, V, k = _gen(), 5, 32000, 128
    s = (torch.randn(n, V, generator=g) * 2).to(dtype)
    t = torch.randn(n, V, generator=g) * 2
    vals, idx = t.topk(k, dim=-1)
    vals = vals.to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    y[2] = idx[2, 3]  # a label inside the top-k entries
    kw = dict(temperature=2.0, alpha=0.5, divergence=divergence)
    sd = s.clone().to(device).requires_grad_(True)
    loss = kd_loss_topk(sd, vals.to(device), idx.to(device), y.to(device), **kw)
    loss.backward()
    s64 = s.to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, vals.to(F64), y, teacher_topk_indices=idx, **kw)
    ref.backward()
    rtol = 1e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(loss.detach().cpu().to(F64), ref.detach(), rtol=rtol, atol=1e-4)
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=rtol, atol=rtol * scale + 1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_kd_loss_nan_and_upstream_scale(ext, device):
    """A NaN logit makes its row's loss NaN; a non-unit upstream gradient scales the stored gradient."""
    g, n, V = _gen(), 4, 4096
    s, t, y = _kd_case(g, n, V, torch.float32)
    s2 = s.clone()
    s2[2, 17] = float("nan")
    row = kd_loss(s2.to(device), t.to(device), y.to(device), temperature=2.0, alpha=0.5, reduction="none")
    assert torch.isnan(row[2]) and torch.isfinite(row[[0, 1, 3]]).all()
    sd = s.clone().to(device).requires_grad_(True)
    (kd_loss(sd, t.to(device), y.to(device), temperature=2.0, alpha=0.5) * 3.0).backward()
    s64 = s.to(F64).requires_grad_(True)
    (kd_loss_reference(s64, t.to(F64), y, temperature=2.0, alpha=0.5) * 3.0).backward()
    torch.testing.assert_close(sd.grad.cpu().to(F64), s64.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_paths(ext, device, path, dtype, monkeypatch, tmp_path):
    """Both CUDA paths (CSR kernel, masked-dense cuBLAS) and the measured choice give the layer's
    function and gradients; after an in-place update of the values the dense copy follows."""
    monkeypatch.setenv("RAYDISTILL_SPMM_PATH", path)
    monkeypatch.setenv("RAYDISTILL_CACHE_DIR", str(tmp_path))
    import raydistill.ops.sparse_dispatch as sd_mod
    monkeypatch.setattr(sd_mod, "_decisions", None)
    g = _gen()
    out_f, in_f, batch = 96, 128, 16
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    sl = SparseLinear.from_dense(lin, magnitude_mask(lin.weight, 0.9)).to(device=device, dtype=dtype)
    for step in range(2):
        x = torch.randn(batch, in_f, generator=g)
        xd = x.detach().to(device=device, dtype=dtype).requires_grad_(True)
        y = sl(xd)
        dy = torch.randn(batch, out_f, generator=g)
        sl.values.grad = None
        y.backward(dy.to(device=device, dtype=dtype))
        crow, col, vals = (b.detach().cpu() for b in (sl.crow_indices, sl.col_indices, sl.values))
        x64 = x.detach().to(dtype).to(F64).requires_grad_(True)
        v64 = vals.to(F64).requires_grad_(True)
        ref = sparse_linear_dense_reference(x64, crow, col, v64, None, in_f)
        ref.backward(dy.to(dtype).to(F64))
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(y.detach().cpu().to(F64), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(xd.grad.cpu().to(F64), x64.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(sl.values.grad.cpu().to(F64), v64.grad, rtol=tol, atol=tol * 10)
        with torch.no_grad():
            sl.values.mul_(-1.5)  # an optimizer-like in-place update between steps
    if device == "cuda" and path == "auto":
        assert sd_mod.cached_decisions(), "the measured choice was not cached"
