"""The fused linear + distillation loss against float64 autograd through materialised logits.

Fresh random inputs every run; the loss and the gradients w.r.t. the student's hidden states, weight and
bias are compared. Devices: CPU always, CUDA when visible (the lead's GPU run exercises the CUDA kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from raydistill.ops import (
    KDLossLinear,
    kd_loss,
    kd_loss_linear,
    kd_loss_linear_reference,
    kd_loss_linear_topk,
)
from raydistill.ops._kd_loss_linear import auto_chunk_size

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


@pytest.fixture(autouse=True)
def _compiled_backend(ext):
    """The fused path needs the compiled kd_loss kernels (else the op materialises the logits)."""
    from raydistill._build import op_backend

    for dev in DEVICES:
        assert op_backend("kd_loss_fwd", dev) == "compiled"
        assert op_backend("kd_loss_topk_fwd", dev) == "compiled"


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _problem(g, lead=(2, 13), Hs=24, Ht=20, V=97, Vt=101, bias=True, dtype=F32, ignore_every=4):
    """Student/teacher hidden states and lm_head weights (teacher vocabulary padded to Vt), labels with
    some ignored rows. Weights scaled so logits are O(3) (a non-trivial softmax)."""
    p = {
        "sh": torch.randn(*lead, Hs, generator=g),
        "sw": torch.randn(V, Hs, generator=g) * (3 / Hs ** 0.5),
        "sb": torch.randn(V, generator=g) if bias else None,
        "th": torch.randn(*lead, Ht, generator=g),
        "tw": torch.randn(Vt, Ht, generator=g) * (3 / Ht ** 0.5),
        "tb": torch.randn(Vt, generator=g) if bias else None,
        "y": torch.randint(0, V, lead, generator=g),
    }
    if ignore_every:
        p["y"].view(-1)[::ignore_every] = -100
    for k in ("sh", "sw", "sb", "th", "tw", "tb"):
        if p[k] is not None:
            p[k] = p[k].to(dtype)
    return p


def _leaves(p, device, dtype=None):
    out = []
    for k in ("sh", "sw", "sb"):
        t = p[k]
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(device=device, dtype=dtype or t.dtype).clone()
        out.append(t.requires_grad_(True))
    return out


def _upstream(loss, g):
    """A non-trivial upstream gradient: random per row for 'none', 1.7 for a scalar loss."""
    if loss.dim():
        return torch.randn(loss.shape, generator=g, dtype=F64)
    return torch.tensor(1.7, dtype=F64)


def _check(loss, ref, leaves, ref_leaves, rtol=2e-5, atol=1e-6):
    assert loss.dtype == F32
    torch.testing.assert_close(loss.detach().cpu().to(F64), ref.detach(), rtol=rtol, atol=atol)
    for name, a, b in zip(("student_hidden", "student_weight", "student_bias"), leaves, ref_leaves):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert a.grad.dtype == a.dtype
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad.cpu().to(F64), b.grad, rtol=rtol, atol=atol + rtol * scale,
                                   msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------ values

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(device, divergence, reduction, bias):
    g = _gen()
    p = _problem(g, bias=bias)
    kw = dict(temperature=2.0, alpha=0.5, divergence=divergence, beta=0.3, reduction=reduction)
    sh, sw, sb = _leaves(p, device)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    # chunk_size=7 does not divide the 26 rows; the teacher vocabulary is padded (101 > 97)
    loss = kd_loss_linear(sh, sw, dev(p["th"]), dev(p["tw"]), dev(p["y"]), student_bias=sb,
                          teacher_bias=dev(p["tb"]), chunk_size=7, **kw)
    w = _upstream(loss, g)
    (loss * w.to(device=device, dtype=loss.dtype)).sum().backward()
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], p["th"], p["tw"], p["y"], student_bias=r[2], teacher_bias=p["tb"], **kw)
    (ref * w).sum().backward()
    assert loss.shape == ref.shape and loss.device.type == device
    _check(loss, ref, (sh, sw, sb), r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_matches_float64_reference(device, divergence, reduction):
    g = _gen()
    p = _problem(g, lead=(3, 7))
    k = 9
    vals, idx = (torch.randn(3, 7, 97, generator=g) * 3).topk(k, dim=-1)
    kw = dict(temperature=1.5, alpha=0.6, divergence=divergence, reduction=reduction)
    sh, sw, sb = _leaves(p, device)
    loss = kd_loss_linear_topk(sh, sw, vals.to(device), idx.to(device), p["y"].to(device), student_bias=sb,
                               chunk_size=4, **kw)
    w = _upstream(loss, g)
    (loss * w.to(device=device, dtype=loss.dtype)).sum().backward()
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], None, None, p["y"], student_bias=r[2], teacher_topk_logits=vals,
                                   teacher_topk_indices=idx, **kw)
    (ref * w).sum().backward()
    _check(loss, ref, (sh, sw, sb), r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 5, 26, 1000, None])
def test_chunk_sizes_agree(device, chunk_size):
    """Every chunking (one row, a remainder, exactly all rows, more than all rows, automatic) gives the
    reference value and gradients; mean divides by the valid rows of the whole input."""
    g = _gen()
    p = _problem(g, ignore_every=3)
    kw = dict(temperature=3.0, alpha=0.25)
    sh, sw, sb = _leaves(p, device)
    loss = kd_loss_linear(sh, sw, p["th"].to(device), p["tw"].to(device), p["y"].to(device), student_bias=sb,
                          teacher_bias=p["tb"].to(device), chunk_size=chunk_size, **kw)
    loss.backward()  # upstream exactly 1: the backward's scaling is skipped
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], p["th"], p["tw"], p["y"], student_bias=r[2], teacher_bias=p["tb"], **kw)
    ref.backward()
    _check(loss, ref, (sh, sw, sb), r)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_inputs(device):
    """bf16 hidden states and weights: float32 math, float32 accumulation of grad_weight / grad_bias,
    gradients returned in bf16 (within bf16 rounding of the float64 reference on the same inputs)."""
    g = _gen()
    p = _problem(g, lead=(64,), Hs=32, Ht=16, V=300, Vt=300, dtype=BF16)
    kw = dict(temperature=2.0, alpha=0.5)
    sh, sw, sb = _leaves(p, device)
    loss = kd_loss_linear(sh, sw, p["th"].to(device), p["tw"].to(device), p["y"].to(device), student_bias=sb,
                          teacher_bias=p["tb"].to(device), chunk_size=5, **kw)
    (loss * 2).backward()
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], p["th"], p["tw"], p["y"], student_bias=r[2], teacher_bias=p["tb"], **kw)
    (ref * 2).backward()
    # the logits are rounded to bf16 by the bf16 matmul before the loss: a few 1e-3 relative
    _check(loss, ref, (sh, sw, sb), r, rtol=3e-2, atol=1e-3)


def test_only_some_inputs_require_grad(seeded):
    """A frozen lm_head (weight without grad): the hidden states still get the right gradient and the
    weight none; under no_grad nothing is computed but the loss."""
    p = _problem(seeded)
    kw = dict(temperature=2.0, alpha=0.5)
    sh = p["sh"].clone().requires_grad_(True)
    loss = kd_loss_linear(sh, p["sw"], p["th"], p["tw"], p["y"], student_bias=p["sb"], teacher_bias=p["tb"], **kw)
    loss.backward()
    sh64 = p["sh"].double().requires_grad_(True)
    ref = kd_loss_linear_reference(sh64, p["sw"].double(), p["th"], p["tw"], p["y"], student_bias=p["sb"].double(),
                                   teacher_bias=p["tb"], **kw)
    ref.backward()
    torch.testing.assert_close(sh.grad.double(), sh64.grad, rtol=2e-5, atol=1e-6)
    assert p["sw"].grad is None
    with torch.no_grad():
        sw = p["sw"].clone().requires_grad_(True)
        l2 = kd_loss_linear(sh, sw, p["th"], p["tw"], p["y"], student_bias=p["sb"], teacher_bias=p["tb"], **kw)
    assert not l2.requires_grad
    torch.testing.assert_close(l2.double(), ref.detach(), rtol=2e-5, atol=1e-6)


def test_no_labels_and_all_ignored(seeded):
    p = _problem(seeded, ignore_every=0)
    # alpha=1 without labels: mean over all rows
    sh, sw, sb = _leaves(p, "cpu")
    loss = kd_loss_linear(sh, sw, p["th"], p["tw"], student_bias=sb, teacher_bias=p["tb"], temperature=2.0,
                          divergence="jsd", chunk_size=4)
    loss.backward()
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], p["th"], p["tw"], student_bias=r[2], teacher_bias=p["tb"],
                                   temperature=2.0, divergence="jsd")
    ref.backward()
    _check(loss, ref, (sh, sw, sb), r)
    # every row ignored: mean is 0 with zero gradients
    sh, sw, sb = _leaves(p, "cpu")
    y = torch.full_like(p["y"], -100)
    loss = kd_loss_linear(sh, sw, p["th"], p["tw"], y, student_bias=sb, alpha=0.5, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert all(t.grad.abs().max().item() == 0.0 for t in (sh, sw, sb))


def test_float64_gradcheck(seeded):
    """float64 in, float64 math: torch.autograd.gradcheck on the op (finite differences)."""
    sh = torch.randn(5, 3, generator=seeded, dtype=F64, requires_grad=True)
    sw = torch.randn(6, 3, generator=seeded, dtype=F64, requires_grad=True)
    sb = torch.randn(6, generator=seeded, dtype=F64, requires_grad=True)
    th = torch.randn(5, 4, generator=seeded, dtype=F64)
    tw = torch.randn(7, 4, generator=seeded, dtype=F64)
    y = torch.tensor([0, 5, -100, 2, 3])
    for red in ("mean", "none"):
        f = lambda a, b, c: kd_loss_linear(a, b, th, tw, y, student_bias=c, temperature=1.5,  # noqa: E731
                                           alpha=0.4, divergence="jsd", reduction=red, chunk_size=2)
        assert torch.autograd.gradcheck(f, (sh, sw, sb))


def test_module_matches_function(seeded):
    p = _problem(seeded)
    m = KDLossLinear(temperature=2.0, alpha=0.3, divergence="reverse_kl", reduction="sum", chunk_size=6)
    assert "chunk_size=6" in repr(m)
    torch.testing.assert_close(
        m(p["sh"], p["sw"], p["th"], p["tw"], p["y"], student_bias=p["sb"], teacher_bias=p["tb"]),
        kd_loss_linear(p["sh"], p["sw"], p["th"], p["tw"], p["y"], student_bias=p["sb"], teacher_bias=p["tb"],
                       temperature=2.0, alpha=0.3, divergence="reverse_kl", reduction="sum", chunk_size=6))
    vals, idx = torch.randn(2, 13, 97, generator=seeded).topk(4, dim=-1)
    mt = KDLossLinear(temperature=2.0, alpha=0.3, chunk_size=6)
    torch.testing.assert_close(mt.forward_topk(p["sh"], p["sw"], vals, idx, p["y"]),
                               kd_loss_linear_topk(p["sh"], p["sw"], vals, idx, p["y"], temperature=2.0, alpha=0.3))
    with pytest.raises(ValueError, match="chunk_size"):
        KDLossLinear(chunk_size=0)


def test_equals_kd_loss_on_materialised_logits(seeded):
    """Same numbers as the unfused path a training loop would otherwise take (fp32, both logits)."""
    p = _problem(seeded)
    logits = torch.nn.functional.linear(p["sh"], p["sw"], p["sb"])
    teacher = torch.nn.functional.linear(p["th"], p["tw"], p["tb"])[..., :97]
    a = kd_loss(logits, teacher, p["y"], temperature=2.0, alpha=0.5, reduction="none")
    b = kd_loss_linear(p["sh"], p["sw"], p["th"], p["tw"], p["y"], student_bias=p["sb"], teacher_bias=p["tb"],
                       temperature=2.0, alpha=0.5, reduction="none", chunk_size=3)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_auto_chunk_size_rule():
    # V=32000 fp32 on CPU: 96 MiB / (32000 * 12 B) = 262 rows -> 16 balanced chunks of 256 for 4096 rows
    assert auto_chunk_size(4096, 32000, "cpu", 4, 4) == 256
    assert auto_chunk_size(4097, 32000, "cpu", 4, 4) == 257  # 16 chunks (the last 242), not 15 x 262 + 167
    assert auto_chunk_size(263, 32000, "cpu", 4, 4) == 132  # 2 chunks, not 262 + a 1-row remainder
    assert auto_chunk_size(6144, 32000, "cpu", 2, 2) == 512  # bf16: twice the rows for the same bytes
    assert auto_chunk_size(10, 32000, "cpu", 4, 4) == 10
    assert auto_chunk_size(100, 10**9, "cpu", 4, 4) == 1  # never below one row
    c = auto_chunk_size(8192, 128256, "cuda", 2, 2)
    assert 1024 <= c <= 1400 and c * 128256 * 6 <= 1 << 30


# ------------------------------------------------------------------------------------------------ compile

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(seeded, backend):
    torch._dynamo.reset()
    p = _problem(seeded)
    vals, idx = (torch.randn(2, 13, 97, generator=seeded) * 3).topk(5, dim=-1)

    def f(a, b, c):
        l1 = kd_loss_linear(a, b, p["th"], p["tw"], p["y"], student_bias=c, teacher_bias=p["tb"], temperature=2.0,
                            alpha=0.5, chunk_size=8)
        l2 = kd_loss_linear(a, b, p["th"], p["tw"], p["y"], student_bias=c, temperature=1.0, divergence="jsd",
                            alpha=0.5, reduction="none")
        l3 = kd_loss_linear_topk(a, b, vals, idx, p["y"], student_bias=c, alpha=0.5, reduction="sum")
        return 3 * l1 + (l2 * l2).sum() + 0.1 * l3

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    e = _leaves(p, "cpu")
    c = _leaves(p, "cpu")
    out_e, out_c = f(*e), compiled(*c)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(c, e):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(p["sh"], p["sw"], p["sb"]), out_e.detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_raise(seeded):
    p = _problem(seeded)
    sh, sw, th, tw, y, sb, tb = p["sh"], p["sw"], p["th"], p["tw"], p["y"], p["sb"], p["tb"]
    vals, idx = torch.randn(2, 13, 97, generator=seeded).topk(4, dim=-1)
    cases = [
        (lambda: kd_loss_linear(sh[..., :5], sw, th, tw), ValueError, "student_hidden hidden size 5"),
        (lambda: kd_loss_linear(sh, sw, th[..., :5], tw), ValueError, "teacher_hidden hidden size 5"),
        (lambda: kd_loss_linear(sh, sw[:, :5], th, tw), ValueError, "student_hidden hidden size"),
        (lambda: kd_loss_linear(sh, sw, th, tw[:96]), ValueError, "V_t=96 rows, fewer than"),
        (lambda: kd_loss_linear(sh, sw, th, tw, chunk_size=0), ValueError, r"chunk_size must be in \[1, 2\*\*63 - 1\]"),
        (lambda: kd_loss_linear(sh, sw, th, tw, chunk_size=10**20), ValueError,
         r"chunk_size must be in \[1, 2\*\*63 - 1\] .*got 100000000000000000000"),
        (lambda: KDLossLinear(chunk_size=2**63), ValueError, r"chunk_size must be in \[1, 2\*\*63 - 1\]"),
        (lambda: kd_loss_linear(sh, sw, th, tw, y, alpha=0.5, ignore_index=10**20), ValueError,
         r"ignore_index must be in \[-2\*\*63, 2\*\*63 - 1\]"),
        (lambda: kd_loss_linear_topk(sh, sw, vals, idx, y, alpha=0.5, ignore_index=-2**64), ValueError,
         "ignore_index must be in"),
        (lambda: kd_loss_linear(sh, sw, th, tw, chunk_size=2.5), TypeError, "chunk_size"),
        (lambda: kd_loss_linear(sh, sw, th, tw, chunk_size=True), TypeError, "chunk_size"),
        (lambda: kd_loss_linear(sh, sw, th, tw, y[:, :5], alpha=0.5), ValueError, "labels shape"),
        (lambda: kd_loss_linear(sh, sw, th, tw, y.reshape(-1), alpha=0.5), ValueError, "labels shape"),
        (lambda: kd_loss_linear(sh, sw, th[:1], tw), ValueError, "teacher_hidden leading shape"),
        (lambda: kd_loss_linear(sh, sw, th, tw, alpha=0.5), ValueError, "labels are required"),
        (lambda: kd_loss_linear(sh, sw, th, tw, y.float(), alpha=0.5), TypeError, "labels"),
        (lambda: kd_loss_linear(sh, sw, th, tw, torch.full_like(y, 97), alpha=0.5), ValueError, "labels must be in"),
        (lambda: kd_loss_linear(sh, sw, th, tw, temperature=0.0), ValueError, "temperature"),
        (lambda: kd_loss_linear(sh, sw, th, tw, y, alpha=1.5), ValueError, "alpha"),
        (lambda: kd_loss_linear(sh, sw, th, tw, divergence="kl"), ValueError, "divergence"),
        (lambda: kd_loss_linear(sh, sw, th, tw, divergence="jsd", beta=1.0), ValueError, "beta"),
        (lambda: kd_loss_linear(sh, sw, th, tw, reduction="avg"), ValueError, "reduction"),
        (lambda: kd_loss_linear(sh, sw, th, tw, t2_scaling=1), TypeError, "t2_scaling"),
        (lambda: kd_loss_linear(sh, sw, th, tw, student_bias=sb[:5]), ValueError, "student_bias shape"),
        (lambda: kd_loss_linear(sh, sw, th, tw, teacher_bias=tb[:97]), ValueError, "teacher_bias shape"),
        (lambda: kd_loss_linear(sh, sw, th, tw, student_bias=sb.double()), TypeError, "student_bias dtype"),
        (lambda: kd_loss_linear(sh.double(), sw, th, tw), TypeError, "student_hidden dtype"),
        (lambda: kd_loss_linear(sh, sw.unsqueeze(0), th, tw), ValueError, "student_weight must be 2-D"),
        (lambda: kd_loss_linear(sh.long(), sw, th, tw), TypeError, "student_hidden must be a floating"),
        (lambda: kd_loss_linear(sh, "w", th, tw), TypeError, "student_weight must be a torch.Tensor"),
        (lambda: kd_loss_linear(sh, sw, th.to("meta"), tw.to("meta")), ValueError, "same device"),
        (lambda: kd_loss_linear_topk(sh, sw, vals[:1], idx[:1]), ValueError, "teacher_topk_logits shape"),
        (lambda: kd_loss_linear_topk(sh, sw, vals, idx + 97), ValueError, "teacher_topk_indices must be in"),
        (lambda: kd_loss_linear_topk(sh, sw, vals, idx.float()), TypeError, "teacher_topk_indices"),
        (lambda: kd_loss_linear_topk(sh, sw, vals, idx, divergence="reverse_kl"), ValueError, "reverse_kl"),
        (lambda: kd_loss_linear_topk(sh, sw, vals, idx, y[:1], alpha=0.5), ValueError, "labels shape"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    # the largest int64 is valid: one chunk, the same loss as the automatic chunking
    torch.testing.assert_close(kd_loss_linear(sh, sw, th, tw, chunk_size=2**63 - 1), kd_loss_linear(sh, sw, th, tw))


def test_fallback_when_extension_disabled():
    """Without the extension the functions materialise the logits and call kd_loss's reference: same values."""
    code = r"""
import warnings, torch
warnings.simplefilter("ignore")
from raydistill.ops import kd_loss_linear, kd_loss_linear_reference
g = torch.Generator().manual_seed(3)
sh = torch.randn(6, 8, generator=g, requires_grad=True); sw = torch.randn(30, 8, generator=g, requires_grad=True)
th = torch.randn(6, 5, generator=g); tw = torch.randn(32, 5, generator=g)
y = torch.randint(0, 30, (6,), generator=g)
loss = kd_loss_linear(sh, sw, th, tw, y, temperature=2.0, alpha=0.5, chunk_size=4); loss.backward()
a, b = sh.detach().double().requires_grad_(True), sw.detach().double().requires_grad_(True)
ref = kd_loss_linear_reference(a, b, th, tw, y, temperature=2.0, alpha=0.5); ref.backward()
assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
assert (sh.grad.double() - a.grad).abs().max() < 1e-5 and (sw.grad.double() - b.grad).abs().max() < 1e-5
print("FALLBACK_OK")
"""
    env = dict(os.environ, RAYDISTILL_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "FALLBACK_OK" in r.stdout


def test_bf16_teacher_fp32_student_and_empty_input(seeded):
    """A bf16 teacher (typical for a frozen teacher) with an fp32 student; and zero rows."""
    p = _problem(seeded, lead=(11,))
    th, tw, tb = p["th"].to(BF16), p["tw"].to(BF16), p["tb"].to(BF16)
    sh, sw, sb = _leaves(p, "cpu")
    loss = kd_loss_linear(sh, sw, th, tw, p["y"], student_bias=sb, teacher_bias=tb, temperature=2.0, alpha=0.5,
                          divergence="jsd", chunk_size=4)
    loss.backward()
    r = _leaves(p, "cpu", F64)
    ref = kd_loss_linear_reference(r[0], r[1], th, tw, p["y"], student_bias=r[2], teacher_bias=tb, temperature=2.0,
                                   alpha=0.5, divergence="jsd")
    ref.backward()
    # the teacher logits are bf16-rounded by the bf16 matmul in the op, exactly in float64 in the reference
    _check(loss, ref, (sh, sw, sb), r, rtol=2e-2, atol=1e-3)
    sh0 = torch.randn(0, 24, generator=seeded).requires_grad_(True)
    sw0 = p["sw"].clone().requires_grad_(True)
    loss0 = kd_loss_linear(sh0, sw0, torch.randn(0, 20), p["tw"], torch.zeros(0, dtype=torch.long), alpha=0.5)
    loss0.backward()
    assert loss0.item() == 0.0 and sh0.grad.shape == (0, 24) and sw0.grad.abs().max().item() == 0.0


# ------------------------------------------------------------------------------------- the CPU _out ops

@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32), (F32, F64)])
def test_out_ops_equal_allocating_ops(topk, dtypes):
    """kd_loss_linear's CPU chunks write d loss / d logits into one reused buffer through
    kd_loss_(topk_)fwd_out: same row losses and gradient as the allocating op, for every dtype mix
    (a float64 teacher computes in float64 and copies into the student-dtype buffer)."""
    g = _gen()
    s_dtype, t_dtype = dtypes
    rows, V, K = 9, 67, 5
    s = (torch.randn(rows, V, generator=g) * 3).to(s_dtype)
    lab = torch.randint(0, V, (rows,), generator=g)
    lab[::3] = -100
    if topk:
        t = (torch.randn(rows, K, generator=g) * 3).to(t_dtype)
        idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(rows)])
        args = (s, t, idx, lab, 2.0, 0.5, 0, 0.5, -100, True)
        row, grad = torch.ops.raydistill.kd_loss_topk_fwd(*args, True)
        out_op = torch.ops.raydistill.kd_loss_topk_fwd_out
    else:
        t = (torch.randn(rows, V, generator=g) * 3).to(t_dtype)
        args = (s, t, lab, 2.0, 0.5, 2, 0.3, -100, True)
        row, grad = torch.ops.raydistill.kd_loss_fwd(*args, True)
        out_op = torch.ops.raydistill.kd_loss_fwd_out
    buf = torch.full((rows, V), float("nan"), dtype=s_dtype)  # stale contents must be overwritten
    row_out = out_op(*args, None, buf)
    torch.testing.assert_close(row_out, row, rtol=0, atol=0)
    torch.testing.assert_close(buf, grad, rtol=0, atol=0)
    assert grad.abs().sum() > 0
    # bad buffers: wrong shape, wrong dtype, aliasing the student logits
    with pytest.raises(ValueError, match="grad_out must be a contiguous"):
        out_op(*args, None, torch.empty(rows, V + 1, dtype=s_dtype))
    with pytest.raises(TypeError, match="grad_out must have the student logits' dtype"):
        out_op(*args, None, torch.empty(rows, V, dtype=F64 if s_dtype != F64 else F32))
    with pytest.raises(ValueError, match="must not overlap student_logits"):
        out_op(*args, None, s)
