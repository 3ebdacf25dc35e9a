r"""Fused knowledge-distillation loss: ``kd_loss``, ``kd_loss_topk``, ``KDLoss`` and the float64 reference.

For student logits :math:`x` and teacher logits :math:`t` (rows of the vocabulary dimension ``V``),
temperature :math:`T`, mixing weight :math:`\alpha`:

.. math::

    P_t = \mathrm{softmax}(t / T),\quad P_s = \mathrm{softmax}(x / T),\quad s = T^2 \text{ if t2\_scaling else } 1

    \ell_r = \alpha\, s\, D(P_t, P_s) + (1 - \alpha)\, \mathrm{CE}(x_r, y_r)\qquad(\mathrm{CE} \text{ at } T = 1)

with the divergence ``D``:

* ``forward_kl``: :math:`KL(P_t \| P_s) = \sum_i P_{t,i} (\log P_{t,i} - \log P_{s,i})`
* ``reverse_kl``: :math:`KL(P_s \| P_t)`
* ``jsd``: :math:`\beta\, KL(P_t \| M) + (1-\beta)\, KL(P_s \| M)`, :math:`M = \beta P_t + (1-\beta) P_s`,
  ``0 < beta < 1`` (at 0 or 1 the loss is identically 0, so those are rejected).

Terms with a zero probability factor are 0 (``0 log 0 = 0``), so ``-inf`` logits (a masked vocabulary)
work; a positive probability against a zero one gives ``+inf`` (e.g. forward KL where the teacher puts
mass on a token the student masks). NaN logits give a NaN loss.

Rows whose label equals ``ignore_index`` contribute nothing. ``reduction``: ``"mean"`` (alias
``"batchmean"``) = sum over valid rows / number of valid rows (0, with zero gradient, when no row is
valid); ``"sum"``; ``"none"`` = per-row losses of the leading shape (ignored rows 0).

Inputs are ``(..., V)`` float32 / bfloat16 / float16 (teacher dtype may differ from the student's);
the math is float32 and the loss is float32. float64 inputs are computed in float64 and give a
float64 loss (for ``gradcheck``). The gradient flows to ``student_logits`` only; the teacher is a
constant.

Top-k teacher (``kd_loss_topk``): :math:`P_t` is the softmax (at temperature T) over the ``k`` given
teacher logits, placed at ``teacher_topk_indices`` and zero elsewhere; :math:`P_s` is over the full
student vocabulary. Indices must be distinct within a row (checked: a duplicate raises ``ValueError``, except
under ``torch.compile`` where data-dependent checks are skipped). Supported divergences:
``forward_kl`` and ``jsd`` (well defined: M > 0 wherever P_s > 0). ``reverse_kl`` raises
``ValueError``: KL(P_s || P_t) is +inf whenever the student puts any mass outside the k entries,
which with a softmax student is always.

Top-k teacher with its tail (``teacher_topk_tail``, optional): ``(...)`` per row, the log of the teacher's
probability mass outside its k entries **at the loss temperature T**, :math:`\tau = \log R \le 0`
(``-inf``: no mass outside). The teacher is then the k entries with probabilities
:math:`(1 - R)\,\mathrm{softmax}(t/T)` plus one "rest" bucket of mass :math:`R`, and the student is its k
probabilities plus its own mass outside them, :math:`Q = \sum_{i \notin \text{top-k}} P_{s,i}`:

* ``forward_kl``: :math:`\sum_j P_{t,j} (\log P_{t,j} - \log P_{s,j}) + R (\log R - \log Q)`
* ``jsd``: the same ``jsd`` over these k + 1 buckets (:math:`M_{rest} = \beta R + (1-\beta) Q`).

Both equal the full-vocabulary divergence against a teacher whose rest mass is spread over the other
tokens like the student's (:math:`P_{t,i} = R\,P_{s,i} / Q` outside the top-k), so the gradient outside
the top-k is :math:`P_{s,i} (1 - R/Q)` (forward KL, times ``coef / T``). Without a tail (or with
``tau = -inf``) the teacher's k probabilities sum to 1, as before. The tail depends on the temperature
(the top-k logits do not: any shift of a row is the same distribution), so a cache must store it at the
temperature of the loss (see ``raydistill.data.topk_codec``). A tail ``> 0`` (a mass above 1) or NaN
raises ``ValueError``.

Backends: the fused C++ (CPU, at::vec + at::parallel_for) and CUDA kernels compute the row losses and
d loss / d student in one call (the gradient only when the student requires grad), so backward only
scales the stored gradient by the upstream gradient. When the extension is unavailable the same
semantics run in plain PyTorch (``_reference_impl``, autograd) with a one-time warning.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from raydistill._build import extension_available, op_backend

__all__ = ["kd_loss", "kd_loss_topk", "KDLoss", "kd_loss_reference", "MAX_TEMPERATURE"]

# The kernels compute in float32: log P_t - log P_s loses about eps * |logsumexp| per entry, and the
# T^2 scaling multiplies that loss of accuracy by T^2 while the true value stays O(1) (measured against the
# float64 reference, unit-scale logits, V=1000: relative error 2e-6 at T=10, 4e-4 at T=100, 2e-2 at
# T=1e3, a wrong sign at T=1e4). Temperatures above this bound are rejected rather than answered wrongly.
MAX_TEMPERATURE = 100.0

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = ("mean", "batchmean", "sum", "none")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX = (torch.int64, torch.int32)

# --------------------------------------------------------------------------------------------------
# backend selection (decided once at import so that torch.compile sees constants)

_EXT = extension_available()
_BACKEND = {dev: (op_backend(name, dev) if _EXT else "reference")
            for dev in ("cpu", "cuda") for name in ("kd_loss_fwd",)}
_BACKEND_TOPK = {dev: (op_backend("kd_loss_topk_fwd", dev) if _EXT else "reference") for dev in ("cpu", "cuda")}


def _compiled(device: torch.device, topk: bool) -> bool:
    table = _BACKEND_TOPK if topk else _BACKEND
    return table.get(device.type) == "compiled"


# --------------------------------------------------------------------------------------------------
# validation (one place)

def _check_number(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling,
                      *, topk: bool = False) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and 0 < float(temperature) <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number in (0, {MAX_TEMPERATURE:g}], got {temperature!r} "
                         f"(above {MAX_TEMPERATURE:g} the float32 kernels lose accuracy: see MAX_TEMPERATURE)")
    _check_number("alpha", alpha, 0.0, 1.0)
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if topk and divergence == "reverse_kl":
        raise ValueError("divergence='reverse_kl' is not supported by kd_loss_topk: KL(P_s || P_t) is +inf "
                         "when the teacher has zero probability outside its top-k entries; use 'forward_kl' "
                         "or 'jsd'")
    if divergence == "jsd":
        _check_number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
    else:
        _check_number("beta", beta, 0.0, 1.0)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:  # the ops' schemas take an int64
        raise ValueError(f"ignore_index must be in [-2**63, 2**63 - 1] (an int64), got {ignore_index}")
    if not isinstance(t2_scaling, bool):
        raise TypeError(f"t2_scaling must be a bool, got {type(t2_scaling).__name__}")


def _check_logits(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., V), got a 0-d tensor")


def _validate(student, teacher, labels, alpha, ignore_index, *, topk_indices=None, topk_tail=None) -> None:
    _check_logits("student_logits", student)
    tname = "teacher_logits" if topk_indices is None else "teacher_topk_logits"
    _check_logits(tname, teacher)
    V = student.shape[-1]
    if V < 1:
        raise ValueError(f"student_logits must have a vocabulary dimension >= 1, got shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{tname} must be on the same device as student_logits "
                         f"({student.device}), got {teacher.device}")
    if topk_indices is None:
        if teacher.shape != student.shape:
            raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} must match student_logits shape "
                             f"{tuple(student.shape)} (same leading shape and vocabulary size)")
    else:
        _check_topk(teacher, topk_indices, student.shape[:-1], V, student.device)
        _check_tail(topk_tail, student.shape[:-1], student.device)
    _check_labels(labels, student.shape[:-1], V, alpha, ignore_index, student.device)


def _check_topk(teacher, topk_indices, lead, V, device, lead_name="student_logits") -> None:
    """The top-k teacher (``teacher_topk_logits``, a checked float tensor, and its indices) against the
    student's leading shape ``lead`` and vocabulary size ``V``."""
    if teacher.shape[:-1] != lead or teacher.shape[-1] < 1:
        raise ValueError(f"teacher_topk_logits shape {tuple(teacher.shape)} must be (*leading, k) with the "
                         f"leading shape {tuple(lead)} of {lead_name} and k >= 1")
    if teacher.shape[-1] > V:
        raise ValueError(f"teacher_topk_logits has k={teacher.shape[-1]} entries per row, more than the "
                         f"vocabulary size V={V}")
    if not isinstance(topk_indices, Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(topk_indices).__name__}")
    if topk_indices.dtype not in _INDEX:
        raise TypeError(f"teacher_topk_indices must be int64 or int32, got {topk_indices.dtype}")
    if topk_indices.shape != teacher.shape:
        raise ValueError(f"teacher_topk_indices shape {tuple(topk_indices.shape)} must match "
                         f"teacher_topk_logits shape {tuple(teacher.shape)}")
    if topk_indices.device != device:
        raise ValueError(f"teacher_topk_indices must be on the same device as {lead_name} "
                         f"({device}), got {topk_indices.device}")
    if not torch.compiler.is_compiling() and topk_indices.numel() > 0:
        if bool(((topk_indices < 0) | (topk_indices >= V)).any()):
            raise ValueError(f"teacher_topk_indices must be in [0, V={V})")
        if topk_indices.shape[-1] > 1:
            # one sort over k per row (k << V): a duplicate would be counted twice in the loss but
            # the kernels' gradient does not match that sum, so duplicates are an error
            s_ = topk_indices.reshape(-1, topk_indices.shape[-1]).sort(dim=-1).values
            dup = s_[:, 1:] == s_[:, :-1]
            if bool(dup.any()):
                row = int(dup.any(dim=1).nonzero()[0, 0])
                raise ValueError(f"teacher_topk_indices must be distinct within a row; row {row} (flattened) "
                                 f"repeats index {int(s_[row, 1:][dup[row]][0])}")


