"""raydistill::spmm_int8 and SparseLinearInt8 (int8 values, per-row fp32 scales) against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydistill.ops.sparse import (SparseLinear, SparseLinearInt8, csr_from_dense, quantize_activations_int16,
                                   quantize_rows_int8, sparse_linear_int8, sparse_linear_int8_dense_reference,
                                   sparse_linear_int8_reference)

ACTS = (None, "int16")

TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _rel(a, b):
    b = b.double()
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _layer(out_f, in_f, sparsity, g, bias=True, empty_rows=True):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if empty_rows and out_f > 2:
        mask[1] = False
    return SparseLinear.from_dense(lin, mask)


def _x64(x, activations):
    """The input the layer computes with, in float64: x itself, or its int16 grid (codes * row scale)."""
    if activations is None:
        return x.double()
    codes, scale = quantize_activations_int16(x)
    return codes.double() * scale.double()


def _ref(q, x, crow=None, col=None):
    """float64 reference of q(x) for either activation mode (the pattern from crow/col when given)."""
    in_f = x.shape[-1]
    crow = q.crow_indices if crow is None else crow
    col = q.columns() if col is None else col
    y = sparse_linear_int8_dense_reference(_x64(x, q.activations).reshape(-1, in_f), crow, col, q.values, q.scales,
                                           q.bias, in_f)
    return y.reshape(*x.shape[:-1], q.out_features)


def _check(ext, out_f, in_f, lead, sparsity, dtype, g, bias=True):
    """Both index layouts (CSR indices, row bitmap) and both activation modes (x as it is; x rounded to
    int16 per row) against the float64 reference of the float pattern (the dense weight is rebuilt from
    the SparseLinear's own indices, not from the layout under test)."""
    from raydistill._build import op_backend

    if ext.loaded:
        assert op_backend("spmm_int8", "cpu") == "compiled"
        assert op_backend("spmm_int8_a16", "cpu") == "compiled"
    sl = _layer(out_f, in_f, sparsity, g, bias)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    for act in ACTS:
        ys = {}
        for index in ("csr", "bitmap"):
            q = sl.quantize(bits=8, index=index, activations=act)
            assert isinstance(q, SparseLinearInt8) and q.values.dtype == torch.int8 and q.index_format == index
            assert q.activations == act
            with torch.no_grad():
                ys[index] = y = q(x)
            assert y.shape == (*lead, out_f) and y.dtype == dtype
            # int16 activations: exact integer sums, scaled in fp32 (also for fp64 x: the codes carry 16 bits)
            tol = TOL[dtype] if act is None else max(TOL[dtype], TOL[torch.float32])
            assert _rel(y, _ref(q, x, sl.crow_indices, sl.col_indices)) < tol
        assert torch.equal(ys["csr"], ys["bitmap"])  # same columns in the same order: the same sums
    return sl, q


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 13), (64, 100), (33, 257), (130, 70)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16, 17, 33, 64])
def test_matches_float64_reference_shapes_and_batches(ext, seeded, out_f, in_f, n):
    _check(ext, out_f, in_f, (n,), 0.7, torch.float32, seeded)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_sparsities_bias_and_empty_rows(ext, seeded, sparsity, bias):
    _check(ext, 45, 96, (20,), sparsity, torch.float32, seeded, bias=bias)
    _check(ext, 45, 96, (3,), sparsity, torch.float32, seeded, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(2,), (2, 19)])
def test_other_activation_dtypes(ext, seeded, dtype, lead):
    _check(ext, 24, 40, lead, 0.6, dtype, seeded)


