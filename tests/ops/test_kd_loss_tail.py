"""The top-k teacher's tail (``teacher_topk_tail``: log of its mass outside the k entries) in ``kd_loss_topk``
and ``kd_loss_linear_topk``: the compiled ops against the float64 reference on fresh random inputs, the
reference against an independent construction, gradients, bad input, opcheck and torch.compile."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kd_loss import _assert_close  # the same tolerances as the kernels without a tail

from raydistill.ops import (
    KDLossLinear,
    kd_loss,
    kd_loss_linear_reference,
    kd_loss_linear_topk,
    kd_loss_reference,
    kd_loss_topk,
)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DIVS = ["forward_kl", "jsd"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _compiled_backend(ext):
    from raydistill._build import op_backend

    for dev in DEVICES:
        assert op_backend("kd_loss_topk_fwd", dev) == "compiled"


def _gen(seed=None):
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little") if seed is None else seed)


def _teacher_topk(g, lead, V, k, temperature, dtype=F32, idx_dtype=torch.int64):
    """Top-k logits and indices of a random full teacher (k entries in random order) and its exact tail at
    ``temperature``: log of the softmax mass outside the k entries."""
    full = torch.randn(*lead, V, generator=g, dtype=F64) * 3
    vals, idx = full.topk(k, dim=-1)
    perm = torch.randperm(k, generator=g)
    vals, idx = vals[..., perm], idx[..., perm]
    lp = torch.log_softmax(full / temperature, dim=-1)
    inside = lp.gather(-1, idx).logsumexp(-1)
    tail = torch.log(-torch.expm1(inside))  # log(1 - mass on the k entries)
    return vals.to(dtype), idx.to(idx_dtype), tail


def _labels(g, lead, V, ignore_every=3):
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[::ignore_every] = -100
    return y


def _run_both(student, vals, idx, tail, labels, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = kd_loss_topk(s, vals, idx, labels, teacher_topk_tail=tail, **kw)
    w = torch.randn(loss.shape, dtype=F64) if loss.dim() else torch.tensor(1.3, dtype=F64)
    (loss * w.to(loss.dtype)).sum().backward()
    s64 = student.detach().to(F64).requires_grad_(True)
    ref = kd_loss_reference(s64, vals.to(F64), labels, teacher_topk_indices=idx,
                            teacher_topk_tail=None if tail is None else tail.to(F64), **kw)
    (ref * w).sum().backward()
    return loss, s.grad, ref, s64.grad


# ------------------------------------------------------------------------------------------------ values

@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16)],
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_topk_tail_matches_reference(divergence, reduction, dtypes):
    g = _gen()
    sd, td = dtypes
    for V, k, T, alpha in ((2, 1, 1.0, 1.0), (37, 5, 0.7, 0.6), (1000, 64, 2.0, 0.9), (4099, 16, 1.0, 0.3)):
        rows = 6
        student = (torch.randn(rows, V, generator=g, dtype=F64) * 3).to(sd)
        vals, idx, tail = _teacher_topk(g, (rows,), V, k, T, td)
        labels = _labels(g, (rows,), V)
        out = _run_both(student, vals, idx, tail.to(td), labels, temperature=T, alpha=alpha, divergence=divergence,
                        reduction=reduction)
        _assert_close(sd, *out)


@pytest.mark.parametrize("divergence", DIVS)
def test_reference_equals_full_teacher_with_rest_spread_like_the_student(divergence):
    """Independent construction: the dense teacher with (1 - R) softmax(topk / T) on the k entries and R P_s / Q
    outside (Q: the student's mass there) gives, through the full-vocabulary kd_loss, the same loss and the
    same gradient (teacher held constant) as the top-k teacher with its tail."""
    g = _gen()
    rows, V, k, T = 5, 40, 6, 1.6
    student = torch.randn(rows, V, generator=g, dtype=F64) * 2
    vals, idx, _ = _teacher_topk(g, (rows,), V, k, T, F64)
    tail = torch.log(torch.rand(rows, generator=g, dtype=F64) * 0.9 + 0.05)  # an arbitrary rest mass
    with torch.no_grad():
        ps = torch.softmax(student / T, dim=-1)
        outside = torch.ones_like(ps, dtype=torch.bool).scatter(-1, idx, False)
        q = (ps * outside).sum(-1, keepdim=True)
        r = tail.exp().unsqueeze(-1)
        dense = torch.where(outside, r * ps / q, torch.zeros_like(ps))
        dense = dense.scatter(-1, idx, (1 - r) * torch.softmax(vals / T, dim=-1))
        teacher_logits = T * dense.log()  # softmax(teacher_logits / T) == dense
    kw = dict(temperature=T, divergence=divergence, beta=0.3, reduction="sum")
    s1 = student.clone().requires_grad_(True)
    kd_ref = kd_loss(s1, teacher_logits, **kw)
    kd_ref.backward()
    s2 = student.clone().requires_grad_(True)
    ours = kd_loss_reference(s2, vals, teacher_topk_indices=idx, teacher_topk_tail=tail, **kw)
    ours.backward()
    torch.testing.assert_close(ours, kd_ref.to(F64), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-8, atol=1e-10)
    s3 = student.float().requires_grad_(True)  # and the compiled op
    kern = kd_loss_topk(s3, vals.float(), idx, teacher_topk_tail=tail.float(), **kw)
    kern.backward()
    torch.testing.assert_close(kern.to(F64), kd_ref.to(F64), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(s3.grad.to(F64), s1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVS)
def test_no_mass_outside_equals_no_tail(divergence):
    g = _gen()
    rows, V, k = 8, 300, 20
    student = torch.randn(rows, V, generator=g) * 3
    vals, idx, _ = _teacher_topk(g, (rows,), V, k, 1.0)
    labels = _labels(g, (rows,), V)
    kw = dict(temperature=1.5, alpha=0.7, divergence=divergence, reduction="none")
    a = kd_loss_topk(student, vals, idx, labels, teacher_topk_tail=torch.full((rows,), -math.inf), **kw)
    b = kd_loss_topk(student, vals, idx, labels, **kw)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    # a real tail changes the loss (the test above would pass for an op that ignored it)
    c = kd_loss_topk(student, vals, idx, labels, teacher_topk_tail=torch.full((rows,), math.log(0.3)), **kw)
    valid = labels != -100
    assert ((c - b)[valid].abs() > 1e-3).all()


def test_ignored_rows_get_zero_loss_and_gradient():
    g = _gen()
    rows, V, k = 6, 50, 7
    student = (torch.randn(rows, V, generator=g) * 2).requires_grad_(True)
    vals, idx, tail = _teacher_topk(g, (rows,), V, k, 1.0)
    labels = _labels(g, (rows,), V, ignore_every=2)
    loss = kd_loss_topk(student, vals, idx, labels, alpha=0.5, teacher_topk_tail=tail.float(), reduction="none")
    loss.sum().backward()
    ign = labels == -100
    assert (loss[ign] == 0).all() and (loss[~ign] != 0).all()
    assert (student.grad[ign] == 0).all() and (student.grad[~ign] != 0).any()


def test_student_rest_mass_is_not_lost_to_cancellation():
    """A student with almost all its mass on the teacher's k entries (rest ~1e-9): the rest term R log(R / Q)
    must come from Q summed over the outside entries, not from 1 - (mass on the k entries), which is 0 or
    negative in float32 there."""
    V, k = 64, 8
    student = torch.full((2, V), -25.0)
    idx = torch.arange(k).repeat(2, 1)
    student[:, :k] = 0.0  # Q = 56 e^-25 / (8 + 56 e^-25) ~ 1e-10
    vals = torch.randn(2, k)
    tail = torch.tensor([math.log(1e-3), math.log(0.2)])
    s = student.clone().requires_grad_(True)
    loss = kd_loss_topk(s, vals, idx, teacher_topk_tail=tail, reduction="none")
    loss.sum().backward()
    s64 = student.double().requires_grad_(True)
    ref = kd_loss_reference(s64, vals.double(), teacher_topk_indices=idx, teacher_topk_tail=tail.double(),
                            reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------------ autograd

@pytest.mark.parametrize("divergence", DIVS)
def test_gradcheck_float64(divergence):
    g = _gen()
    V, k = 13, 4
    student = (torch.randn(2, 3, V, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    vals, idx, tail = _teacher_topk(g, (2, 3), V, k, 0.9, F64)
    labels = _labels(g, (2, 3), V, ignore_every=4)
    for red in ("mean", "none"):
        def fn(s, red=red):
            return kd_loss_topk(s, vals, idx, labels, temperature=0.9, alpha=0.4, divergence=divergence, beta=0.6,
                                reduction=red, teacher_topk_tail=tail)
        assert fn(student).dtype == F64
        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opcheck():
    g = _gen()
    rows, V, k = 4, 33, 5
    s = torch.randn(rows, V, generator=g, requires_grad=True)
    vals, idx, tail = _teacher_topk(g, (rows,), V, k, 1.0)
    y = _labels(g, (rows,), V)
    # With a student that requires grad, opcheck's aot_dispatch utils fail for these ops with or without a tail
    # (their backward returns the gradient computed in forward, marked non-differentiable, and skips the
    # scaling when the upstream gradient is exactly 1); test_torch_compile_fullgraph runs them through
    # AOT autograd instead. Without grad every util runs.
    grad_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    op = torch.ops.raydistill.kd_loss_topk_fwd.default
    for div in (0, 2):
        args = (s, vals, idx, y, 1.5, 0.6, div, 0.4, -100, True, True, None, tail.float())
        torch.library.opcheck(op, args, test_utils=grad_utils)
        torch.library.opcheck(op, (s.detach(), *args[1:10], False, None, tail.float()))
    args = (s, vals, idx, tail.float(), y, 1.5, 0.6, 0, 0.4, -100, True, True, True)
    torch.library.opcheck(torch.ops.raydistill.kd_loss_reduced.default, args, test_utils=grad_utils)
    torch.library.opcheck(torch.ops.raydistill.kd_loss_reduced.default, (s.detach(), *args[1:11], False, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = _gen()
    B, S, V, k = 2, 3, 129, 9
    student = torch.randn(B, S, V, generator=g) * 2
    vals, idx, tail = _teacher_topk(g, (B, S), V, k, 2.0)
    tail = tail.float()
    y = _labels(g, (B, S), V, ignore_every=4)

    def f(s, v, i, t, lab):
        a = kd_loss_topk(s, v, i, lab, temperature=2.0, alpha=0.5, teacher_topk_tail=t)
        b = kd_loss_topk(s, v, i, lab, temperature=2.0, divergence="jsd", teacher_topk_tail=t, reduction="none")
        return a + (b * b).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    out_e, out_c = f(s1, vals, idx, tail, y), compiled(s2, vals, idx, tail, y)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(s2.grad, s1.grad)
    ref = kd_loss_reference(student.double(), vals.double(), y, temperature=2.0, alpha=0.5, teacher_topk_indices=idx,
                            teacher_topk_tail=tail.double())
    assert abs(kd_loss_topk(student, vals, idx, y, temperature=2.0, alpha=0.5, teacher_topk_tail=tail).item()
               - ref.item()) < 1e-4


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_tail_raises():
    g = _gen()
    rows, V, k = 4, 20, 3
    s = torch.randn(rows, V, generator=g)
    vals, idx, tail = _teacher_topk(g, (rows,), V, k, 1.0)
    tail = tail.float()
    pos = tail.clone()
    pos[2] = 0.25
    nan = tail.clone()
    nan[1] = math.nan
    cases = [
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=tail[:3]), ValueError, "teacher_topk_tail shape"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=tail[:, None]), ValueError, "teacher_topk_tail shape"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=tail.long()), TypeError, "floating-point"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=tail.tolist()), TypeError, "torch.Tensor"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=tail.to("meta")), ValueError, "same device"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=pos), ValueError, r"<= 0.*row 2.*0\.25"),
        (lambda: kd_loss_topk(s, vals, idx, teacher_topk_tail=nan), ValueError, "not NaN.*row 1"),
        (lambda: kd_loss_reference(s, vals, teacher_topk_tail=tail), ValueError, "teacher_topk_indices"),
        (lambda: kd_loss_linear_topk(s[:, :5], torch.randn(V, 5), vals, idx, teacher_topk_tail=pos), ValueError,
         "<= 0"),
        # the compiled op checks for itself (torch.compile skips the Python value checks)
        (lambda: torch.ops.raydistill.kd_loss_topk_fwd(s, vals, idx, None, 1.0, 1.0, 0, 0.5, -100, True, False, None,
                                                       pos), ValueError, "teacher_topk_tail must be <= 0"),
        (lambda: torch.ops.raydistill.kd_loss_topk_fwd(s, vals, idx, None, 1.0, 1.0, 0, 0.5, -100, True, False, None,
                                                       tail[:2]), ValueError, "teacher_topk_tail must have shape"),
    ]
    for fn, exc, pat in cases:
        with pytest.raises(exc, match=pat):
            fn()


# ------------------------------------------------------------------------------------------------ fused linear

def _linear_problem(g, lead, H, V, k, T):
    sh = torch.randn(*lead, H, generator=g)
    sw = torch.randn(V, H, generator=g) * (3 / H ** 0.5)
    sb = torch.randn(V, generator=g)
    vals, idx, tail = _teacher_topk(g, lead, V, k, T)
    y = _labels(g, lead, V, ignore_every=4)
    return sh, sw, sb, vals, idx, tail, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_topk_tail_matches_reference(device, divergence, reduction):
    g = _gen()
    T = 1.5
    sh, sw, sb, vals, idx, tail, y = _linear_problem(g, (3, 7), 24, 97, 9, T)
    kw = dict(temperature=T, alpha=0.6, divergence=divergence, reduction=reduction)
    leaves = [t.clone().to(device).requires_grad_(True) for t in (sh, sw, sb)]
    loss = kd_loss_linear_topk(leaves[0], leaves[1], vals.to(device), idx.to(device), y.to(device),
                               student_bias=leaves[2], chunk_size=4, teacher_topk_tail=tail.float().to(device), **kw)
    w = torch.randn(loss.shape, generator=g, dtype=F64) if loss.dim() else torch.tensor(1.7, dtype=F64)
    (loss * w.to(device=device, dtype=loss.dtype)).sum().backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (sh, sw, sb)]
    ref = kd_loss_linear_reference(ref_leaves[0], ref_leaves[1], None, None, y, student_bias=ref_leaves[2],
                                   teacher_topk_logits=vals, teacher_topk_indices=idx, teacher_topk_tail=tail, **kw)
    (ref * w).sum().backward()
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=2e-5, atol=1e-6)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, rtol=2e-5, atol=1e-6 + 2e-5 * b.grad.abs().max())
    # the module form and the materialised op give the same
    m = KDLossLinear(chunk_size=5, **kw)
    with torch.no_grad():
        torch.testing.assert_close(
            m.forward_topk(leaves[0], leaves[1], vals.to(device), idx.to(device), y.to(device), leaves[2],
                           teacher_topk_tail=tail.float().to(device)), loss.detach())
        logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2])
        torch.testing.assert_close(kd_loss_topk(logits, vals.to(device), idx.to(device), y.to(device),
                                                teacher_topk_tail=tail.float().to(device), **kw), loss.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_linear_topk_tail_opcheck_and_compile():
    torch._dynamo.reset()
    g = _gen()
    sh, sw, sb, vals, idx, tail, y = _linear_problem(g, (2, 5), 16, 41, 6, 1.0)
    tail = tail.float()
    op = torch.ops.raydistill.kd_loss_linear_fwd.default
    args = (sh.reshape(10, 16).requires_grad_(True), sw.requires_grad_(True), sb, None, None, None,
            vals.reshape(10, 6), idx.reshape(10, 6), y.reshape(10), None, 1.0, 0.5, 0, 0.5, 1, -100, True, 3, 3,
            tail.reshape(10))
    # (aot_dispatch: see test_opcheck; the compile below covers it)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for red in (0, 1):  # no gradients: every util
        torch.library.opcheck(op, (args[0].detach(), args[1].detach(), *args[2:14], red, -100, True, 3, 0, args[19]))

    def f(h, w, b):
        return kd_loss_linear_topk(h, w, vals, idx, y, student_bias=b, alpha=0.5, teacher_topk_tail=tail,
                                   chunk_size=3)

    leaves = [t.detach().clone().requires_grad_(True) for t in (sh, sw, sb)]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in (sh, sw, sb)]
    out_e = f(*leaves)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves_c)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(leaves_c, leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------ property

@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 5), V=st.integers(2, 80), kfrac=st.floats(0.01, 0.99), divergence=st.sampled_from(DIVS),
       reduction=st.sampled_from(["mean", "sum", "none"]), dtype=st.sampled_from([F32, BF16]),
       temperature=st.floats(0.3, 6.0), alpha=st.floats(0.0, 1.0), beta=st.floats(0.05, 0.95),
       rest=st.floats(1e-6, 0.999), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference(ext, rows, V, kfrac, divergence, reduction, dtype, temperature, alpha, beta,
                                    rest, seed):
    g = _gen(seed)
    k = max(1, min(V - 1, int(round(kfrac * V))))
    student = (torch.randn(rows, V, generator=g, dtype=F64) * 3).to(dtype)
    vals, idx, _ = _teacher_topk(g, (rows,), V, k, temperature)
    tail = torch.full((rows,), math.log(rest)) + torch.rand(rows, generator=g).log() * 0.1
    tail = tail.clamp(max=0.0)
    labels = _labels(g, (rows,), V)
    out = _run_both(student, vals, idx, tail, labels, temperature=temperature, alpha=alpha, divergence=divergence,
                    beta=beta, reduction=reduction)
    _assert_close(dtype, *out, grad_atol={F32: 2e-6, BF16: 1e-4}[dtype] * temperature * 10)