def _check_tail(tail, lead, device, lead_name="student_logits") -> None:
    """``teacher_topk_tail``: None, or a float tensor of the leading shape ``lead``, values <= 0 (the log of a
    probability mass <= 1) and not NaN (the value check is skipped inside torch.compile)."""
    if tail is None:
        return
    if not isinstance(tail, Tensor):
        raise TypeError(f"teacher_topk_tail must be a torch.Tensor or None, got {type(tail).__name__}")
    if tail.dtype not in _FLOATS:
        raise TypeError(f"teacher_topk_tail must be a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got {tail.dtype}")
    if tail.shape != lead:
        raise ValueError(f"teacher_topk_tail shape {tuple(tail.shape)} must equal the leading shape of {lead_name} "
                         f"{tuple(lead)} (one value per row: the log of the teacher's mass outside its top-k)")
    if tail.device != device:
        raise ValueError(f"teacher_topk_tail must be on the same device as {lead_name} ({device}), got {tail.device}")
    if not torch.compiler.is_compiling() and tail.numel() > 0:
        bad = torch.isnan(tail) | (tail > 0)
        if bool(bad.any()):
            row = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"teacher_topk_tail must be <= 0 (the log of a probability mass <= 1) and not NaN; "
                             f"row {row} (flattened) is {float(tail.reshape(-1)[row])}")