def test_wide_input_panels(ext, seeded, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_SPMM_PANEL_KB", "1")  # many column panels of the input dim
    _check(ext, 17, 1000, (20,), 0.5, torch.float32, seeded)
    _check(ext, 17, 1000, (70,), 0.5, torch.float64, seeded)


@pytest.mark.parametrize("generic", [False, True])
def test_threads_1_and_2_give_the_reference(ext, seeded, monkeypatch, generic):
    if generic:  # the portable int16-activation kernel (hosts without AVX2)
        monkeypatch.setenv("RAYDISTILL_SPMM_A16_GENERIC", "1")
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            _check(ext, 300, 512, (16,), 0.5, torch.float32, seeded)
            _check(ext, 300, 512, (2,), 0.5, torch.float32, seeded)
            _check(ext, 130, 300, (70,), 0.6, torch.float32, seeded)  # 32-wide int16 tiles
            _check(ext, 33, 200, (17,), 0.3, torch.bfloat16, seeded)
    finally:
        torch.set_num_threads(before)


def test_quantization_is_per_row_symmetric(seeded):
    sl = _layer(20, 30, 0.5, seeded)
    q, scales = quantize_rows_int8(sl.values, sl.crow_indices)
    w = sl.weight_dense().detach().double()
    amax = w.abs().amax(dim=1)
    want = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    assert torch.allclose(scales.double(), want, rtol=1e-6)
    assert int(q.abs().max()) == 127  # every nonempty row uses the full range
    deq = SparseLinearInt8.from_sparse(sl).weight_dense(torch.float64)
    assert ((deq - w).abs() <= scales.double()[:, None] / 2 + 1e-12).all()  # rounding error <= half a step


def test_uint16_and_int32_indices_agree(ext, seeded):
    sl = _layer(50, 300, 0.8, seeded)
    q16 = sl.quantize(bits=8, index="csr")
    assert q16.col_indices.dtype == torch.uint16
    q32 = SparseLinearInt8(300, 50, q16.nnz, True, index_dtype=torch.int32)
    q32.load_state_dict({**q16.state_dict(), "col_indices": q16.col_indices.to(torch.int32)})
    assert q32.col_indices.dtype == torch.int32
    for n in (1, 3, 16, 40):
        x = torch.randn(n, 300, generator=seeded)
        with torch.no_grad():
            assert torch.equal(q16(x), q32(x))  # same sums in the same order
    assert q16.storage_bytes()["col_indices"] * 2 == q32.storage_bytes()["col_indices"]


def test_int32_indices_above_65536_columns(ext, seeded):
    lin = nn.Linear(70000, 3)
    mask = torch.rand(3, 70000, generator=seeded) < 0.01
    mask[0, 69999] = True  # a column past 65535
    q = SparseLinear.from_dense(lin, mask).quantize(bits=8)
    assert q.col_indices.dtype == torch.int32  # 1% dense: int32 indices are smaller than a bitmap
    for n in (5, 20):  # the gather kernel and the int16 tile kernel
        x = torch.randn(n, 70000, generator=seeded)
        for act in ACTS:
            q.activations = act
            with torch.no_grad():
                assert _rel(q(x), _ref(q, x)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="uint16"):
        SparseLinearInt8(70000, 3, index_dtype=torch.uint16)


def test_bytes_with_real_bit_widths(seeded):
    out_f = in_f = 1024
    sl = _layer(out_f, in_f, 0.9, seeded, empty_rows=False)
    q = sl.quantize(bits=8, index="csr")
    b = q.storage_bytes()
    nnz = sl.nnz
    assert b == {"values": nnz, "col_indices": 2 * nnz, "crow_indices": 4 * (out_f + 1), "scales": 4 * out_f,
                 "bias": 4 * out_f, "total": 3 * nnz + 4 * (out_f + 1) + 8 * out_f}
    assert q.csr_bytes() == b["total"] - b["bias"]
    dense_fp32 = 4 * out_f * in_f
    # 1 byte value + 2 byte column per nonzero at 10% density: 7.5% of fp32 dense, plus row pointers/scales
    assert 0.070 < q.csr_bytes() / dense_fp32 < 0.080
    assert q.csr_bytes() < sl.csr_bytes() / 2.5  # fp32 CSR: 4 + 4 bytes per nonzero


def test_bad_input():
    sl = _layer(6, 8, 0.5, torch.Generator().manual_seed(1))
    for bits in (4, 16, 32, True, 8.5):
        with pytest.raises(ValueError, match="bits"):
            sl.quantize(bits=bits)
    q = sl.quantize(bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize(bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        SparseLinearInt8.from_sparse(q)
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="values"):
        sparse_linear_int8(x, q.crow_indices, q.col_indices, q.values.to(torch.int16), q.scales)
    with pytest.raises(TypeError, match="scales"):
        sparse_linear_int8(x, q.crow_indices, q.col_indices, q.values, q.scales.double())
    with pytest.raises(ValueError, match="in_features"):
        q(torch.randn(2, 9))


def test_kernel_rejects_out_of_range_columns(ext, seeded):
    q = _layer(6, 8, 0.0, seeded).quantize(bits=8, index="csr")
    col = q.col_indices.clone()
    col[5] = 9  # >= in_features
    col32 = q.col_indices.to(torch.int32)
    col32[5] = -3  # negative (int32 indices)
    for n in (2, 16, 40):
        for c in (col, col32):
            for op in (torch.ops.raydistill.spmm_int8, torch.ops.raydistill.spmm_int8_a16):
                with pytest.raises(ValueError, match="out of range"):
                    op(torch.randn(n, 8), q.crow_indices, c, q.values, q.scales, q.bias, 6)


def test_state_dict_round_trip_dequantize_and_grad_to_x(ext, seeded):
    sl = _layer(30, 50, 0.7, seeded)
    q = sl.quantize(bits=8)
    assert q.activations == "int16"  # the default: the fast CPU kernel
    fresh = SparseLinearInt8(50, 30)  # nnz 0: adopts the checkpoint's sizes
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(7, 50, generator=seeded)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    q = sl.quantize(bits=8, activations=None)  # weight-only: the float layer's math on the int8 weights
    back = q.dequantize()
    assert isinstance(back, SparseLinear) and torch.equal(back.weight_dense(), q.weight_dense())
    with torch.no_grad():
        assert _rel(back(x), q(x).double()) < TOL[torch.float32]
    # int8 weights are constants; an input that needs a gradient still gets one
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert _rel(xg.grad, q.weight_dense(torch.float64).sum(0).expand(7, 50)) < 1e-5
    assert not any(True for _ in q.parameters())


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", [3, 9, 40])
def test_reference_and_compiled_paths_agree(ext, seeded, act, n):
    q = _layer(40, 64, 0.8, seeded).quantize(bits=8, activations=act)
    x = torch.randn(n, 64, generator=seeded)
    ref = sparse_linear_int8_reference(x, q.crow_indices, q.col_indices, q.values, q.scales, q.bias, act)
    with torch.no_grad():
        assert _rel(q(x), ref.double()) < TOL[torch.float32]


def test_opcheck(ext, seeded):
    q = _layer(9, 7, 0.5, seeded).quantize(bits=8)
    for n in (4, 20):
        x = torch.randn(n, 7, generator=seeded)
        with torch.no_grad():
            q(x)  # registers the fake impls
        for op in (torch.ops.raydistill.spmm_int8, torch.ops.raydistill.spmm_int8_a16):
            torch.library.opcheck(op.default, (x, q.crow_indices, q.col_indices, q.values, q.scales, q.bias, 9))


# ---- int16 dynamic activations --------------------------------------------------------------------------


def test_int16_activation_codes_and_rounding_bound(seeded):
    x = torch.randn(6, 300, generator=seeded) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0  # a zero row: codes 0, scale 0
    codes, scale = quantize_activations_int16(x)
    assert codes.shape == x.shape and scale.shape == (6, 1)
    assert torch.equal(codes, codes.round()) and int(codes.abs().max()) == 32767
    assert torch.equal(codes[2], torch.zeros(300)) and float(scale[2]) == 0.0
    assert torch.equal(codes.abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), 32767.0))  # each row: full range
    err = (codes.double() * scale.double() - x.double()).abs()
    # at most half a step, plus three fp32 roundings (of 32767 / m, of x * that, and of the scale m / 32767),
    # each at most 2^-24 of |x| <= m = 32767 steps
    bound = 0.5 + 3 * 32767 * 2.0 ** -24
    assert (err <= scale.double() * bound + 1e-30).all()
    m = x.double().abs().amax(1)
    assert (err.amax(1)[m > 0] / m[m > 0] <= bound / 32767 * (1 + 1e-9)).all()  # ~1/65000 of the row's max


