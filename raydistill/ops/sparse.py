"""Sparse linear layers: y = x W^T + b with a CSR weight W (out x in).

Two compiled ops (schemas in ``csrc/sparse/spmm_cpu.cpp``):

* ``raydistill::spmm(x, crow_indices, col_indices, values, bias, out_features, t_crow_indices,
  t_col_indices, t_perm) -> y`` -- SpMM forward, ``x`` is 2-D (N, in). The optional ``t_*`` tensors
  are W^T in CSR plus the permutation from W's nonzero order to W^T's (``values_t = values[t_perm]``);
  the forward ignores them, the backward uses them for ``dx = dy W`` (built once per mask, see
  :func:`csr_transpose`). When they are absent the backward builds them on the fly.
* ``raydistill::sddmm(dy, x, crow_indices, col_indices) -> dvalues`` -- ``(dy^T x)`` sampled at W's
  nonzeros: the gradient of the weight values.

Both have fake (meta) implementations and ``spmm`` has autograd registered with
``torch.library.register_autograd``, so they work under ``torch.compile(fullgraph=True)``.
Math is fp32 (fp64 for fp64 inputs) whatever the I/O dtype. Index tensors are int32 (``nnz < 2**31``).

When the extension is not available every call goes through :func:`sparse_linear_reference`, a pure
PyTorch path with the same semantics (index_add based), so models keep working (slower).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill._build import extension_available

__all__ = [
    "SparseLinear",
    "sparse_linear",
    "sparse_linear_reference",
    "sparse_linear_dense_reference",
    "csr_from_dense",
    "csr_transpose",
    "check_csr",
    "check_row_pointers",
    "SparseLinearInt8",
    "sparse_linear_int8",
    "sparse_linear_int8_reference",
    "sparse_linear_int8_dense_reference",
    "quantize_rows_int8",
    "quantize_activations_int16",
    "fake_quantize_activations_int16",
]

INDEX_DTYPE = torch.int32
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# CSR helpers
# ----------------------------------------------------------------------------------------------------


def check_row_pointers(crow_indices: Tensor, nnz: int, cols: int | None = None,
                       col_indices: Tensor | None = None) -> None:
    """The rules a kernel needs to stay inside a CSR pattern, O(rows + nnz): ``crow_indices`` starts at 0,
    is non-decreasing and ends at ``nnz``; with ``col_indices``, every column is in ``[0, cols)``.
    ValueError naming the tensor and the rule (what the CPU ops check in C++ on every call)."""
    crow = crow_indices.detach().to("cpu", torch.int64)
    if crow.numel() == 0:
        raise ValueError("crow_indices must have rows+1 >= 1 entries, got none")
    if crow[0].item() != 0 or crow[-1].item() != nnz:
        raise ValueError(f"crow_indices must start at 0 and end at nnz={nnz}, "
                         f"got {crow[0].item()}..{crow[-1].item()}")
    dec = (crow[1:] < crow[:-1]).nonzero()
    if dec.numel():
        r = int(dec[0, 0])
        raise ValueError(f"crow_indices must be non-decreasing, got crow_indices[{r + 1}]={int(crow[r + 1])} < "
                         f"crow_indices[{r}]={int(crow[r])}")
    if col_indices is not None and col_indices.numel():
        col = col_indices.detach()
        lo, hi = int(col.min()), int(col.max())
        if lo < 0 or hi >= cols:
            raise ValueError(f"col_indices out of range [0, {cols}): min {lo}, max {hi}")


def check_csr(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int], *,
              values: Tensor | None = None) -> None:
    """Validate a CSR pattern of ``shape`` (rows, cols); raises ValueError/TypeError naming the argument.

    Rules: integer index tensors, 1-D; ``crow_indices`` has rows+1 entries, starts at 0, is
    non-decreasing and ends at nnz; column indices are in [0, cols) and strictly increasing within
    each row (sorted, no duplicates).
    """
    rows, cols = int(shape[0]), int(shape[1])
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if crow_indices.numel() != rows + 1:
        raise ValueError(f"crow_indices must have rows+1={rows + 1} entries, got {crow_indices.numel()}")
    crow = crow_indices.detach().to("cpu", torch.int64)
    col = col_indices.detach().to("cpu", torch.int64)
    nnz = col.numel()
    check_row_pointers(crow, nnz, cols, col)
    if nnz:
        # strictly increasing inside each row: a decrease/equality is allowed only at a row start
        row_start = torch.zeros(nnz, dtype=torch.bool)
        starts = crow[:-1][crow[:-1] < nnz]
        row_start[starts] = True
        bad = (col[1:] <= col[:-1]) & ~row_start[1:]
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0]) + 1
            raise ValueError(f"col_indices must be sorted and unique within each row (position {k})")
    if nnz >= 2**31:
        raise ValueError(f"nnz={nnz} does not fit int32 indices")
    if values is not None:
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a Tensor, got {type(values).__name__}")
        if values.dim() != 1 or values.numel() != nnz:
            raise ValueError(f"values must be 1-D with nnz={nnz} entries, got shape {tuple(values.shape)}")


def csr_from_dense(weight: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(crow_indices int32, col_indices int32, values) of ``weight`` at ``mask`` (True = keep).

    Without a mask the nonzeros of ``weight`` are kept. Values keep the weight's dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if mask is None:
        mask = weight != 0
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    mask = mask.to(weight.device)
    counts = mask.sum(dim=1)
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    nz = mask.nonzero()  # row-major order: sorted by row, then column
    col = nz[:, 1]
    values = weight.detach()[mask]
    return crow.to(INDEX_DTYPE), col.to(INDEX_DTYPE), values


def csr_transpose(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """W^T in CSR for a CSR W of ``shape``: (t_crow_indices, t_col_indices, t_perm).

    ``t_perm`` maps W^T's nonzero order to W's: ``values_t = values[t_perm]`` (a gather, done once per
    step in the backward; the pattern itself is built once per mask).
    """
    rows, cols = int(shape[0]), int(shape[1])
    dev = crow_indices.device
    crow = crow_indices.to(torch.int64)
    col = col_indices.to(torch.int64)
    nnz = col.numel()
    row = torch.repeat_interleave(torch.arange(rows, device=dev), crow[1:] - crow[:-1], output_size=nnz)
    # stable sort by column keeps rows ascending within each column of W^T
    key = col * max(rows, 1) + row
    perm = torch.argsort(key, stable=True)
    t_col = row[perm]
    counts = torch.bincount(col, minlength=cols) if nnz else torch.zeros(cols, dtype=torch.int64, device=dev)
    t_crow = torch.zeros(cols + 1, dtype=torch.int64, device=dev)
    t_crow[1:] = torch.cumsum(counts, 0)
    return t_crow.to(INDEX_DTYPE), t_col.to(INDEX_DTYPE), perm.to(INDEX_DTYPE)


def _check_bounds(crow_indices: Tensor, col_indices: Tensor, values: Tensor, cols: int) -> None:
    """What the PyTorch reference paths need (ValueError instead of an index error or a device assert):
    the row pointers and columns of :func:`check_row_pointers` and one value per column index."""
    if col_indices.dim() != 1 or values.dim() != 1 or col_indices.numel() != values.numel():
        raise ValueError(f"col_indices and values must be 1-D with nnz entries each, got shapes "
                         f"{tuple(col_indices.shape)} and {tuple(values.shape)}")
    check_row_pointers(crow_indices, values.numel(), cols, col_indices)


def _version_key(*tensors: Tensor) -> tuple:
    """Identity and in-place version of tensors: a cached check stays valid while this key is the same."""
    return tuple((t.data_ptr(), t._version, t.device, tuple(t.shape), t.dtype) for t in tensors if t is not None)


def _check_dtypes(tensors: dict, rules: dict) -> None:
    """Each tensor of ``tensors`` ({name: tensor or None}) has a dtype of ``rules[name]`` ((dtypes, ndim or
    None)) and that rank; ValueError naming the tensor and the rule."""
    for name, t in tensors.items():
        if t is None:
            continue
        dtypes, ndim = rules[name]
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                             f"got {str(t.dtype).removeprefix('torch.')}")
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _rows_of(crow_indices: Tensor, nnz: int) -> Tensor:
    crow = crow_indices.to(torch.int64)
    rows = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(rows, device=crow.device), crow[1:] - crow[:-1], output_size=nnz)


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def sparse_linear_dense_reference(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                                  bias: Tensor | None, in_features: int) -> Tensor:
    """float64 dense reference: densify W and compute x W^T + b in float64 (for tests)."""
    out_features = crow_indices.numel() - 1
    w = torch.zeros(out_features, in_features, dtype=torch.float64, device=values.device)
    rows = _rows_of(crow_indices, values.numel())
    w.index_put_((rows, col_indices.to(torch.int64)), values.to(torch.float64))
    y = x.to(torch.float64) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def sparse_linear_reference(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                            bias: Tensor | None = None) -> Tensor:
    """Pure-PyTorch sparse linear (the fallback): gather + index_add, differentiable in x, values, bias.

    Computes in fp32 (fp64 for fp64 inputs) and returns x's dtype, like the compiled op.
    """
    out_features = crow_indices.numel() - 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    nnz = values.numel()
    rows = _rows_of(crow_indices, nnz)
    col = col_indices.to(torch.int64)
    # y[:, r] += v * x[:, c] for each nonzero (r, c)
    contrib = x2.index_select(1, col) * values.to(acc)
    y = torch.zeros(x2.shape[0], out_features, dtype=acc, device=x.device)
    y = y.index_add(1, rows, contrib)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*lead, out_features)


# ----------------------------------------------------------------------------------------------------
# The compiled ops: fake impls + autograd
# ----------------------------------------------------------------------------------------------------

_registered = False


def _register() -> bool:
    """Register fake impls and autograd for the compiled ops once; False if the extension is missing."""
    global _registered
    if _registered:
        return True
    if not extension_available():
        return False
    if not hasattr(torch.ops.raydistill, "spmm"):
        return False

    @torch.library.register_fake("raydistill::spmm")
    def _spmm_fake(x, crow_indices, col_indices, values, bias, out_features, t_crow_indices=None,
                   t_col_indices=None, t_perm=None):
        torch._check(x.dim() == 2, lambda: "x must be 2-D")
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("raydistill::sddmm")
    def _sddmm_fake(dy, x, crow_indices, col_indices):
        return dy.new_empty((col_indices.shape[0],))

    def _setup(ctx, inputs, output):
        x, crow, col, values, bias, out_features, t_crow, t_col, t_perm = inputs
        ctx.save_for_backward(x, crow, col, values, t_crow, t_col, t_perm)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def _backward(ctx, dy):
        x, crow, col, values, t_crow, t_col, t_perm = ctx.saved_tensors
        dx = dvalues = dbias = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            if t_crow is None or t_col is None or t_perm is None:
                t_crow, t_col, t_perm = csr_transpose(crow, col, (crow.shape[0] - 1, x.shape[1]))
            values_t = values.index_select(0, t_perm)
            dx = torch.ops.raydistill.spmm(dy, t_crow, t_col, values_t, None, x.shape[1], None, None, None)
        if ctx.needs_input_grad[3]:
            dvalues = torch.ops.raydistill.sddmm(dy, x, crow, col).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
            dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
        return dx, None, None, dvalues, dbias, None, None, None, None

    torch.library.register_autograd("raydistill::spmm", _backward, setup_context=_setup)
    _registered = True
    return True


_BACKEND: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _compiled_for(device_type: str) -> bool:
    """Whether the compiled op serves ``device_type`` (cached; a constant for torch.compile)."""
    r = _BACKEND.get(device_type)
    if r is None:
        from raydistill._build import op_backend

        r = _BACKEND[device_type] = _register() and op_backend("spmm", device_type) == "compiled"
    return r


def _use_compiled(x: Tensor) -> bool:
    return _compiled_for(x.device.type)


def sparse_linear(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                  bias: Tensor | None = None, *, transpose: tuple[Tensor, Tensor, Tensor] | None = None,
                  check: bool = False) -> Tensor:
    """y = x W^T + b for a CSR weight W (rows = out_features) and x of shape (..., in_features).

    ``transpose`` = ``csr_transpose(...)`` of the pattern, built once per mask; without it the
    backward builds it each step. ``check=True`` validates the CSR pattern first (O(nnz)).
    Falls back to :func:`sparse_linear_reference` when the compiled op is unavailable.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32/bfloat16/float16/float64, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} must match x dtype {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match x dtype {x.dtype}")
    out_features = crow_indices.numel() - 1
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    if check:
        check_csr(crow_indices, col_indices, (out_features, x.shape[-1]), values=values)
    if not _use_compiled(x):
        if not check:  # the compiled CPU op checks these itself (O(rows)); the reference path here
            _check_bounds(crow_indices, col_indices, values, x.shape[-1])
        return sparse_linear_reference(x, crow_indices, col_indices, values, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    t_crow, t_col, t_perm = transpose if transpose is not None else (None, None, None)
    y = torch.ops.raydistill.spmm(x2, crow_indices, col_indices, values, bias, out_features,
                                  t_crow, t_col, t_perm)
    return y.reshape(*lead, out_features)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class _DenseView(torch.autograd.Function):
    """values -> the layer's dense weight (already holding them); backward gathers d values from the dense
    weight gradient. The returned view shares the cache's version counter, so refreshing the cache before
    this graph's backward raises autograd's in-place error instead of giving a wrong gradient."""

    @staticmethod
    def forward(ctx, values, dense, flat_index):
        ctx.save_for_backward(flat_index)
        return dense.view_as(dense)

    @staticmethod
    def backward(ctx, grad_dense):
        (flat,) = ctx.saved_tensors
        return grad_dense.reshape(-1).index_select(0, flat), None, None


class _CSRSizes:
    """nnz / density / sparsity of a CSR layer holding ``values`` (nnz,) of an (out, in) weight."""

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density if self.in_features * self.out_features else 0.0

    # checks of the layer's own tensors: at load, and once per change before a CUDA call -------------------
    _RULES: dict = {}  # {tensor name: (dtypes, ndim or None)}, what check_pattern and a loaded file must meet

    def _check_once(self) -> None:
        """:meth:`check_pattern`, again only when one of its tensors changed (identity or in-place version)."""
        key = self._check_key()
        if getattr(self, "_checked_key", None) != key:
            self.check_pattern()
            object.__setattr__(self, "_checked_key", key)

    def _checked_load(self, state_dict: dict, prefix: str, error_msgs: list, load) -> None:
        """``load()`` (adopt the file's sizes, copy) between the dtype / rank rules of the file's tensors (before
        anything is copied: a float crow_indices would be cast silently) and :meth:`check_pattern` of the
        result, each a ValueError naming the layer; a pattern from a file is checked once here, not per call."""
        layer = f"{type(self).__name__} {prefix[:-1] or '(root)'!r}"
        try:
            _check_dtypes({n: state_dict[prefix + n] for n in self._RULES if prefix + n in state_dict}, self._RULES)
        except ValueError as exc:
            raise ValueError(f"{layer}: {exc}") from None
        n_err = len(error_msgs)
        load()
        if len(error_msgs) == n_err and any(prefix + n in state_dict for n in self._RULES):
            try:
                self.check_pattern()
            except ValueError as exc:
                raise ValueError(f"{layer}: {exc}") from None


_PATTERN_BUFFERS = ("crow_indices", "col_indices", "t_crow_indices", "t_col_indices", "t_perm")


class SparseLinear(_CSRSizes, nn.Module):
    """A linear layer whose weight is a fixed CSR pattern with trainable values.

    Parameters: ``values`` (nnz,) and ``bias`` (out,) -- nothing else, so DDP/optimizers see only
    these. Buffers (int32, kept by ``.to(dtype)``): ``crow_indices``, ``col_indices`` (W's pattern) and
    ``t_crow_indices``, ``t_col_indices``, ``t_perm`` (W^T's pattern, for the backward).
    """

    def __init__(self, in_features: int, out_features: int, nnz: int = 0, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(f"in_features/out_features must be >= 0, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        fk = {"device": device, "dtype": dtype}
        ik = {"device": device, "dtype": INDEX_DTYPE}
        self.values = nn.Parameter(torch.zeros(nnz, **fk))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **fk))
        else:
            self.register_parameter("bias", None)  # (assigning None first would make register_* raise)
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, **ik))
        self.register_buffer("col_indices", torch.zeros(nnz, **ik))
        self.register_buffer("t_crow_indices", torch.zeros(in_features + 1, **ik))
        self.register_buffer("t_col_indices", torch.zeros(nnz, **ik))
        self.register_buffer("t_perm", torch.zeros(nnz, **ik))

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor | None = None) -> "SparseLinear":
        """Build from an ``nn.Linear``; ``mask`` (bool, weight's shape, True = keep) defaults to the
        weight's nonzeros. Values, bias, device and dtype are copied from the layer."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
        return cls.from_csr(*csr_from_dense(w, mask), in_features=linear.in_features,
                            bias=None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_csr(cls, crow_indices: Tensor, col_indices: Tensor, values: Tensor, *, in_features: int,
                 bias: Tensor | None = None) -> "SparseLinear":
        """Build from a CSR weight (validated: sorted, in-range column indices)."""
        out_features = crow_indices.numel() - 1
        check_csr(crow_indices, col_indices, (out_features, in_features), values=values)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        m = cls(in_features, out_features, values.numel(), bias is not None,
                device=values.device, dtype=values.dtype)
        with torch.no_grad():
            m.set_pattern(crow_indices, col_indices, values)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def set_pattern(self, crow_indices: Tensor, col_indices: Tensor, values: Tensor) -> None:
        """Replace the pattern and values (buffers/parameter are resized); rebuilds the transpose."""
        dev = self.values.device
        crow = crow_indices.to(dev, INDEX_DTYPE)
        col = col_indices.to(dev, INDEX_DTYPE)
        t_crow, t_col, t_perm = csr_transpose(crow, col, (self.out_features, self.in_features))
        self.crow_indices = crow.contiguous()
        self.col_indices = col.contiguous()
        self.t_crow_indices = t_crow.contiguous()
        self.t_col_indices = t_col.contiguous()
        self.t_perm = t_perm.contiguous()
        self.values = nn.Parameter(values.detach().to(dev, self.values.dtype).clone().contiguous(),
                                   requires_grad=self.values.requires_grad)

    def check_pattern(self) -> None:
        """Validate the layer's pattern (ValueError naming the tensor and the rule): ``crow_indices`` /
        ``col_indices`` a CSR pattern of (out_features, in_features) (:func:`check_csr`: int32, monotone row
        pointers from 0 to nnz, columns in range, sorted within rows), ``values`` nnz entries, and
        ``t_crow_indices`` / ``t_col_indices`` / ``t_perm`` exactly its transpose (:func:`csr_transpose`).
        Runs when a state dict is loaded and, on CUDA, once per change of the buffers before a call (the
        CPU kernels check the row pointers and columns themselves; the CUDA kernels cannot without a sync)."""
        _check_dtypes({n: getattr(self, n) for n in self._RULES}, self._RULES)
        check_csr(self.crow_indices, self.col_indices, (self.out_features, self.in_features), values=self.values)
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(self.bias.shape)}")
        want = csr_transpose(self.crow_indices, self.col_indices, (self.out_features, self.in_features))
        for name, w in zip(("t_crow_indices", "t_col_indices", "t_perm"), want):
            if not torch.equal(getattr(self, name).detach().cpu(), w.cpu()):
                raise ValueError(f"{name} must be the transpose of the pattern (csr_transpose of crow_indices, "
                                 "col_indices)")

    _RULES = {**{n: ((INDEX_DTYPE,), 1) for n in _PATTERN_BUFFERS}, "values": (_FLOAT_DTYPES, 1),
              "bias": (_FLOAT_DTYPES, 1)}

    def _check_key(self) -> tuple:  # the values change every step; only their number matters here
        return _version_key(*(getattr(self, n) for n in _PATTERN_BUFFERS)) + (self.values.numel(),)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        def load():
            # A checkpoint may hold a different pattern (nnz): adopt its sizes before the copy.
            key = prefix + "col_indices"
            if key in state_dict and state_dict[key].numel() != self.col_indices.numel():
                nnz = state_dict[key].numel()
                dev = self.values.device
                for name in ("col_indices", "t_col_indices", "t_perm"):
                    setattr(self, name, torch.zeros(nnz, dtype=INDEX_DTYPE, device=dev))
                self.values = nn.Parameter(torch.zeros(nnz, dtype=self.values.dtype, device=dev),
                                           requires_grad=self.values.requires_grad)
            super(SparseLinear, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                            unexpected_keys, error_msgs)

        self._checked_load(state_dict, prefix, error_msgs, load)

    # use ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim in_features={self.in_features}, got {tuple(x.shape)}")
        if x.is_cuda and x.dtype == self.values.dtype and not torch.compiler.is_compiling() \
                and _compiled_for("cuda"):
            # The pattern is checked once (again only after a buffer changed): the CUDA kernels and the
            # dense path's scatter would otherwise read through a malformed one without a word.
            self._check_once()
            from raydistill.ops.sparse_dispatch import choose_path

            if choose_path(self, x) == "dense":
                return nn.functional.linear(x, self._dense_weight_for_call(), self.bias)
            return self._spmm(x)
        return sparse_linear(x, self.crow_indices, self.col_indices, self.values, self.bias,
                             transpose=(self.t_crow_indices, self.t_col_indices, self.t_perm))

    def _spmm(self, x: Tensor) -> Tensor:
        """The compiled CSR op on ``x`` with no argument checks (the layer's fast path)."""
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.raydistill.spmm(x2, self.crow_indices, self.col_indices, self.values, self.bias,
                                      self.out_features, self.t_crow_indices, self.t_col_indices, self.t_perm)
        return y.reshape(*x.shape[:-1], self.out_features)

    # the masked-dense path (CUDA dispatch, see raydistill/ops/sparse_dispatch.py) ---------------------
    def _flat_index(self) -> Tensor:
        key = (self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.col_indices.device)
        cache = getattr(self, "_flat_idx_cache", None)
        if cache is None or cache[0] != key:
            rows = _rows_of(self.crow_indices, self.nnz)
            flat = rows * self.in_features + self.col_indices.to(torch.int64)
            cache = (key, flat)
            object.__setattr__(self, "_flat_idx_cache", cache)
        return cache[1]

    def dense_weight_cache(self) -> Tensor:
        """A dense (out, in) copy of the weight kept on the values' device, refreshed by one scatter when
        the values changed since the last call. Not differentiable; see ``release_dense_cache``."""
        v = self.values
        flat = self._flat_index()
        state = (v.data_ptr(), v._version, flat.data_ptr())
        cache = getattr(self, "_dense_cache", None)
        if cache is None or cache[1].device != v.device or cache[1].dtype != v.dtype:
            buf = torch.zeros(self.out_features, self.in_features, dtype=v.dtype, device=v.device)
            cache = [None, buf]
            object.__setattr__(self, "_dense_cache", cache)
        if cache[0] != state:
            with torch.no_grad():
                if cache[0] is not None and cache[0][2] != state[2]:
                    cache[1].zero_()  # the pattern changed: clear the old positions
                cache[1].view(-1).index_copy_(0, flat, v.detach())
            cache[0] = state
        return cache[1]

    def release_dense_cache(self) -> None:
        """Free the dense copy of the weight used by the CUDA masked-dense path."""
        object.__setattr__(self, "_dense_cache", None)

    def _dense_weight_for_call(self) -> Tensor:
        w = self.dense_weight_cache()
        if torch.is_grad_enabled() and self.values.requires_grad:
            return _DenseView.apply(self.values, w, self._flat_index())
        return w

    def weight_dense(self) -> Tensor:
        """The (out, in) dense weight (zeros off the pattern), differentiable in ``values``."""
        w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        rows = _rows_of(self.crow_indices, self.nnz)
        return w.index_put((rows, self.col_indices.to(torch.int64)), self.values)

    def mask(self) -> Tensor:
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        rows = _rows_of(self.crow_indices, self.nnz)
        m[rows, self.col_indices.to(torch.int64)] = True
        return m

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the masked weight (same device and dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def quantize(self, bits: int = 8, index: str | None = None,
                 activations: str | None = "int16") -> "SparseLinearInt8":
        """An inference copy of this layer with int8 values and one fp32 scale per output row
        (symmetric, per output channel). ``index``: ``"csr"`` (column indices in 16 bits when
        ``in_features <= 65536``, else 32), ``"bitmap"`` (one bit per weight, row-major) or None: the
        smaller of the two for this layer. ``activations``: ``"int16"`` (default: inputs rounded per row
        to int16 on the fly, the fast CPU kernel) or None (inputs kept as they are, fp32 math). See
        :class:`SparseLinearInt8`. This layer is left unchanged."""
        return SparseLinearInt8.from_sparse(self, bits=bits, index=index, activations=activations)

    def csr_bytes(self, index_bytes: int = 4) -> int:
        """Bytes of the CSR weight: values + column indices + row pointers (int32 accounting)."""
        return csr_nbytes(self.out_features, self.nnz, self.values.element_size(), index_bytes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4f}")


def csr_nbytes(rows: int, nnz: int, value_bytes: int, index_bytes: int = 4) -> int:
    """Bytes of a CSR matrix: values + column indices + (rows + 1) row pointers (int32 by default)."""
    return nnz * value_bytes + nnz * index_bytes + (rows + 1) * index_bytes


# ----------------------------------------------------------------------------------------------------
# int8 values with per-row scales (inference)
# ----------------------------------------------------------------------------------------------------
#
# Compiled op (schema in csrc/sparse/spmm_int8_cpu.cpp; CUDA in spmm_int8_cuda.cu + its glue):
#   raydistill::spmm_int8(x, crow_indices, col_indices, values, scales, bias, out_features) -> y
#   y[n, r] = scales[r] * sum_{k in row r} values[k] * x[n, col[k]] + bias[r]
# with int8 values, fp32 scales and bias, int32 row pointers and uint16 (in_features <= 65536) or int32
# column indices. x keeps its float dtype (weight-only int8); math is fp32 (fp64 for fp64 x).
#   raydistill::spmm_int8_a16(same arguments) -> y   (CPU)
# the same with int16 dynamic activations: each row b of x becomes int16 codes with its own scale
# (quantize_activations_int16) and the products are summed exactly in int32 (AVX2 vpmaddwd).

INT8_QMAX = 127
A16_QMAX = 32767
SPARSE_INT8_ACTIVATIONS = ("int16", None)
_int8_registered = False


def _register_int8() -> bool:
    global _int8_registered
    if _int8_registered:
        return True
    if not extension_available() or not hasattr(torch.ops.raydistill, "spmm_int8"):
        return False

    @torch.library.register_fake("raydistill::spmm_int8")
    def _spmm_int8_fake(x, crow_indices, col_indices, values, scales, bias, out_features):
        torch._check(x.dim() == 2, lambda: "x must be 2-D")
        return x.new_empty((x.shape[0], out_features))

    if hasattr(torch.ops.raydistill, "spmm_int8_a16"):
        @torch.library.register_fake("raydistill::spmm_int8_a16")
        def _spmm_int8_a16_fake(x, crow_indices, col_indices, values, scales, bias, out_features):
            torch._check(x.dim() == 2, lambda: "x must be 2-D")
            return x.new_empty((x.shape[0], out_features))

    _int8_registered = True
    return True


_INT8_BACKEND: dict[tuple[str, str], bool] = {}


def _int8_op_compiled(op: str, device_type: str) -> bool:
    """Whether ``raydistill::<op>`` has a compiled kernel for the device (asked once per op and device)."""
    r = _INT8_BACKEND.get((op, device_type))
    if r is None:
        from raydistill._build import op_backend

        r = _INT8_BACKEND[(op, device_type)] = _register_int8() and op_backend(op, device_type) == "compiled"
    return r


@torch.compiler.assume_constant_result
def _int8_compiled_for(device_type: str) -> bool:
    return _int8_op_compiled("spmm_int8", device_type)


@torch.compiler.assume_constant_result
def _int8_a16_compiled_for(device_type: str) -> bool:
    return _int8_op_compiled("spmm_int8_a16", device_type)


def column_index_dtype(in_features: int) -> torch.dtype:
    """uint16 column indices when every column fits 16 bits (``in_features <= 65536``), else int32."""
    return torch.uint16 if in_features <= 65536 else torch.int32


INDEX_FORMATS = ("csr", "bitmap")
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def bitmap_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of a row bitmap: one bit per weight, each row padded to whole bytes."""
    return out_features * ((in_features + 7) // 8)


def pick_index_format(nnz: int, out_features: int, in_features: int) -> str:
    """The smaller column index: a row bitmap (1 bit per weight) or CSR indices (16 or 32 bits per
    nonzero). The bitmap wins above 1/16 density (1/32 with int32 indices)."""
    csr = nnz * torch.empty((), dtype=column_index_dtype(in_features)).element_size()
    return "bitmap" if bitmap_nbytes(out_features, in_features) < csr else "csr"


def csr_to_bitmap(crow_indices: Tensor, col_indices: Tensor, in_features: int) -> Tensor:
    """(out, ceil(in / 8)) uint8 row bitmap of a CSR pattern: bit j (LSB first) of byte b of row r is set
    when column 8b + j of row r is stored. Columns must be sorted within rows (the values follow them)."""
    rows = crow_indices.numel() - 1
    wb = (in_features + 7) // 8
    col = col_indices.to(torch.int64)
    r = _rows_of(crow_indices, col.numel())
    bits = torch.zeros(rows, wb * 8, dtype=torch.bool, device=col.device)
    bits[r, col] = True
    weights = (1 << torch.arange(8, device=col.device)).to(torch.int64)
    return (bits.view(rows, wb, 8).to(torch.int64) * weights).sum(-1).to(torch.uint8)


def bitmap_to_columns(bitmap: Tensor, in_features: int) -> Tensor:
    """The int64 column indices (row-major, ascending within rows) of a :func:`csr_to_bitmap` bitmap."""
    rows, wb = bitmap.shape
    shifts = torch.arange(8, device=bitmap.device)
    bits = (bitmap.to(torch.int64)[..., None] >> shifts) & 1
    bits = bits.reshape(rows, wb * 8)
    if in_features < wb * 8 and bool(bits[:, in_features:].any()):
        raise ValueError(f"col_indices bitmap has bits set at or beyond in_features={in_features}")
    return bits.nonzero()[:, 1]


def _columns(col_indices: Tensor, in_features: int) -> Tensor:
    """int64 column indices of either index layout (CSR indices, or a uint8 row bitmap)."""
    if col_indices.dtype == torch.uint8:
        return bitmap_to_columns(col_indices, in_features)
    return col_indices.to(torch.int64)


def quantize_rows_int8(values: Tensor, crow_indices: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of CSR values: (q int8 (nnz,), scales fp32 (rows,)).

    ``scale_r = max_k |v_k| / 127`` over row r (1.0 for an empty or all-zero row) and
    ``q_k = round(v_k / scale_r)`` in [-127, 127]; computed in float64 against the fp32 scale.
    """
    rows = crow_indices.numel() - 1
    nnz = values.numel()
    row = _rows_of(crow_indices, nnz)
    v = values.detach().to(torch.float64)
    amax = torch.zeros(rows, dtype=torch.float64, device=v.device)
    if nnz:
        amax = amax.scatter_reduce(0, row, v.abs(), reduce="amax", include_self=True)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("values must be finite to quantize (found inf/nan)")
    scales = torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax)).to(torch.float32)
    q = torch.round(v / scales.to(torch.float64)[row]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scales


def quantize_activations_int16(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric int16 quantization of each row of x (over the last dim), in fp32 arithmetic as
    the CPU kernel does it: ``m = max |x|``, ``q = round(x * (32767 / m))``, ``scale = m / 32767``
    (a zero row: codes 0, scale 0). Returns (codes as float32 integers in [-32767, 32767], scales with a
    trailing dim of 1). The rounding error is at most ``scale / 2 = m / 65534`` per element."""
    xf = x.detach().to(torch.float32)
    m = xf.abs().amax(-1, keepdim=True) if xf.shape[-1] else xf.new_zeros((*xf.shape[:-1], 1))
    inv = torch.where(m > 0, torch.full_like(m, float(A16_QMAX)) / m, torch.zeros_like(m))  # true division
    return torch.round(xf * inv).clamp_(-A16_QMAX, A16_QMAX), m / A16_QMAX


def fake_quantize_activations_int16(x: Tensor) -> Tensor:
    """x rounded to its int16 grid (:func:`quantize_activations_int16`), in x's dtype, with a
    straight-through gradient (d/dx = identity). Non-finite rows are left as they are."""
    q, sc = quantize_activations_int16(x)
    xq = (q * sc).to(x.dtype)
    finite = torch.isfinite(x).all(-1, keepdim=True)
    xq = torch.where(finite, xq, x.detach())
    return x + (xq - x).detach() if x.requires_grad else xq


def _dequantized(crow_indices: Tensor, values: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    row = _rows_of(crow_indices, values.numel())
    return values.to(dtype) * scales.to(dtype)[row]


def sparse_linear_int8_dense_reference(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                                       scales: Tensor, bias: Tensor | None, in_features: int) -> Tensor:
    """float64 dense reference of :func:`sparse_linear_int8` (for tests)."""
    w = _dequantized(crow_indices, values, scales, torch.float64)
    return sparse_linear_dense_reference(x, crow_indices, _columns(col_indices, in_features), w, bias, in_features)


def sparse_linear_int8_reference(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor,
                                 scales: Tensor, bias: Tensor | None = None, activations: str | None = None) -> Tensor:
    """Pure-PyTorch int8 sparse linear (the fallback): dequantize, then :func:`sparse_linear_reference`.
    ``activations="int16"`` rounds x to its int16 grid first (:func:`fake_quantize_activations_int16`).

    Differentiable in x (the int8 weights are constants; the int16 rounding passes the gradient straight
    through)."""
    if activations == "int16":
        x = fake_quantize_activations_int16(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _dequantized(crow_indices, values, scales, acc)
    y = sparse_linear_reference(x.to(acc), crow_indices, _columns(col_indices, x.shape[-1]), w,
                                None if bias is None else bias.to(acc))
    return y.to(x.dtype)


def sparse_linear_int8(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, scales: Tensor,
                       bias: Tensor | None = None, *, activations: str | None = None, check: bool = False) -> Tensor:
    """y = x W^T + b for a CSR W with int8 ``values`` and fp32 per-row ``scales`` (W = values * scales[row]).

    ``x`` (..., in_features) float32/bfloat16/float16/float64, returned in its dtype; ``bias`` fp32.
    ``activations``: None, x as it is (fp32 math); ``"int16"``, each row of x rounded to int16 codes with
    its own scale (:func:`quantize_activations_int16`) and the products summed exactly in int32: the fast
    CPU kernel (``raydistill::spmm_int8_a16``). Elsewhere (CUDA) the same rounding is applied to x before
    the fp32 kernel. Uses the compiled ops; the PyTorch reference when the extension is unavailable or
    when x needs a gradient (the compiled ops have no backward; the weights are constants either way).
    """
    if activations not in SPARSE_INT8_ACTIVATIONS:
        raise ValueError(f"activations must be 'int16' or None, got {activations!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32/bfloat16/float16/float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8, got {values.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if col_indices.dtype not in (torch.uint16, torch.int32, torch.uint8):
        raise TypeError(f"col_indices must be uint16 or int32 (CSR) or a uint8 row bitmap, got {col_indices.dtype}")
    out_features = crow_indices.numel() - 1
    bitmap = col_indices.dtype == torch.uint8
    if bitmap and col_indices.shape != (out_features, (x.shape[-1] + 7) // 8):
        raise ValueError(f"a uint8 col_indices bitmap must have shape ({out_features}, {(x.shape[-1] + 7) // 8}) "
                         f"(rows, ceil(in_features / 8)), got {tuple(col_indices.shape)}")
    if scales.shape != (out_features,):
        raise ValueError(f"scales must have shape ({out_features},), got {tuple(scales.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        raise ValueError(f"bias must be float32 of shape ({out_features},), got {bias.dtype} {tuple(bias.shape)}")
    if check:
        cols = _columns(col_indices, x.shape[-1])
        if bitmap and cols.numel() != values.numel():
            raise ValueError(f"the col_indices bitmap has {cols.numel()} set bits but values has {values.numel()}")
        check_csr(crow_indices, cols, (out_features, x.shape[-1]), values=values)
    if (x.requires_grad and torch.is_grad_enabled()) or not _int8_compiled_for(x.device.type) \
            or (bitmap and x.device.type != "cpu"):  # the bitmap layout has a CPU kernel only
        if not check:  # what the reference needs to stay inside the pattern (the CPU kernels check it in C++)
            cols = _columns(col_indices, x.shape[-1])
            if bitmap and cols.numel() != values.numel():
                raise ValueError(f"the col_indices bitmap has {cols.numel()} set bits but values has {values.numel()}")
            _check_bounds(crow_indices, cols, values, x.shape[-1])
        return sparse_linear_int8_reference(x, crow_indices, col_indices, values, scales, bias, activations)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    op = torch.ops.raydistill.spmm_int8
    if activations == "int16":
        if _int8_a16_compiled_for(x.device.type):
            op = torch.ops.raydistill.spmm_int8_a16
        else:  # no int16 kernel here (CUDA): the same rounding, then the fp32 kernel
            x2 = fake_quantize_activations_int16(x2)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = op(x2, crow_indices, col_indices, values, scales, bias, out_features)
    return y.reshape(*lead, out_features)


class SparseLinearInt8(_CSRSizes, nn.Module):
    """Inference-only sparse linear layer with int8 values and one fp32 scale per output row.

    W[r, c] = ``values[k] * scales[r]`` at the CSR pattern (``crow_indices`` int32). Two index layouts
    (``index_format``): ``"csr"``, ``col_indices`` uint16 when ``in_features <= 65536``, else int32 (2 or 4
    bytes per nonzero); ``"bitmap"``, ``col_indices`` a uint8 ``(out, ceil(in / 8))`` row bitmap, bit j
    (LSB first) of byte b set when column 8b + j is stored, the values in column order (1 bit per
    weight: smaller than 16-bit indices above 1/16 density; the CPU kernel decodes it per call into
    transient indices; no CUDA kernel, CUDA inputs take the PyTorch path).

    ``activations``: ``"int16"`` (the default of :meth:`SparseLinear.quantize`) rounds each input row to
    int16 codes with its own scale on the fly (error at most ``max|x_row| / 65534`` per element, far
    below the int8 weight rounding) and sums the products exactly in int32: the fast CPU kernel, about
    1.3-1.6x the fp32 :class:`SparseLinear` at 4096x4096, 90% sparse, batch 16 (``raydistill bench
    spmm-int8``). ``None`` keeps the inputs as they are (weight-only int8, fp32 math): slower on CPU,
    for exact comparisons. Everything is a buffer: nothing trains here (an input that needs a
    gradient still gets one, through the PyTorch reference path). Build it with
    ``SparseLinear.from_dense(linear, mask).quantize(bits=8)``; :meth:`dequantize` gives a float
    :class:`SparseLinear` back (with the quantized weights).
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, nnz: int = 0, bias: bool = True, *, device=None,
                 index_dtype: torch.dtype | None = None, activations: str | None = "int16"):
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(f"in_features/out_features must be >= 0, got {in_features}, {out_features}")
        if activations not in SPARSE_INT8_ACTIVATIONS:
            raise ValueError(f"activations must be 'int16' or None, got {activations!r}")
        self.activations = activations
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        idx = index_dtype or column_index_dtype(self.in_features)
        if idx == torch.uint16 and self.in_features > 65536:
            raise ValueError(f"index_dtype uint16 needs in_features <= 65536, got {self.in_features}")
        if idx not in (torch.uint16, torch.int32, torch.uint8):
            raise ValueError(f"index_dtype must be torch.uint16 / torch.int32 (CSR) or torch.uint8 (row bitmap), "
                             f"got {idx}")
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        shape = (out_features, (in_features + 7) // 8) if idx == torch.uint8 else (nnz,)
        self.register_buffer("col_indices", torch.zeros(shape, dtype=idx, device=device))
        self.register_buffer("values", torch.zeros(nnz, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def from_sparse(cls, layer: "SparseLinear", bits: int = 8, index: str | None = None,
                    activations: str | None = "int16") -> "SparseLinearInt8":
        """Quantize a float :class:`SparseLinear` (see :meth:`SparseLinear.quantize`)."""
        if isinstance(layer, SparseLinearInt8):
            raise ValueError("layer is already quantized (SparseLinearInt8, bits=8); quantize the float "
                             "SparseLinear instead (SparseLinearInt8.dequantize() gives one back)")
        if not isinstance(layer, SparseLinear):
            raise TypeError(f"layer must be a SparseLinear, got {type(layer).__name__}")
        if isinstance(bits, bool) or bits != 8:
            raise ValueError(f"bits must be 8 (int8 values with per-row scales), got {bits!r}")
        if index is not None and index not in INDEX_FORMATS:
            raise ValueError(f"index must be one of {INDEX_FORMATS} or None (the smaller), got {index!r}")
        if activations not in SPARSE_INT8_ACTIVATIONS:
            raise ValueError(f"activations must be 'int16' or None, got {activations!r}")
        index = index or pick_index_format(layer.nnz, layer.out_features, layer.in_features)
        q, scales = quantize_rows_int8(layer.values, layer.crow_indices)
        dev = layer.values.device
        m = cls(layer.in_features, layer.out_features, layer.nnz, layer.bias is not None, device=dev,
                index_dtype=torch.uint8 if index == "bitmap" else None, activations=activations)
        m.crow_indices = layer.crow_indices.detach().to(torch.int32).contiguous()
        if index == "bitmap":
            cols = layer.col_indices.detach().to(torch.int64)
            r = _rows_of(layer.crow_indices, layer.nnz)
            if layer.nnz > 1 and bool(((r[1:] == r[:-1]) & (cols[1:] <= cols[:-1])).any()):
                raise ValueError("index='bitmap' needs columns sorted and unique within each row (the values follow "
                                 "the bitmap's order); use index='csr'")
            m.col_indices = csr_to_bitmap(layer.crow_indices, cols, layer.in_features).contiguous()
        else:
            m.col_indices = layer.col_indices.detach().to(torch.int64).to(m.col_indices.dtype).contiguous()
        m.values = q.contiguous()
        m.scales = scales.contiguous()
        if layer.bias is not None:
            m.bias = layer.bias.detach().to(torch.float32).clone()
        return m

    def quantize(self, bits: int = 8) -> "SparseLinearInt8":
        raise ValueError(f"quantize(bits={bits!r}): this layer is already quantized (SparseLinearInt8, int8 values "
                         "with per-row scales); quantize the float SparseLinear instead")

    def check_pattern(self) -> None:
        """Validate the layer's tensors (ValueError naming the tensor and the rule): int32 ``crow_indices``
        (out_features+1 entries, monotone from 0 to nnz), int8 ``values`` (nnz), fp32 ``scales`` and
        ``bias`` (out_features); CSR ``col_indices`` (uint16 / int32, nnz, in [0, in_features), sorted within
        rows) or a uint8 row bitmap of shape (out_features, ceil(in_features / 8)) with no bit at or beyond
        in_features and ``crow[r+1] - crow[r]`` bits set in row r. Runs when a state dict is loaded and, on
        CUDA, once per change of the buffers before a call (the CPU kernels check these themselves)."""
        _check_dtypes({n: getattr(self, n) for n in self._RULES}, self._RULES)
        rows = self.out_features
        for name in ("scales", "bias"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (rows,):
                raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")
        if self.crow_indices.numel() != rows + 1:
            raise ValueError(f"crow_indices must have out_features+1={rows + 1} entries, got "
                             f"{self.crow_indices.numel()}")
        if self.col_indices.dtype != torch.uint8:
            check_csr(self.crow_indices, self.col_indices.to(torch.int64), (rows, self.in_features), values=self.values)
            return
        wb = (self.in_features + 7) // 8
        if tuple(self.col_indices.shape) != (rows, wb):
            raise ValueError(f"a uint8 col_indices bitmap must have shape ({rows}, {wb}) (out_features, "
                             f"ceil(in_features / 8)), got {tuple(self.col_indices.shape)}")
        check_row_pointers(self.crow_indices, self.values.numel())
        bm = self.col_indices.detach().cpu()
        if self.in_features % 8 and rows and bool((bm[:, -1] >> (self.in_features % 8)).any()):
            raise ValueError(f"the col_indices bitmap has bits set at or beyond in_features={self.in_features}")
        per_row = _POPCOUNT[bm.to(torch.int32)].sum(1, dtype=torch.int64)
        want = self.crow_indices.detach().cpu().to(torch.int64).diff()
        if not torch.equal(per_row, want):
            r = int((per_row != want).nonzero()[0, 0])
            raise ValueError(f"the col_indices bitmap disagrees with crow_indices: row {r} has {int(per_row[r])} bits "
                             f"set, crow_indices gives it {int(want[r])} values (a row's set bits must number "
                             "crow[r+1] - crow[r])")

    _RULES = {"crow_indices": ((torch.int32,), 1), "col_indices": ((torch.uint16, torch.int32, torch.uint8), None),
              "values": ((torch.int8,), 1), "scales": ((torch.float32,), 1), "bias": ((torch.float32,), 1)}

    def _check_key(self) -> tuple:
        return _version_key(self.crow_indices, self.col_indices, self.values, self.scales, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        def load():
            # a checkpoint may hold another pattern (nnz) or index width: adopt its sizes and dtypes first
            for name in ("col_indices", "values"):
                t = state_dict.get(prefix + name)
                cur = getattr(self, name)
                if isinstance(t, Tensor) and (t.shape != cur.shape or t.dtype != cur.dtype):
                    setattr(self, name, torch.zeros(t.shape, dtype=t.dtype, device=cur.device))
            super(SparseLinearInt8, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                                missing_keys, unexpected_keys, error_msgs)

        self._checked_load(state_dict, prefix, error_msgs, load)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dim in_features={self.in_features}, got {tuple(x.shape)}")
        if x.device.type != "cpu" and not torch.compiler.is_compiling():
            self._check_once()  # the CUDA kernel cannot raise on a malformed pattern (see spmm_int8.h)
        return sparse_linear_int8(x, self.crow_indices, self.col_indices, self.values, self.scales, self.bias,
                                  activations=self.activations)

    @property
    def index_format(self) -> str:
        """``"bitmap"`` (uint8 row bitmap) or ``"csr"`` (uint16 / int32 column indices)."""
        return "bitmap" if self.col_indices.dtype == torch.uint8 else "csr"

    def columns(self) -> Tensor:
        """int64 column index of every stored value (decoded from the bitmap in that layout)."""
        return _columns(self.col_indices, self.in_features)

    def weight_dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) dequantized dense weight (zeros off the pattern)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
        rows = _rows_of(self.crow_indices, self.nnz)
        w[rows, self.columns()] = _dequantized(self.crow_indices, self.values, self.scales, dtype)
        return w

    def dequantize(self, dtype: torch.dtype = torch.float32) -> "SparseLinear":
        """A float :class:`SparseLinear` with the dequantized weights (same pattern, trainable again)."""
        return SparseLinear.from_csr(self.crow_indices, self.columns().to(INDEX_DTYPE),
                                     _dequantized(self.crow_indices, self.values, self.scales, dtype),
                                     in_features=self.in_features,
                                     bias=None if self.bias is None else self.bias.to(dtype))

    def storage_bytes(self) -> dict[str, int]:
        """Bytes per stored tensor at their real bit widths (int8 values, 16- or 32-bit column indices or
        the 1-bit-per-weight row bitmap, int32 row pointers, fp32 scales and bias) and their ``total``: the
        layer's tensors as held in memory, as the kernel reads them and as save_compressed writes them
        (the kernel's transient decoded indices for a bitmap are not counted)."""
        d = {name: t.numel() * t.element_size() for name, t in
             (("values", self.values), ("col_indices", self.col_indices), ("crow_indices", self.crow_indices),
              ("scales", self.scales))}
        d["bias"] = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        d["total"] = sum(d.values())
        return d

    def csr_bytes(self) -> int:
        """Bytes of the weight (values + column indices + row pointers + scales), bias excluded as in
        :meth:`SparseLinear.csr_bytes`."""
        b = self.storage_bytes()
        return b["total"] - b["bias"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={self.density:.4f}, bits=8, index={self.index_format}, "
                f"col_indices={self.col_indices.dtype}, activations={self.activations}")