def _check_labels(labels, lead, V, alpha, ignore_index, device, lead_name="student_logits") -> None:
    """Hard labels: None only when alpha == 1; else int64/int32 of the leading shape ``lead`` of
    ``lead_name``, in [0, V) or ``ignore_index`` (the value check is skipped inside torch.compile)."""
    if labels is None:
        if alpha < 1:
            raise ValueError(f"labels are required when alpha < 1 (got alpha={alpha}); the hard-label "
                             "cross-entropy term needs them")
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in _INDEX:
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape of {lead_name} "
                         f"{tuple(lead)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as {lead_name} ({device}), "
                         f"got {labels.device}")
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, V={V}) or equal ignore_index={ignore_index}; "
                             f"got {int(labels[bad][0])}")


# --------------------------------------------------------------------------------------------------
# pure-PyTorch implementation (the float64 reference and the fallback)

def _xlogy_diff(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    """sum_i p_i (lp_i - lq_i) with 0 where p_i == 0 (safe gradients through the masked entries)."""
    nz = p != 0
    return (p * torch.where(nz, lp - lq, torch.zeros_like(lp))).sum(-1)


def _divergence(lpt: Tensor, lps: Tensor, divergence: str, beta: float) -> Tensor:
    pt, ps = lpt.exp(), lps.exp()
    if divergence == "forward_kl":
        return _xlogy_diff(pt, lpt, lps)
    if divergence == "reverse_kl":
        return _xlogy_diff(ps, lps, lpt)
    m = beta * pt + (1 - beta) * ps
    pos = m > 0
    lm = torch.where(pos, torch.where(pos, m, torch.ones_like(m)).log(), torch.zeros_like(m))
    return beta * _xlogy_diff(pt, lpt, lm) + (1 - beta) * _xlogy_diff(ps, lps, lm)


def _topk_tail_divergence(lps: Tensor, lpt: Tensor, idx: Tensor, tail: Tensor, divergence: str,
                          beta: float) -> Tensor:
    """The divergence between the k + 1 buckets (top-k entries + rest) of the teacher, ``(1 - R) softmax`` on the
    k entries and ``R = exp(tail)`` outside, and of the student, its k probabilities and its mass outside them."""
    tau = tail.reshape(-1, 1).to(lps.dtype)
    lw = torch.log(-torch.expm1(tau))  # log(1 - R)
    outside = torch.ones_like(lps, dtype=torch.bool).scatter(-1, idx, False)
    lq_rest = torch.logsumexp(torch.where(outside, lps, torch.full_like(lps, -math.inf)), dim=-1, keepdim=True)
    lp_b = torch.cat([lpt + lw, tau], dim=-1)
    lq_b = torch.cat([lps.gather(-1, idx), lq_rest], dim=-1)
    return _divergence(lp_b, lq_b, divergence, beta)


def _reference_impl(student, teacher, labels, topk_indices, *, temperature, alpha, divergence, beta,
                    reduction, ignore_index, t2_scaling, compute_dtype, topk_tail=None) -> Tensor:
    V = student.shape[-1]
    lead = student.shape[:-1]
    x = student.reshape(-1, V).to(compute_dtype)
    t = teacher.detach().reshape(-1, teacher.shape[-1]).to(compute_dtype)
    lps = torch.log_softmax(x / temperature, dim=-1)
    lpt = torch.log_softmax(t / temperature, dim=-1)
    if topk_tail is not None:
        div = _topk_tail_divergence(lps, lpt, topk_indices.reshape(-1, topk_indices.shape[-1]).long(),
                                    topk_tail.detach(), divergence, beta)
    elif topk_indices is not None:
        idx = topk_indices.reshape(-1, topk_indices.shape[-1]).long()
        if divergence == "forward_kl":
            div = _xlogy_diff(lpt.exp(), lpt, lps.gather(-1, idx))
        else:  # jsd against the dense teacher distribution (zero outside the k entries)
            pt_dense = torch.zeros_like(lps).scatter(-1, idx, lpt.exp())
            lpt_dense = torch.where(pt_dense > 0, pt_dense.log(), torch.full_like(pt_dense, -math.inf))
            div = _divergence(lpt_dense, lps, divergence, beta)
    else:
        div = _divergence(lpt, lps, divergence, beta)
    scale = temperature * temperature if t2_scaling else 1.0
    row = alpha * scale * div if alpha != 0 else torch.zeros_like(div)
    if labels is not None:
        lab = labels.reshape(-1).long()
        valid = lab != ignore_index
        if alpha != 1:
            ce = torch.nn.functional.cross_entropy(x, torch.where(valid, lab, torch.zeros_like(lab)),
                                                   reduction="none")
            row = row + (1 - alpha) * ce
        row = torch.where(valid, row, torch.zeros_like(row))
        n_valid = valid.sum()
    else:
        n_valid = torch.tensor(row.shape[0], device=row.device)
    return _reduce(row, n_valid, reduction, lead)


def _reduce(row: Tensor, n_valid: Tensor, reduction: str, lead) -> Tensor:
    if reduction == "none":
        return row.reshape(lead)
    total = row.sum()
    if reduction == "sum":
        return total
    return total / n_valid.clamp(min=1).to(total.dtype)


def _out_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def kd_loss_reference(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=1.0,
                      divergence="forward_kl", beta=0.5, reduction="mean", ignore_index=-100,
                      t2_scaling=True, teacher_topk_indices=None, teacher_topk_tail=None) -> Tensor:
    """float64 pure-PyTorch reference of :func:`kd_loss` (and of :func:`kd_loss_topk` when
    ``teacher_topk_indices`` is given, with ``teacher_topk_tail``). Same arguments and semantics; the loss is
    float64."""
    if teacher_topk_tail is not None and teacher_topk_indices is None:
        raise ValueError("teacher_topk_tail needs teacher_topk_indices (a top-k teacher)")
    _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling,
                      topk=teacher_topk_indices is not None)
    _validate(student_logits, teacher_logits, labels, alpha, ignore_index, topk_indices=teacher_topk_indices,
              topk_tail=teacher_topk_tail)
    return _reference_impl(student_logits, teacher_logits, labels, teacher_topk_indices,
                           temperature=float(temperature), alpha=float(alpha), divergence=divergence,
                           beta=float(beta), reduction=reduction, ignore_index=int(ignore_index),
                           t2_scaling=t2_scaling, compute_dtype=torch.float64, topk_tail=teacher_topk_tail)