def test_int16_kernel_has_no_int32_overflow_on_long_rows(ext):
    # 4096 nonzeros of -128 in one row times codes of 32767 sum to -1.7e10, far past int32: the kernel must
    # flush its int32 partial sums (every 512 nonzeros) to stay exact
    in_f = 4096
    q = _layer(3, in_f, 0.0, torch.Generator().manual_seed(0), empty_rows=False).quantize(bits=8, index="csr")
    q.values.fill_(-128)
    x = torch.ones(24, in_f)
    x[5] = -2.5
    with torch.no_grad():
        y = q(x)
    want = -128.0 * q.scales.double()[None, :] * x.double().sum(1, keepdim=True) + q.bias.double()
    assert _rel(y, want) < 1e-6


def test_int16_nonfinite_rows_propagate_like_fp32(ext, seeded):
    q = _layer(20, 64, 0.5, seeded).quantize(bits=8)
    for n in (3, 24):
        x = torch.randn(n, 64, generator=seeded)
        x[1, 7] = float("nan")
        x[2, 9] = float("inf")
        with torch.no_grad():
            y = q(x)
        ref = sparse_linear_int8_reference(x, q.crow_indices, q.col_indices, q.values, q.scales, q.bias, "int16")
        torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5, equal_nan=True)
        assert bool(torch.isnan(y[1]).any())  # a nan input reaches the outputs it feeds
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3:]).all()


