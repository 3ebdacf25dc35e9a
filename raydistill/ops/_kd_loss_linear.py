r"""Fused linear + distillation loss: ``kd_loss_linear``, ``kd_loss_linear_topk``, ``KDLossLinear``.

The value and the gradients equal those of

.. code-block:: python

    kd_loss(student_hidden @ student_weight.T (+ student_bias),
            (teacher_hidden @ teacher_weight.T (+ teacher_bias))[..., :V], labels, ...)

(``kd_loss_topk`` on the student logits for the top-k form), but the ``(tokens x V)`` logits are never
materialised. Rows are processed in chunks of ``chunk_size``; per chunk:

1. student logits ``h_c @ W_s^T (+ b_s)`` and teacher logits ``h_t,c @ W_t[:V]^T (+ b_t[:V])`` (the
   padded teacher rows ``V..V_t`` are never multiplied; the teacher is a constant);
2. the fused ``raydistill::kd_loss_fwd`` (``kd_loss_topk_fwd``) kernel on the chunk, which returns the
   per-row losses and ``g = d loss_r / d logits``;
3. the two backward matmuls of the chunk: ``grad_hidden[c] = g @ W_s``, ``grad_W_s += g^T @ h_c``,
   ``grad_b_s += g.sum(0)`` (``grad_W_s``/``grad_b_s`` accumulate in float32 when the weight is
   bfloat16/float16).

So the whole gradient is computed in the forward pass and peak extra memory is O(chunk x V) plus the
gradients themselves; the backward only scales the stored gradients by the upstream gradient (and
skips that when it is exactly 1). ``reduction="mean"`` divides by the number of valid rows of the whole
input (counted once, up front). ``reduction="none"`` cannot use a gradient precomputed with unit row
weights, so its forward computes the losses only and its backward recomputes the chunks with the
upstream per-row weights (twice the matmuls of the forward, still O(chunk x V) memory).

``chunk_size=None`` picks ``auto_chunk_size``: the largest chunk whose temporaries (student logits,
teacher logits, d loss / d logits: ``V x (2 x student itemsize + teacher itemsize)`` bytes per row) fit
in ``CHUNK_BUDGET_BYTES`` for the device, balanced so all chunks have (nearly) the same number of rows.

The op is a ``torch.library.custom_op`` (``raydistill::kd_loss_linear_fwd``) with a fake (meta)
implementation and a registered autograd formula, so it works under ``torch.compile(fullgraph=True)``.
Without the compiled ``kd_loss`` kernel for the device (extension disabled or not built), the
functions materialise both logits and call :func:`kd_loss` (which then runs its PyTorch reference with a
one-time warning): same values, but O(tokens x V) memory.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from raydistill.ops._kd_loss import (
    DIVERGENCES,
    _check_labels,
    _check_logits,
    _check_tail,
    _check_topk,
    _compiled,
    _KDLossOptions,
    _validate_scalars,
    kd_loss,
    kd_loss_reference,
    kd_loss_topk,
)

__all__ = ["kd_loss_linear", "kd_loss_linear_topk", "KDLossLinear", "kd_loss_linear_reference",
           "auto_chunk_size", "CHUNK_BUDGET_BYTES"]

#: Memory budget of one chunk's temporaries (student logits + teacher logits + d loss / d logits), by
#: device type. CPU: 96 MiB (256 rows at V=32000 fp32, 512 in bf16): each chunk re-reads and re-writes the
#: ``grad_weight`` accumulator (V x H) once, a few percent of the chunk's ``grad_weight`` matmul at these
#: sizes, so much smaller chunks spend the time there; larger ones only add memory (192 MiB cost the scale
#: rehearsal's bf16 step 125 MiB more at its peak). CUDA: 1 GiB (~1400 rows at V=128256 bf16; Liger uses 1024).
CHUNK_BUDGET_BYTES = {"cpu": 96 << 20, "cuda": 1 << 30}
_LOW = (torch.bfloat16, torch.float16)
_RED = {"none": 0, "mean": 1, "batchmean": 1, "sum": 2}
_NONE, _MEAN, _SUM = 0, 1, 2
# grad_mask bits: which gradients the forward computes
_G_HIDDEN, _G_WEIGHT, _G_BIAS = 1, 2, 4


def _out_ops_available() -> bool:
    """Whether the loaded extension has the CPU ``kd_loss_fwd_out`` / ``kd_loss_topk_fwd_out`` ops (an older
    cached build may not)."""
    try:
        torch.ops.raydistill.kd_loss_fwd_out
        torch.ops.raydistill.kd_loss_topk_fwd_out
    except (AttributeError, RuntimeError):
        return False
    return True


def auto_chunk_size(rows: int, V: int, device_type: str, student_itemsize: int, teacher_itemsize: int) -> int:
    """The chunk size ``chunk_size=None`` uses: ``budget // (V * (2 * student_itemsize + teacher_itemsize))``
    rows (``teacher_itemsize=0`` for a top-k teacher), at least 1, then balanced: the same number of chunks
    of ``ceil(rows / n_chunks)`` rows, so no chunk is a small remainder."""
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cuda"])
    per_row = max(1, V * (2 * student_itemsize + teacher_itemsize))
    c = max(1, budget // per_row)
    if rows <= 0:
        return c
    n_chunks = -(-rows // c)
    return -(-rows // n_chunks)


# --------------------------------------------------------------------------------------------------
# validation (one place)

def _check_linear(prefix: str, hidden, weight, bias, device=None) -> None:
    hn, wn, bn = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    _check_logits(hn, hidden)
    _check_logits(wn, weight)
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{wn} must be 2-D (V, H) with V >= 1, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hn} hidden size {hidden.shape[-1]} (last dim of shape {tuple(hidden.shape)}) must "
                         f"equal {wn}.shape[1] = {weight.shape[1]} ({wn} is (V, H))")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hn} dtype {hidden.dtype} must equal {wn} dtype {weight.dtype}")
    device = hidden.device if device is None else device
    for name, t in ((hn, hidden), (wn, weight)):
        if t.device != device:
            raise ValueError(f"{name} must be on the same device as student_hidden ({device}), got {t.device}")
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{bn} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{bn} dtype {bias.dtype} must equal {wn} dtype {weight.dtype}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{bn} shape {tuple(bias.shape)} must be ({weight.shape[0]},), the rows of {wn}")
    if bias.device != device:
        raise ValueError(f"{bn} must be on the same device as student_hidden ({device}), got {bias.device}")


def _validate(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              teacher_topk_logits, teacher_topk_indices, labels, alpha, ignore_index, chunk_size,
              teacher_topk_tail=None) -> None:
    _check_linear("student", student_hidden, student_weight, student_bias)
    device, lead, V = student_hidden.device, student_hidden.shape[:-1], student_weight.shape[0]
    if teacher_topk_logits is None:
        if teacher_topk_tail is not None:
            raise ValueError("teacher_topk_tail needs a top-k teacher (teacher_topk_logits / teacher_topk_indices)")
        _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias, device)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                             f"student_hidden leading shape {tuple(lead)}")
        if teacher_weight.shape[0] < V:
            raise ValueError(f"teacher_weight has V_t={teacher_weight.shape[0]} rows, fewer than the student's "
                             f"vocabulary V={V} (student_weight.shape[0]); V_t must be V or V plus padding")
    else:
        _check_logits("teacher_topk_logits", teacher_topk_logits)
        _check_topk(teacher_topk_logits, teacher_topk_indices, lead, V, device, lead_name="student_hidden")
        _check_tail(teacher_topk_tail, lead, device, lead_name="student_hidden")
    _check_labels(labels, lead, V, alpha, ignore_index, device, lead_name="student_hidden")
    _check_chunk_size(chunk_size)


INT64_MAX = 2**63 - 1


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if not 1 <= chunk_size <= INT64_MAX:  # the op's schema takes an int64
        raise ValueError(f"chunk_size must be in [1, 2**63 - 1] (rows per chunk; any value >= the number of rows "
                         f"is one chunk) or None (automatic), got {chunk_size}")


# --------------------------------------------------------------------------------------------------
# the chunked computation (runs inside the custom op: no autograd here)

_ADDMM_OUT_DTYPE = {"cuda": True}  # cleared if this torch lacks addmm(out_dtype=float32) for the device


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``. ``acc`` may be float32 while ``a``/``b`` are bf16/fp16: on CUDA one cuBLAS call
    with a float32 output (``addmm(out_dtype=float32)``, torch >= 2.8); elsewhere in row blocks of at most
    64 MiB of low-precision product, each added to the float32 accumulator."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if _ADDMM_OUT_DTYPE.get(acc.device.type):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[acc.device.type] = False
    step = max(1, (64 << 20) // max(1, b.shape[1] * a.element_size()))
    for r0 in range(0, a.shape[0], step):
        acc[r0:r0 + step].add_(torch.mm(a[r0:r0 + step], b))


def _linear_out(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
             teacher_topk_logits, teacher_topk_indices, labels, row_weight, temperature, alpha, divergence, beta,
             reduction, ignore_index, t2_scaling, chunk_size, grad_mask, teacher_topk_tail=None):
    sh, sw, sb = student_hidden.contiguous(), student_weight.contiguous(), student_bias
    rows, H = sh.shape
    V = sw.shape[0]
    topk = teacher_topk_logits is not None
    dev = sh.device
    if topk:
        tv, ti = teacher_topk_logits.contiguous(), teacher_topk_indices.contiguous()
        t_dtype = tv.dtype
    else:
        th = teacher_hidden.contiguous()
        tw = teacher_weight[:V].contiguous()  # padded teacher vocabulary: rows V..V_t never multiplied
        tb = None if teacher_bias is None else teacher_bias[:V]
        t_dtype = th.dtype
    out_dtype = torch.float64 if torch.float64 in (sh.dtype, t_dtype) else torch.float32
    need_h = bool(grad_mask & _G_HIDDEN)
    need_w = bool(grad_mask & _G_WEIGHT)
    need_b = bool(grad_mask & _G_BIAS) and sb is not None
    need = need_h or need_w or need_b
    acc_dtype = torch.float32 if sw.dtype in _LOW else sw.dtype

    loss_rows = torch.empty(rows, dtype=out_dtype, device=dev)
    gh = torch.empty_like(sh) if need_h else sh.new_empty(0)
    gw = torch.zeros(V, H, dtype=acc_dtype, device=dev) if need_w else sw.new_empty(0)
    gb = torch.zeros(V, dtype=acc_dtype, device=dev) if need_b else sw.new_empty(0)
    c = max(1, min(int(chunk_size), rows))
    s_buf = torch.empty(c if rows else 0, V, dtype=sh.dtype, device=dev)
    t_buf = None if topk else torch.empty(c if rows else 0, V, dtype=t_dtype, device=dev)
    # CPU: the kernel writes d loss / d logits into one reused buffer (a fresh (chunk x V) tensor per chunk
    # is a fresh mmap, page-faulted in every time); CUDA's caching allocator already reuses the block.
    g_buf = (torch.empty(c if rows else 0, V, dtype=sh.dtype, device=dev)
             if need and dev.type == "cpu" and _out_ops_available() else None)
    w_all = None if row_weight is None else row_weight.reshape(-1).to(sh.dtype)
    for c0 in range(0, rows, c):
        c1 = min(rows, c0 + c)
        hc = sh[c0:c1]
        s = _linear_out(hc, sw, sb, s_buf[:c1 - c0])
        lab = None if labels is None else labels[c0:c1]
        g = None if g_buf is None else g_buf[:c1 - c0]
        if topk:
            tl = None if teacher_topk_tail is None else teacher_topk_tail[c0:c1]
            if g is None:
                row, g = torch.ops.raydistill.kd_loss_topk_fwd(s, tv[c0:c1], ti[c0:c1], lab, temperature, alpha,
                                                               divergence, beta, ignore_index, t2_scaling, need,
                                                               None, tl)
            else:
                row = torch.ops.raydistill.kd_loss_topk_fwd_out(s, tv[c0:c1], ti[c0:c1], lab, temperature, alpha,
                                                                divergence, beta, ignore_index, t2_scaling, None, g,
                                                                tl)
        else:
            t = _linear_out(th[c0:c1], tw, tb, t_buf[:c1 - c0])
            if g is None:
                row, g = torch.ops.raydistill.kd_loss_fwd(s, t, lab, temperature, alpha, divergence, beta,
                                                          ignore_index, t2_scaling, need)
            else:
                row = torch.ops.raydistill.kd_loss_fwd_out(s, t, lab, temperature, alpha, divergence, beta,
                                                           ignore_index, t2_scaling, None, g)
        loss_rows[c0:c1] = row
        if not need:
            continue
        w = None if w_all is None else w_all[c0:c1].unsqueeze(1)
        if need_h:
            torch.mm(g, sw, out=gh[c0:c1])
            if w is not None:
                gh[c0:c1].mul_(w)
        if need_w:
            _acc_mm(gw, g.t(), hc if w is None else hc * w)
        if need_b:
            gb.add_(g.sum(0, dtype=acc_dtype) if w is None else torch.mv(g.t(), w.squeeze(1)).to(acc_dtype))
        del g
    del s_buf, t_buf, g_buf

    if reduction == _NONE:
        loss = loss_rows
    else:
        loss = loss_rows.sum()
        if reduction == _MEAN:
            n_valid = (labels != ignore_index).sum() if labels is not None else torch.tensor(rows, device=dev)
            n_valid = n_valid.clamp(min=1)
            loss = loss / n_valid.to(loss.dtype)
            if need:  # one multiply of the (small) gradients instead of one per chunk of logits
                inv = 1.0 / n_valid.to(acc_dtype)
                for t_ in (gh, gw, gb):
                    if t_.numel():
                        t_.mul_(inv)
    if need_w and gw.dtype != sw.dtype:
        gw = gw.to(sw.dtype)
    if need_b and gb.dtype != sb.dtype:
        gb = gb.to(sb.dtype)
    return loss, gh, gw, gb


# --------------------------------------------------------------------------------------------------
# the custom op: fake (meta) implementation and autograd

_SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
           "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_topk_logits, Tensor? teacher_topk_indices, "
           "Tensor? labels, Tensor? row_weight, float temperature, float alpha, int divergence, float beta, "
           "int reduction, int ignore_index, bool t2_scaling, int chunk_size, int grad_mask, "
           "Tensor? teacher_topk_tail=None) -> (Tensor, Tensor, Tensor, Tensor)")

_op = torch.library.custom_op("raydistill::kd_loss_linear_fwd", _chunked, mutates_args=(), schema=_SCHEMA)


@_op.register_fake
def _fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
          teacher_topk_logits, teacher_topk_indices, labels, row_weight, temperature, alpha, divergence, beta,
          reduction, ignore_index, t2_scaling, chunk_size, grad_mask, teacher_topk_tail=None):
    rows, H = student_hidden.shape
    V = student_weight.shape[0]
    t_dtype = (teacher_topk_logits if teacher_topk_logits is not None else teacher_hidden).dtype
    out_dtype = torch.float64 if torch.float64 in (student_hidden.dtype, t_dtype) else torch.float32
    loss = student_hidden.new_empty((rows,) if reduction == _NONE else (), dtype=out_dtype)
    gh = student_hidden.new_empty((rows, H) if grad_mask & _G_HIDDEN else (0,))
    gw = student_weight.new_empty((V, H) if grad_mask & _G_WEIGHT else (0,))
    has_b = bool(grad_mask & _G_BIAS) and student_bias is not None
    gb = student_weight.new_empty((V,) if has_b else (0,))
    return loss, gh, gw, gb


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[14]
    ctx.grad_mask = inputs[18]
    ctx.has_bias = inputs[2] is not None
    if ctx.reduction == _NONE:  # backward recomputes the chunks with the upstream row weights
        ctx.save_for_backward(*inputs[:9], inputs[19])
        ctx.scalars = inputs[10:19]
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    n_inputs = 20
    if grad_loss is None:
        return (None,) * n_inputs
    mask = ctx.grad_mask
    if ctx.reduction == _NONE:
        saved = ctx.saved_tensors
        _, gh, gw, gb = _op(*saved[:9], grad_loss.detach(), *ctx.scalars, saved[9])
    else:
        gh, gw, gb = ctx.saved_tensors
        if (gh.numel() + gw.numel() + gb.numel()) == 0 and mask:
            raise RuntimeError("kd_loss_linear: backward needs the gradients computed in forward; the inputs "
                               "did not require grad when the loss was computed")
        if torch.compiler.is_compiling() or gh.dtype == torch.float64 or gw.dtype == torch.float64:
            # (float64: out of place, so gradcheck / retain_graph work)
            gh, gw, gb = (t * grad_loss.to(t.dtype) for t in (gh, gw, gb))
        elif not bool(grad_loss == 1):  # CPU: free; CUDA: a one-element compare
            # the stored gradients are private to this graph: scale in place (backward twice through the same
            # graph with retain_graph then fails autograd's saved-tensor version check instead of being wrong)
            gh, gw, gb = (t.mul_(grad_loss.to(t.dtype)) for t in (gh, gw, gb))
    return ((gh if mask & _G_HIDDEN else None), (gw if mask & _G_WEIGHT else None),
            (gb if (mask & _G_BIAS and ctx.has_bias) else None)) + (None,) * (n_inputs - 3)


_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public API

def _run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         teacher_topk_logits, teacher_topk_indices, labels, temperature, alpha, divergence, beta, reduction,
         ignore_index, t2_scaling, chunk_size, teacher_topk_tail=None) -> Tensor:
    low = _autocast_dtype(student_hidden)
    if low is not None:  # under torch.autocast: the matmuls' inputs in its dtype, as for a plain linear layer
        cast = [None if t is None or t.dtype != torch.float32 else t.to(low)
                for t in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)]
        keep = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        args = [c if c is not None else k for c, k in zip(cast, keep)]
        with torch.autocast(student_hidden.device.type, enabled=False):
            return _run(*args, teacher_topk_logits, teacher_topk_indices, labels, temperature, alpha, divergence,
                        beta, reduction, ignore_index, t2_scaling, chunk_size, teacher_topk_tail)
    topk = teacher_topk_logits is not None
    _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling, topk=topk)
    _validate(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              teacher_topk_logits, teacher_topk_indices, labels, alpha, ignore_index, chunk_size, teacher_topk_tail)
    kw = dict(temperature=float(temperature), alpha=float(alpha), divergence=divergence, beta=float(beta),
              reduction=reduction, ignore_index=int(ignore_index), t2_scaling=t2_scaling)
    V = student_weight.shape[0]
    if not _compiled(student_hidden.device, topk):
        return _materialised(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                             teacher_bias, teacher_topk_logits, teacher_topk_indices, labels,
                             teacher_topk_tail=teacher_topk_tail, **kw)
    lead = student_hidden.shape[:-1]
    H = student_hidden.shape[-1]
    rows = math.prod(lead)
    sh = student_hidden.reshape(rows, H)
    if topk:
        th = tw = tb = None
        tv = teacher_topk_logits.reshape(rows, teacher_topk_logits.shape[-1]).detach()
        ti = teacher_topk_indices.reshape(rows, teacher_topk_indices.shape[-1])
        t_item = 0
    else:
        th = teacher_hidden.reshape(rows, teacher_hidden.shape[-1]).detach()
        tw, tb = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
        tv = ti = None
        t_item = th.element_size()
    lab = None if labels is None else labels.reshape(rows)
    if chunk_size is None:
        chunk_size = auto_chunk_size(rows, V, sh.device.type, sh.element_size(), t_item)
    grad = torch.is_grad_enabled()
    mask = ((_G_HIDDEN if grad and student_hidden.requires_grad else 0)
            | (_G_WEIGHT if grad and student_weight.requires_grad else 0)
            | (_G_BIAS if grad and student_bias is not None and student_bias.requires_grad else 0))
    tail = None if teacher_topk_tail is None else teacher_topk_tail.detach().reshape(rows)
    loss = _op(sh, student_weight, student_bias, th, tw, tb, tv, ti, lab, None, kw["temperature"], kw["alpha"],
               DIVERGENCES[divergence], kw["beta"], _RED[reduction], kw["ignore_index"], t2_scaling,
               int(chunk_size), mask, tail)[0]
    return loss.reshape(lead) if reduction == "none" else loss


def _autocast_dtype(t) -> torch.dtype | None:
    """The autocast dtype when ``torch.autocast`` is on for ``t``'s device and ``t`` is float32, else None."""
    if not isinstance(t, Tensor) or t.dtype != torch.float32:
        return None
    dev = t.device.type
    try:
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None