# --------------------------------------------------------------------------------------------------
# the compiled ops: fake (meta) implementations and autograd

def _fake_fwd(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, t2_scaling,
              compute_grad, scale=None):
    rows, V = student.shape
    loss = student.new_empty((rows,), dtype=_out_dtype(student, teacher))
    grad = student.new_empty((rows, V)) if compute_grad else student.new_empty((0,))
    return loss, grad


def _fake_topk_fwd(student, teacher_topk, teacher_topk_indices, labels, temperature, alpha, divergence, beta,
                   ignore_index, t2_scaling, compute_grad, scale=None, teacher_topk_tail=None):
    return _fake_fwd(student, teacher_topk, labels, temperature, alpha, divergence, beta, ignore_index,
                     t2_scaling, compute_grad)


def _setup_context(ctx, inputs, output):
    # The gradient output is not differentiable, and autograd must not materialize a rows x V zero
    # "gradient" for it in backward (that would double the peak memory).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_grad):
    (g,) = ctx.saved_tensors
    if grad_loss is None:
        return None
    if g.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("kd_loss: backward needs the gradient computed in forward (compute_grad=True); "
                           "the student did not require grad when the loss was computed")
    scale = grad_loss.unsqueeze(-1).to(g.dtype)
    if torch.compiler.is_compiling() or g.dtype == torch.float64:
        return g * scale
    # The stored gradient is private to this graph: scale it in place, so forward + backward allocate one
    # rows x V buffer in all. Backward through the same graph twice (retain_graph) then fails in autograd's
    # saved-tensor version check instead of returning a wrong gradient. float64 (gradcheck, debugging)
    # scales out of place, so there retain_graph works.
    return g.mul_(scale)