def test_int16_without_the_kernel_rounds_x_then_runs_fp32(ext, seeded, monkeypatch):
    """Where there is no int16 kernel (CUDA), x is rounded to the same int16 grid and the fp32 kernel runs:
    the same numbers up to fp32 rounding."""
    import raydistill.ops.sparse as sp

    q = _layer(50, 120, 0.7, seeded).quantize(bits=8)
    x = torch.randn(30, 120, generator=seeded)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(sp, "_int8_a16_compiled_for", lambda device_type: False)
        slow = q(x)
    assert _rel(slow, _ref(q, x)) < TOL[torch.float32] and _rel(fast, slow.double()) < TOL[torch.float32]


def test_int16_gradient_is_straight_through(ext, seeded):
    q = _layer(30, 50, 0.7, seeded).quantize(bits=8)
    x = torch.randn(7, 50, generator=seeded, requires_grad=True)
    y = q(x)
    g = torch.randn(7, 30, generator=seeded)
    y.backward(g)
    assert _rel(x.grad, g.double() @ q.weight_dense(torch.float64)) < 1e-5
    with torch.no_grad():
        assert _rel(y.detach(), q(x).double()) < TOL[torch.float32]  # the reference path and the kernel agree


def test_activations_argument_is_checked(seeded):
    sl = _layer(6, 8, 0.5, seeded)
    for bad in ("int8", "fp32", 16):
        with pytest.raises(ValueError, match="activations"):
            sl.quantize(bits=8, activations=bad)
        with pytest.raises(ValueError, match="activations"):
            SparseLinearInt8(8, 6, activations=bad)
    q = sl.quantize(bits=8)
    with pytest.raises(ValueError, match="activations"):
        sparse_linear_int8(torch.randn(2, 8), q.crow_indices, q.col_indices, q.values, q.scales, activations="int8")


def test_bitmap_layout_bytes_and_choice(seeded):
    out_f, in_f = 512, 500  # rows padded to 63 bytes
    sl = _layer(out_f, in_f, 0.8, seeded, empty_rows=False)
    q = sl.quantize(bits=8)  # auto: the bitmap is smaller at 20% density
    assert q.index_format == "bitmap" and q.col_indices.dtype == torch.uint8
    assert q.col_indices.shape == (out_f, 63)
    b = q.storage_bytes()
    nnz = sl.nnz
    assert b == {"values": nnz, "col_indices": out_f * 63, "crow_indices": 4 * (out_f + 1), "scales": 4 * out_f,
                 "bias": 4 * out_f, "total": nnz + out_f * 63 + 4 * (out_f + 1) + 8 * out_f}
    # int8 values + 1 bit per weight at ~20% density (random: +-0.2% absolute): 0.2 + 0.126 bytes per weight,
    # ~8.2% of fp32, plus row pointers and scales
    assert 0.080 < q.csr_bytes() / (4 * out_f * in_f) < 0.088
    assert q.csr_bytes() < sl.quantize(bits=8, index="csr").csr_bytes() * 0.6
    # the bitmap's bits are the pattern: popcount per row = nonzeros per row, bits at the stored columns
    cols = q.columns()
    assert torch.equal(cols, sl.col_indices.to(torch.int64))
    bits = ((q.col_indices.to(torch.int64)[..., None] >> torch.arange(8)) & 1).reshape(out_f, -1)[:, :in_f]
    assert torch.equal(bits.bool(), sl.mask())
    assert _layer(64, 512, 0.97, seeded).quantize(bits=8).index_format == "csr"  # 3% dense: indices smaller
    assert torch.equal(q.weight_dense(), sl.quantize(bits=8, index="csr").weight_dense())