def _logits(hidden, weight, bias, V, dtype=None):
    w = weight[:V] if weight.shape[0] > V else weight
    b = None if bias is None else bias[:V]
    if dtype is not None:
        hidden, w, b = hidden.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    return torch.nn.functional.linear(hidden, w, b)


def _materialised(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_topk_logits, teacher_topk_indices, labels, teacher_topk_tail=None, **kw) -> Tensor:
    """The fallback without a compiled kd_loss kernel: both logits materialised, then kd_loss(_topk)."""
    V = student_weight.shape[0]
    student = _logits(student_hidden, student_weight, student_bias, V)
    if teacher_topk_logits is not None:
        return kd_loss_topk(student, teacher_topk_logits, teacher_topk_indices, labels,
                            teacher_topk_tail=teacher_topk_tail, **kw)
    with torch.no_grad():
        teacher = _logits(teacher_hidden, teacher_weight, teacher_bias, V)
    return kd_loss(student, teacher, labels, **kw)


def kd_loss_linear(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                   labels: Tensor | None = None, *, student_bias: Tensor | None = None,
                   teacher_bias: Tensor | None = None, temperature: float = 1.0, alpha: float = 1.0,
                   divergence: str = "forward_kl", beta: float = 0.5, reduction: str = "mean",
                   ignore_index: int = -100, t2_scaling: bool = True, chunk_size: int | None = None) -> Tensor:
    r""":func:`kd_loss` of ``student_hidden @ student_weight.T (+ student_bias)`` against
    ``(teacher_hidden @ teacher_weight.T (+ teacher_bias))[..., :V]`` without materialising either logits
    tensor (see the module docstring).

    Args:
        student_hidden: ``(..., H_s)`` float tensor (e.g. the last hidden states); receives a gradient.
        student_weight: ``(V, H_s)`` (e.g. ``lm_head.weight``), same dtype as ``student_hidden``; receives a
            gradient.
        teacher_hidden: ``(..., H_t)`` with the student's leading shape; a constant.
        teacher_weight: ``(V_t, H_t)``, ``V_t >= V``; rows ``V..V_t`` (vocabulary padding) are ignored.
        labels: ``(...)`` int64/int32 in ``[0, V)`` or ``ignore_index``; required if ``alpha < 1``.
        student_bias / teacher_bias: ``(V,)`` / ``(V_t,)`` or None.
        temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling: as in :func:`kd_loss`.
        chunk_size: rows per chunk; None chooses :func:`auto_chunk_size` (from V and the device's budget).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or the leading shape for ``"none"``.
    """
    return _run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, None,
                None, labels, temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling, chunk_size)