def _backward_full(ctx, grad_loss, grad_grad):
    return (_backward(ctx, grad_loss, grad_grad),) + (None,) * 10


def _backward_topk(ctx, grad_loss, grad_grad):
    return (_backward(ctx, grad_loss, grad_grad),) + (None,) * 12


# Reductions "mean"/"sum" (the usual training call) run through one more op that returns the reduced
# loss, with the kernel scaling every row by 1 / (valid rows) for "mean" (the ``scale`` argument of the
# C++ ops). Its gradient is then final: backward returns it untouched when the upstream gradient is
# exactly 1 (the loss is the last op, the common case; Liger-Kernel does the same), instead of re-reading
# and re-writing the rows x V gradient. Checking "exactly 1" reads one number from the device (a sync on
# CUDA). Under torch.compile the scaling stays (out of place, fusable).

def _reduced_impl(student: Tensor, teacher: Tensor, topk_indices: Tensor | None, topk_tail: Tensor | None,
                  labels: Tensor | None, temperature: float, alpha: float, divergence: int, beta: float,
                  ignore_index: int, t2_scaling: bool, compute_grad: bool, mean: bool) -> tuple[Tensor, Tensor]:
    scale = None
    if mean:
        if labels is not None:
            n_valid = (labels != ignore_index).sum()
        else:
            n_valid = torch.full((), student.shape[0], device=student.device)
        scale = n_valid.clamp(min=1).to(torch.float32).reciprocal().reshape(1)
    if topk_indices is None:
        row, grad = torch.ops.raydistill.kd_loss_fwd(student, teacher, labels, temperature, alpha, divergence,
                                                     beta, ignore_index, t2_scaling, compute_grad, scale)
    else:
        row, grad = torch.ops.raydistill.kd_loss_topk_fwd(student, teacher, topk_indices, labels, temperature,
                                                          alpha, divergence, beta, ignore_index, t2_scaling,
                                                          compute_grad, scale, topk_tail)
    return row.sum(), grad