def test_bitmap_state_dict_and_safetensors_round_trip_bit_exact(ext, seeded, tmp_path):
    from raydistill.compress import load_compressed, save_compressed

    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    mask = torch.rand(64, 40, generator=seeded) > 0.8
    net[0] = SparseLinear.from_dense(net[0], mask).quantize(bits=8)
    net[2] = SparseLinear.from_dense(net[2], torch.rand(10, 64, generator=seeded) > 0.5).quantize(bits=8,
                                                                                                 activations=None)
    assert net[0].index_format == "bitmap"
    save_compressed(net, tmp_path / "m.safetensors")
    back = load_compressed(nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10)), tmp_path / "m.safetensors")
    assert type(back[0]) is SparseLinearInt8 and back[0].index_format == "bitmap"
    assert back[0].activations == "int16" and back[2].activations is None  # the mode is saved with the layer
    for k, v in net.state_dict().items():
        assert back.state_dict()[k].dtype == v.dtype and torch.equal(back.state_dict()[k], v)
    x = torch.randn(33, 40, generator=seeded)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_bitmap_bad_input(ext, seeded):
    sl = _layer(6, 20, 0.5, seeded, empty_rows=False)
    with pytest.raises(ValueError, match="index must be one of"):
        sl.quantize(bits=8, index="coo")
    q = sl.quantize(bits=8, index="bitmap")
    x = torch.randn(4, 20, generator=seeded)
    with pytest.raises(ValueError, match="bitmap must have shape"):
        sparse_linear_int8(x, q.crow_indices, q.col_indices[:, :2], q.values, q.scales)
    extra = q.col_indices.clone()
    extra[0, 2] |= 0x10  # column 20 >= in_features (padding bit)
    for op in (torch.ops.raydistill.spmm_int8, torch.ops.raydistill.spmm_int8_a16):
        for n in (4, 16, 40):
            with pytest.raises(ValueError, match="bitmap"):
                op(torch.randn(n, 20), q.crow_indices, extra, q.values, q.scales, q.bias, 6)
    with pytest.raises(ValueError, match="beyond in_features"):
        sparse_linear_int8(x, q.crow_indices, extra, q.values, q.scales, check=True)
    missing = q.col_indices.clone()
    r = int(torch.nonzero(sl.crow_indices[1:] > sl.crow_indices[:-1])[0])  # the first nonempty row
    c = int(sl.col_indices[sl.crow_indices[r]])
    missing[r, c // 8] &= ~(1 << (c % 8)) & 0xFF  # one bit fewer than row 0's nonzeros
    for n in (2, 16, 40):
        for op in (torch.ops.raydistill.spmm_int8, torch.ops.raydistill.spmm_int8_a16):
            with pytest.raises(ValueError, match="disagrees with crow_indices"):
                op(torch.randn(n, 20), q.crow_indices, missing, q.values, q.scales, q.bias, 6)


def test_bitmap_opcheck(ext, seeded):
    q = _layer(9, 13, 0.5, seeded).quantize(bits=8, index="bitmap")
    x = torch.randn(4, 13, generator=seeded)
    with torch.no_grad():
        q(x)
    for op in (torch.ops.raydistill.spmm_int8, torch.ops.raydistill.spmm_int8_a16):
        torch.library.opcheck(op.default, (x, q.crow_indices, q.col_indices, q.values, q.scales, q.bias, 9))
