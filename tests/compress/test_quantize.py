"""Quantization: codes and scales vs a float64 reference, error bounds, QAT = PTQ numbers, fbgemm path,
reports with real bit widths, bad input, safetensors round trip."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from raydistill.compress import (FakeQuantLinear, QuantizedLinear, load_compressed, prepare_qat, prune_structured,
                                 quantize, save_compressed)
from raydistill.compress.quantize import (dequantize_weight, fake_quantize_activation, fake_quantize_weight,
                                         quantize_weight)

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _ref_quant(w: torch.Tensor, bits: int, group: int | None):
    """float64 reference: symmetric per (row, group) scale = amax / qmax, codes round-half-even, clamp."""
    w = w.double()
    out_f, in_f = w.shape
    g = in_f if group is None else group
    wg = w.reshape(out_f, in_f // g, g)
    qmax, lo = (127, -127) if bits == 8 else (7, -8)
    s = (wg.abs().amax(-1) / qmax).clamp_min(1e-12)
    q = torch.round(wg / s[..., None]).clamp(lo, qmax)
    return q.reshape(out_f, in_f), s, (q * s[..., None]).reshape(out_f, in_f)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None), (4, 32), (4, 64), (4, 128)])
def test_quantize_weight_matches_float64_reference(seeded, bits, group):
    w = torch.randn(48, 256, generator=seeded) * torch.rand(48, 1, generator=seeded) * 3
    q, s = quantize_weight(w, bits, group)
    rq, rs, rdeq = _ref_quant(w, bits, group)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), rs, rtol=1e-6, atol=0)
    # codes agree except where fp32 rounding lands exactly on a .5 boundary
    assert (q.double() - rq).abs().max() <= 1 and (q.double() != rq).float().mean() < 1e-3
    deq = dequantize_weight(q, s, group).double()
    # error bound: half a quantization step of the row/group, plus fp32 rounding (w / s and q * s are fp32:
    # a code on a .5 boundary may round either way, so the bound is a few ulps of |w| above step / 2)
    g = 256 if group is None else group
    step = rs.repeat_interleave(g, dim=1)
    assert ((deq - w.double()).abs() <= step / 2 + 2.0 ** -20 * (w.double().abs() + step)).all()
    torch.testing.assert_close(deq, rdeq, rtol=0, atol=float(step.max()) * 1.01)


@pytest.mark.parametrize("bits,group,act", [(8, None, None), (8, None, "int8"), (4, 32, None), (4, 16, "int8"),
                                            (8, 32, None)])
def test_quantized_linear_forward_and_qat_equivalence(seeded, bits, group, act):
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=seeded))
        lin.bias.copy_(torch.randn(24, generator=seeded))
    x = torch.randn(33, 64, generator=seeded)
    q = QuantizedLinear.from_linear(lin, bits=bits, group_size=group, activations=act)
    fq = FakeQuantLinear.from_linear(lin, bits=bits, group_size=group, activations=act)
    _, rs, wref = _ref_quant(lin.weight.detach(), bits, group)
    wdeq = q.dequantize().double()  # codes may differ by one where fp32 division lands on a .5 boundary
    assert ((wdeq - wref).abs() <= rs.max() * 1.001).all()
    xr = fake_quantize_activation(x).double() if act else x.double()
    ref = xr @ wdeq.T + lin.bias.detach().double()
    y = q(x)
    torch.testing.assert_close(fq(x).double(), ref, rtol=0, atol=1e-4)
    if q.uses_fbgemm(x):
        # fbgemm quantizes the activations itself (its scale is computed in double, ours in float32): compare
        # it with its own codes, and require the two code sets to differ in at most a few rare .5-boundary
        # cases (one flipped code moves an output by a whole activation step, ~0.1 here)
        xf = torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range=True)
        ref_fbgemm = xf.dequantize().double() @ wdeq.T + lin.bias.detach().double()
        torch.testing.assert_close(y.double(), ref_fbgemm, rtol=0, atol=2e-3)
        flipped = (xf.dequantize().double() - xr).abs() > 0.5 * xf.q_scale()  # a different code
        assert flipped.float().mean() < 0.005
    else:
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-4)
    if act is None:  # QAT forward == converted layer, bit for bit in the weights
        torch.testing.assert_close(fq(x), y, rtol=0, atol=1e-5)
    assert q.uses_fbgemm(x) == (bits == 8 and group is None and act == "int8")


def test_fake_quant_straight_through_gradient(seeded):
    lin = nn.Linear(32, 8)
    fq = FakeQuantLinear.from_linear(lin, bits=4, group_size=8, activations="int8")
    x = torch.randn(5, 32, generator=seeded, requires_grad=True)
    dy = torch.randn(5, 8, generator=seeded)
    fq(x).backward(dy)
    # STE: d/dW of x_q W_q^T is dy^T x_q (identity through the weight rounding)
    xq = fake_quantize_activation(x.detach())
    torch.testing.assert_close(fq.weight.grad, dy.T @ xq, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _mlp(seed=0, hidden=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8)])
def test_quantize_report_counts_real_bytes(bits, group):
    m = _mlp()
    rep = quantize(m, bits=bits, group_size=group)
    assert [r.name for r in rep.layers] == ["0", "2", "4"]
    fp32 = sum(p.numel() * 4 for p in _mlp().parameters())
    assert rep.bytes_before == fp32
    expect = 0
    for o, i in ((64, 40), (64, 64), (10, 64)):
        groups = 1 if group is None else i // group
        expect += (o * i * bits + 7) // 8 + o * groups * 4 + o * 4
    assert rep.bytes_after == expect
    assert all(isinstance(mod, QuantizedLinear) for mod in m if not isinstance(mod, nn.ReLU))


def test_bits32_is_identity():
    m = _mlp()
    rep = quantize(m, bits=32)
    assert rep.layers == [] and rep.bytes_after == rep.bytes_before
    assert all(type(mod) in (nn.Linear, nn.ReLU) for mod in m)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_fake_quantize_equals_stored_numbers_bit_for_bit(seeded, bits, group):
    """QAT's forward (torch.fake_quantize_per_channel_affine: round(w * (1/s))) and the stored codes give the
    same fp32 weight, bit for bit, on a large matrix: computing the codes as round(w / s) instead flips
    ~6 codes in 10^7 (values within an ulp of a .5 boundary), ~2.5 per matrix of this size."""
    w = torch.randn(4096, 1024, generator=seeded) * torch.rand(4096, 1, generator=seeded) * 3
    q, s = quantize_weight(w, bits, group)
    assert torch.equal(dequantize_weight(q, s, group), fake_quantize_weight(w, bits, group))


def test_qat_then_convert_gives_the_trained_numbers(seeded):
    m = _mlp()
    prepare_qat(m, bits=8, activations=None)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(64, 40, generator=seeded)
    y = torch.randint(0, 10, (64,), generator=seeded)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    with torch.no_grad():
        before = m(x)
    assert isinstance(m[0], FakeQuantLinear)
    quantize(m, bits=8)
    assert isinstance(m[0], QuantizedLinear)
    torch.testing.assert_close(m(x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=16), "bits must be one of"),
    (dict(bits=True), "bits must be one of"),
    (dict(bits=4, group_size=48), "group_size 48 does not divide in_features 40"),
    (dict(bits=8, group_size=0), "group_size must be a positive int"),
    (dict(bits=8, activations="int4"), "activations must be None or 'int8'"),
])
def test_bad_quantize_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(_mlp(), **kwargs)
    with pytest.raises(ValueError, match=match):
        prepare_qat(_mlp(), **kwargs)


def test_quantizing_twice_is_an_error():
    m = _mlp()
    quantize(m, bits=8)
    with pytest.raises(ValueError, match="layer '0' is already quantized"):
        quantize(m, bits=4, group_size=8)
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qat(m, bits=8)
    with pytest.raises(ValueError, match="prune_structured must run before"):
        prune_structured(m, 0.5)


@pytest.mark.parametrize("bits,group,act", [(8, None, "int8"), (4, 8, None), (8, 8, None)])
def test_compressed_safetensors_round_trip_bit_exact(tmp_path, seeded, bits, group, act):
    m = _mlp(hidden=64)
    x = torch.randn(20, 40, generator=seeded)
    srep = prune_structured(m, 0.25, x)
    quantize(m, bits=bits, group_size=group, activations=act)
    y = m(x)  # builds the fbgemm cache where used: it must not enter the state dict
    assert all(isinstance(v, torch.Tensor) for v in m.state_dict().values())
    assert not any(k.startswith("_") or "._" in k for k in m.state_dict())
    save_compressed(m, tmp_path / "s.safetensors", structure=srep.widths)
    m2 = load_compressed(lambda: _mlp(seed=5, hidden=64), tmp_path / "s.safetensors")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(y, m2(x))
    assert m2[0].out_features == 48 and m2[0].bits == bits


def test_load_compressed_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a raydistill compressed checkpoint"):
        load_compressed(_mlp(), tmp_path / "x.safetensors")