def _reduced_fake(student, teacher, topk_indices, topk_tail, labels, temperature, alpha, divergence, beta,
                  ignore_index, t2_scaling, compute_grad, mean):
    loss = student.new_empty((), dtype=_out_dtype(student, teacher))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return loss, grad


def _reduced_backward(ctx, grad_loss, _grad_grad):
    (g,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 13
    if g.numel() == 0 and ctx.student_numel != 0:
        raise RuntimeError("kd_loss: backward needs the gradient computed in forward (compute_grad=True); "
                           "the student did not require grad when the loss was computed")
    if torch.compiler.is_compiling():
        out = g * grad_loss.to(g.dtype)
    elif bool(grad_loss == 1):
        out = g  # already d loss / d student: nothing to scale
    else:
        out = g.mul_(grad_loss.to(g.dtype))  # private to this graph (see _backward)
    return (out,) + (None,) * 12


def _reduced_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.student_numel = inputs[0].numel()
    ctx.save_for_backward(output[1])


if _EXT:
    _kd_loss_reduced = torch.library.custom_op("raydistill::kd_loss_reduced", mutates_args=())(_reduced_impl)
    _kd_loss_reduced.register_fake(_reduced_fake)
    _kd_loss_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)
    torch.library.register_fake("raydistill::kd_loss_fwd")(_fake_fwd)
    torch.library.register_fake("raydistill::kd_loss_topk_fwd")(_fake_topk_fwd)
    torch.library.register_autograd("raydistill::kd_loss_fwd", _backward_full, setup_context=_setup_context)
    torch.library.register_autograd("raydistill::kd_loss_topk_fwd", _backward_topk, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public API

def _run(student, teacher, labels, topk_indices, temperature, alpha, divergence, beta, reduction, ignore_index,
         t2_scaling, topk_tail=None) -> Tensor:
    topk = topk_indices is not None
    _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling, topk=topk)
    _validate(student, teacher, labels, alpha, ignore_index, topk_indices=topk_indices, topk_tail=topk_tail)
    temperature, alpha, beta, ignore_index = float(temperature), float(alpha), float(beta), int(ignore_index)
    if not _compiled(student.device, topk):
        return _reference_impl(student, teacher, labels, topk_indices, temperature=temperature, alpha=alpha,
                               divergence=divergence, beta=beta, reduction=reduction, ignore_index=ignore_index,
                               t2_scaling=t2_scaling, compute_dtype=_out_dtype(student, teacher), topk_tail=topk_tail)
    V = student.shape[-1]
    lead = student.shape[:-1]
    x = student.reshape(-1, V)
    t = teacher.detach().reshape(-1, teacher.shape[-1])
    lab = labels.reshape(-1) if labels is not None else None
    tail = topk_tail.detach().reshape(-1) if topk_tail is not None else None
    compute_grad = bool(torch.is_grad_enabled() and student.requires_grad)
    div = DIVERGENCES[divergence]
    if reduction != "none" and _out_dtype(student, teacher) != torch.float64:
        loss, _ = _kd_loss_reduced(x, t, topk_indices.reshape(-1, topk_indices.shape[-1]) if topk else None, tail,
                                   lab, temperature, alpha, div, beta, ignore_index, t2_scaling, compute_grad,
                                   reduction in ("mean", "batchmean"))
        return loss
    if topk:
        idx = topk_indices.reshape(-1, topk_indices.shape[-1])
        row, _ = torch.ops.raydistill.kd_loss_topk_fwd(x, t, idx, lab, temperature, alpha, div, beta,
                                                       ignore_index, t2_scaling, compute_grad, None, tail)
    else:
        row, _ = torch.ops.raydistill.kd_loss_fwd(x, t, lab, temperature, alpha, div, beta, ignore_index,
                                                  t2_scaling, compute_grad)
    if reduction in ("mean", "batchmean"):
        n_valid = (lab != ignore_index).sum() if lab is not None else torch.tensor(row.shape[0], device=row.device)
    else:
        n_valid = None
    return _reduce(row, n_valid, reduction, lead)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            reduction: str = "mean", ignore_index: int = -100, t2_scaling: bool = True) -> Tensor:
    r"""Knowledge-distillation loss between student and teacher logits (see the module docstring).

    ``loss_r = alpha * s * D(softmax(teacher/T), softmax(student/T)) + (1 - alpha) * CE(student_r, label_r)``
    with ``s = T**2`` if ``t2_scaling``; ``D`` is ``forward_kl`` (KL(P_t||P_s)), ``reverse_kl``
    (KL(P_s||P_t)) or ``jsd`` (beta KL(P_t||M) + (1-beta) KL(P_s||M), M = beta P_t + (1-beta) P_s).

    Args:
        student_logits: ``(..., V)`` float tensor; receives the gradient.
        teacher_logits: ``(..., V)`` float tensor (any float dtype); treated as a constant.
        labels: ``(...)`` int64/int32 hard labels in ``[0, V)`` or ``ignore_index``; required if alpha < 1.
        temperature: 0 < T <= MAX_TEMPERATURE (100). alpha: in [0, 1]. beta: jsd weight in (0, 1).
        reduction: ``"mean"``/``"batchmean"`` (over valid rows), ``"sum"`` or ``"none"``.
        t2_scaling: multiply the divergence by T**2 (keeps gradient magnitudes comparable across T).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for ``"none"``.
    """
    return _run(student_logits, teacher_logits, labels, None, temperature, alpha, divergence, beta, reduction,
                ignore_index, t2_scaling)