def kd_loss_linear_topk(student_hidden: Tensor, student_weight: Tensor, teacher_topk_logits: Tensor,
                        teacher_topk_indices: Tensor, labels: Tensor | None = None, *,
                        student_bias: Tensor | None = None, temperature: float = 1.0, alpha: float = 1.0,
                        divergence: str = "forward_kl", beta: float = 0.5, reduction: str = "mean",
                        ignore_index: int = -100, t2_scaling: bool = True, chunk_size: int | None = None,
                        teacher_topk_tail: Tensor | None = None) -> Tensor:
    r""":func:`kd_loss_topk` of ``student_hidden @ student_weight.T (+ student_bias)`` against a cached top-k
    teacher (``(..., k)`` logits and vocabulary indices, optionally ``teacher_topk_tail``: ``(...)``, the log
    of its mass outside the k entries at this temperature), without materialising the student logits.
    ``divergence``: ``forward_kl`` or ``jsd``. Other arguments as in :func:`kd_loss_linear`."""
    return _run(student_hidden, student_weight, student_bias, None, None, None, teacher_topk_logits,
                teacher_topk_indices, labels, temperature, alpha, divergence, beta, reduction, ignore_index,
                t2_scaling, chunk_size, teacher_topk_tail)


def kd_loss_linear_reference(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                             *, student_bias=None, teacher_bias=None, teacher_topk_logits=None,
                             teacher_topk_indices=None, temperature=1.0, alpha=1.0, divergence="forward_kl",
                             beta=0.5, reduction="mean", ignore_index=-100, t2_scaling=True,
                             teacher_topk_tail=None) -> Tensor:
    """float64 reference of :func:`kd_loss_linear` (or of :func:`kd_loss_linear_topk` when
    ``teacher_topk_logits``/``teacher_topk_indices`` are given instead of the teacher hidden states and
    weight): both logits materialised in float64, then :func:`kd_loss_reference`. Differentiable (autograd)
    w.r.t. the student's hidden states, weight and bias; the loss is float64."""
    topk = teacher_topk_logits is not None
    _validate_scalars(temperature, alpha, divergence, beta, reduction, ignore_index, t2_scaling, topk=topk)
    _validate(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
              teacher_topk_logits, teacher_topk_indices, labels, alpha, ignore_index, None, teacher_topk_tail)
    V = student_weight.shape[0]
    f64 = torch.float64
    student = _logits(student_hidden, student_weight, student_bias, V, f64)
    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, reduction=reduction,
              ignore_index=ignore_index, t2_scaling=t2_scaling)
    if topk:
        return kd_loss_reference(student, teacher_topk_logits.detach().to(f64), labels,
                                 teacher_topk_indices=teacher_topk_indices, teacher_topk_tail=None
                                 if teacher_topk_tail is None else teacher_topk_tail.detach().to(f64), **kw)
    teacher = _logits(teacher_hidden.detach(), teacher_weight.detach(),
                      None if teacher_bias is None else teacher_bias.detach(), V, f64)
    return kd_loss_reference(student, teacher, labels, **kw)