def kd_loss_topk(student_logits: Tensor, teacher_topk_logits: Tensor, teacher_topk_indices: Tensor,
                 labels: Tensor | None = None, *, temperature: float = 1.0, alpha: float = 1.0,
                 divergence: str = "forward_kl", beta: float = 0.5, reduction: str = "mean",
                 ignore_index: int = -100, t2_scaling: bool = True,
                 teacher_topk_tail: Tensor | None = None) -> Tensor:
    r""":func:`kd_loss` with a top-k teacher: ``P_t = softmax(teacher_topk_logits / T)`` over the k given
    entries, at ``teacher_topk_indices`` (``(..., k)`` int64/int32, distinct per row), zero elsewhere;
    ``P_s`` over the full student vocabulary. ``divergence``: ``forward_kl`` or ``jsd``; ``reverse_kl``
    raises ``ValueError`` (it is +inf whenever the student has mass outside the k entries).

    ``teacher_topk_tail``: optional ``(...)`` float tensor, the log of the teacher's probability mass outside
    its k entries at temperature ``temperature`` (<= 0; ``-inf``: none). The teacher is then ``(1 - R)
    softmax(teacher_topk_logits / T)`` on the k entries plus a rest bucket of mass ``R = exp(tail)``, compared
    with the student's mass outside the k entries (see the module docstring)."""
    return _run(student_logits, teacher_topk_logits, labels, teacher_topk_indices, temperature, alpha, divergence,
                beta, reduction, ignore_index, t2_scaling, teacher_topk_tail)


class _KDLossOptions(nn.Module):
    """The loss options every loss module holds, checked once at construction (shared by :class:`KDLoss`
    and ``KDLossLinear``)."""

    def __init__(self, *, temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, reduction: str = "mean", ignore_index: int = -100, t2_scaling: bool = True):
        super().__init__()
        _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = float(beta)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.t2_scaling = t2_scaling

    def _options(self) -> dict:
        return dict(temperature=self.temperature, alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                    reduction=self.reduction, ignore_index=self.ignore_index, t2_scaling=self.t2_scaling)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"beta={self.beta}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"t2_scaling={self.t2_scaling}")


class KDLoss(_KDLossOptions):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature=2.0, alpha=0.5)(student, teacher, labels)``."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, labels, **self._options())