class KDLossLinear(_KDLossOptions):
    """Module form of :func:`kd_loss_linear` (and :func:`kd_loss_linear_topk` via :meth:`forward_topk`)::

        criterion = KDLossLinear(temperature=2.0, alpha=0.5)
        loss = criterion(student_out.hidden_states[-1], student.lm_head.weight,
                         teacher_out.hidden_states[-1], teacher.lm_head.weight, labels)
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, reduction: str = "mean", ignore_index: int = -100, t2_scaling: bool = True,
                 chunk_size: int | None = None):
        super().__init__(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, reduction=reduction,
                         ignore_index=ignore_index, t2_scaling=t2_scaling)
        _check_chunk_size(chunk_size)
        self.chunk_size = None if chunk_size is None else int(chunk_size)

    def _kw(self) -> dict:
        return self._options() | {"chunk_size": self.chunk_size}

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                labels: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor:
        return kd_loss_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                              student_bias=student_bias, teacher_bias=teacher_bias, **self._kw())

    def forward_topk(self, student_hidden: Tensor, student_weight: Tensor, teacher_topk_logits: Tensor,
                     teacher_topk_indices: Tensor, labels: Tensor | None = None,
                     student_bias: Tensor | None = None, teacher_topk_tail: Tensor | None = None) -> Tensor:
        return kd_loss_linear_topk(student_hidden, student_weight, teacher_topk_logits, teacher_topk_indices, labels,
                                   student_bias=student_bias, teacher_topk_tail=teacher_topk_tail, **self._kw())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
