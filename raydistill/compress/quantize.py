"""Weight (and dynamic activation) quantization of nn.Linear layers: post-training (PTQ) and
quantization-aware distillation (QAT, fake quantization with a straight-through estimator).

Schemes (``bits``, ``group_size``, ``activations``):

* ``bits=8``: int8 weights, symmetric, one fp32 scale per output channel (``group_size=None``) or per
  group of ``group_size`` input columns; ``scale = max|w| / 127``, ``q = round(w * (1 / scale))`` in [-127, 127] (fp32, the
  arithmetic of torch's fake quantization, so QAT trains with exactly the numbers that are stored).
* ``bits=4``: int4 weights in [-8, 7] (``scale = max|w| / 7``), group-wise, two per byte.
* ``bits=32``: no quantization (the identity step; lets a search compare fp32 with int8/int4).
* ``activations="int8"``: inputs quantized per call (dynamic, per tensor, asymmetric 7-bit unsigned as
  fbgemm's dynamic linear does: ``reduce_range``).

Backends (measured on torch 2.13 CPU, see docs/quantize.md): int8 per-channel weights with int8 dynamic
activations run through ``torch.ao``'s fbgemm dynamic linear (``torch.ao.nn.quantized.dynamic.Linear``
built from our int8 weights and scales: the fastest CPU path here); every other scheme dequantizes the
stored weights per call and runs a float matmul (torchao 0.18's CPU paths for these were no faster and
its int4 layout stores one value per byte). Fake quantization for QAT uses torch's own
``fake_quantize_per_channel_affine`` / ``fake_quantize_per_tensor_affine`` (straight-through gradients).

Public API::

    quantize(model, bits=8, group_size=None, activations=None, include=None, exclude=None) -> QuantizationReport
    prepare_qat(model, bits=8, group_size=None, activations=None, ...) -> QuantizationReport  # FakeQuantLinear
    QuantizedLinear, FakeQuantLinear, quantize_weight, dequantize_weight
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BITS", "QuantizedLinear", "FakeQuantLinear", "QuantizationReport", "QuantLayerReport", "quantize",
           "prepare_qat", "quantize_weight", "dequantize_weight", "check_scheme", "fake_quantize_weight",
           "fake_quantize_activation", "model_nbytes"]

BITS = (4, 8, 32)
ACTIVATIONS = (None, "int8")
_EPS = 1e-12  # smallest scale: an all-zero row/group quantizes to zeros, never divides by zero


def _qrange(bits: int) -> tuple[int, int]:
    return (-127, 127) if bits == 8 else (-8, 7)


def _qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


def check_scheme(bits, group_size, activations, in_features: int | None = None, name: str = "") -> None:
    """Raise ValueError naming the argument that breaks the rules (bits in 4/8/32; group_size a positive
    divisor of in_features; activations None or 'int8')."""
    where = f" (layer {name!r})" if name else ""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        if in_features is not None and in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}{where}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be None or 'int8', got {activations!r}")


def _groups(w: Tensor, group_size: int | None) -> Tensor:
    """(out, in) -> (out, n_groups, group) view."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    return w.reshape(out_f, in_f // g, g)


def _scales(w: Tensor, bits: int, group_size: int | None) -> Tensor:
    amax = _groups(w.detach(), group_size).abs().amax(dim=-1)
    return (amax / _qmax(bits)).clamp_min(_EPS).to(torch.float32)  # (out, n_groups)


@torch.no_grad()
def quantize_weight(w: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of a 2-D float weight: returns (int8 codes of shape (out, in), fp32 scales
    of shape (out, in // group_size) -- one column for per-channel)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    check_scheme(bits, group_size, None, w.shape[1])
    if bits == 32:
        raise ValueError("bits=32 is not a quantized format (nothing to quantize)")
    s = _scales(w, bits, group_size)
    lo, hi = _qrange(bits)
    # w * (1/s) in fp32, as torch.fake_quantize_per_channel_affine computes it (QAT's forward), not w / s:
    # the two differ by an ulp, which flips the code of a value near a .5 boundary (~1 weight in 10^4),
    # and a QAT-trained model would then not convert to the exact numbers it was trained with
    q = torch.round(_groups(w.float(), group_size) * s.reciprocal().unsqueeze(-1)).clamp_(lo, hi)
    return q.reshape(w.shape).to(torch.int8), s


def dequantize_weight(q: Tensor, scale: Tensor, group_size: int | None = None) -> Tensor:
    """fp32 weight from int8 codes (out, in) and scales (out, n_groups)."""
    return (_groups(q.float(), group_size) * scale.unsqueeze(-1)).reshape(q.shape)


def _pack_int4(q: Tensor) -> Tensor:
    """int8 codes in [-8, 7] -> uint8, two per byte (low nibble first), flattened row-major, padded."""
    flat = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_int4(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    n = shape[0] * shape[1]
    return torch.stack([lo, hi], dim=1).reshape(-1)[:n].reshape(shape)


# ----------------------------------------------------------------------------------------------------
# fake quantization (QAT)


def fake_quantize_weight(w: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """``dequantize(quantize(w))`` in the forward pass, identity gradient (straight-through estimator);
    the exact numbers :func:`quantize` will store."""
    if bits == 32:
        return w
    s = _scales(w, bits, group_size).reshape(-1)
    lo, hi = _qrange(bits)
    wg = _groups(w.float(), group_size).reshape(s.numel(), -1)  # one row per (channel, group)
    zp = torch.zeros(s.numel(), dtype=torch.int32, device=w.device)
    out = torch.fake_quantize_per_channel_affine(wg, s, zp, 0, lo, hi)
    return out.reshape(w.shape).to(w.dtype)


def _act_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-tensor qparams of quint8 with reduce_range (codes 0..127), as fbgemm's dynamic linear."""
    xmin = x.detach().amin().clamp(max=0.0).float()
    xmax = x.detach().amax().clamp(min=0.0).float()
    scale = ((xmax - xmin) / 127.0).clamp_min(_EPS)
    zp = torch.round(-xmin / scale).clamp(0, 127).to(torch.int32)
    return scale.reshape(1), zp.reshape(1)


def fake_quantize_activation(x: Tensor) -> Tensor:
    """Dynamic int8 fake quantization of an activation tensor (straight-through gradient)."""
    scale, zp = _act_qparams(x)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, 127).to(x.dtype)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear that trains through fake-quantized weights (and activations): same parameters and
    state-dict keys as nn.Linear, so checkpoints, masks and GradualPruner treat it as one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int | None = None, activations: str | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_scheme(bits, group_size, activations, in_features)
        self.bits, self.group_size, self.activations = bits, group_size, activations

    @classmethod
    def from_linear(cls, lin: nn.Linear, **scheme) -> "FakeQuantLinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                  dtype=lin.weight.dtype, **scheme)
        new.weight = lin.weight
        new.bias = lin.bias
        new.train(lin.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.activations == "int8":
            x = fake_quantize_activation(x)
        return F.linear(x, fake_quantize_weight(self.weight, self.bits, self.group_size), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, " \
                                      f"activations={self.activations}"


# ----------------------------------------------------------------------------------------------------
# the stored quantized layer


class QuantizedLinear(nn.Module):
    """A linear layer stored with quantized weights: ``qweight`` (int8 codes, or uint8 with two int4
    codes per byte), fp32 ``scale`` (out, in // group) and an fp32 ``bias``. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int | None = None, activations: str | None = None):
        super().__init__()
        check_scheme(bits, group_size, activations, in_features)
        if bits == 32:
            raise ValueError("bits=32 is not a quantized format; keep the nn.Linear")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.activations = bits, group_size, activations
        n_groups = 1 if group_size is None else in_features // group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("qweight", torch.zeros((out_features * in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._fbgemm = None  # cached torch.ao dynamic linear (not state)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, *, bits: int = 8, group_size: int | None = None,
                    activations: str | None = None) -> "QuantizedLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, bits=bits, group_size=group_size,
                activations=activations)
        codes, s = quantize_weight(lin.weight.detach().float().cpu(), bits, group_size)
        q.qweight.copy_(codes if bits == 8 else _pack_int4(codes))
        q.scale.copy_(s)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach().float().cpu())
        return q.to(lin.weight.device)

    def codes(self) -> Tensor:
        """int8 codes, (out, in)."""
        shape = (self.out_features, self.in_features)
        return self.qweight if self.bits == 8 else _unpack_int4(self.qweight, shape)

    def dequantize(self) -> Tensor:
        return dequantize_weight(self.codes(), self.scale, self.group_size)

    def _load_from_state_dict(self, *args, **kwargs):
        object.__setattr__(self, "_fbgemm", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _fbgemm_linear(self):
        if self._fbgemm is None:
            from torch.ao.nn.quantized.dynamic import Linear as DynLinear

            m = DynLinear(self.in_features, self.out_features, bias_=self.bias is not None, dtype=torch.qint8)
            wq = torch._make_per_channel_quantized_tensor(
                self.qweight.cpu(), self.scale[:, 0].double().cpu(),
                torch.zeros(self.out_features, dtype=torch.int64), 0)
            m.set_weight_bias(wq, None if self.bias is None else self.bias.cpu())
            object.__setattr__(self, "_fbgemm", m)  # a cache: not a submodule, not in the state dict
        return self._fbgemm

    def uses_fbgemm(self, x: Tensor | None = None) -> bool:
        return (self.bits == 8 and self.group_size is None and self.activations == "int8"
                and (x is None or (x.device.type == "cpu" and x.dtype == torch.float32))
                and "fbgemm" in torch.backends.quantized.supported_engines)

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_fbgemm(x):
            return self._fbgemm_linear()(x)
        if self.activations == "int8":
            x = fake_quantize_activation(x)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def nbytes(self) -> int:
        """Stored bytes: codes at their real width, scales, bias."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, activations={self.activations}")


# ----------------------------------------------------------------------------------------------------
# reports


@dataclass
class QuantLayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    activations: str | None
    bytes_before: int
    bytes_after: int
    backend: str


@dataclass
class QuantizationReport:
    """What a quantize / prepare_qat step changed; bytes are whole-model bytes at their real widths."""

    mode: str
    bits: int
    layers: list[QuantLayerReport] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        for r in d["layers"]:
            r["shape"] = list(r["shape"])
        return d


def model_nbytes(model: nn.Module) -> int:
    """Stored bytes of a model at real widths: parameters and persistent buffers (QuantizedLinear codes,
    scales; SparseLinear values and its CSR indices, both orientations it keeps)."""
    from raydistill.utils import unwrap_model

    total = 0
    seen: set[int] = set()
    for t in list(unwrap_model(model).state_dict(keep_vars=True).values()):
        if id(t) in seen or t is None:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _linear_bytes(mod: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))


def _select(model: nn.Module, include, exclude, types) -> dict[str, nn.Module]:
    from raydistill.compress.pruner import select_linear_layers

    return select_linear_layers(model, include, exclude, types=types)


def _replace(root: nn.Module, layers: dict[str, nn.Module], make) -> list[tuple[str, nn.Module, nn.Module]]:
    from raydistill.compress.convert import _module_path, _set_submodule

    done = []
    for name, mod in layers.items():
        new = make(name, mod)
        _set_submodule(root, _module_path(root, mod), new)
        done.append((name, mod, new))
    return done


def check_selection(fn: str, model: nn.Module, layers: dict, include, exclude, types) -> None:
    """``ValueError`` naming the argument when nothing is selected: a model with no layer of ``types``, or
    ``include`` / ``exclude`` patterns that leave none (quantizing nothing in silence hides a typo)."""
    if layers:
        return
    from raydistill.compress.pruner import normalize_name
    from raydistill.utils import unwrap_model

    kinds = " / ".join(t.__name__ if t is not nn.Linear else "nn.Linear" for t in types)
    names = [normalize_name(n) for n, m in unwrap_model(model).named_modules() if isinstance(m, types)]
    if not names:
        raise ValueError(f"{fn}: model has no {kinds} layer to quantize ({type(unwrap_model(model)).__name__}); "
                         "nothing would change")
    given = [f"{a}={v!r}" for a, v in (("include", include), ("exclude", exclude)) if v is not None]
    raise ValueError(f"{fn}: {' with '.join(given)} leaves no layer to quantize; the model's {kinds} layers "
                     f"are {names}")


def _check_layers(layers: dict[str, nn.Module], bits, group_size, activations) -> None:
    from raydistill.ops.sparse import SparseLinear

    for name, mod in layers.items():
        if isinstance(mod, QuantizedLinear):
            raise ValueError(f"quantize: layer {name!r} is already quantized ({mod.bits}-bit); quantize a float "
                             "model (quantizing twice compounds the rounding error)")
        check_scheme(bits, group_size, activations, mod.in_features, name)


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None, activations: str | None = None,
             *, include=None, exclude=None) -> QuantizationReport:
    """Replace the selected nn.Linear (and FakeQuantLinear, after QAT) layers of ``model`` with
    :class:`QuantizedLinear`, in place. ``bits=32`` changes nothing. SparseLinear layers are quantized by
    ``SparseLinear.quantize(bits=8)`` (int8 sparse kernels) when that exists.

    Errors (ValueError naming the argument): bits not in 4/8/32, group_size not dividing a layer's
    in_features, activations not None/'int8', a layer that is already quantized, no layer to quantize (a
    model without one, or ``include`` / ``exclude`` leaving none)."""
    from raydistill.utils import unwrap_model
    from raydistill.ops.sparse import SparseLinear

    check_scheme(bits, group_size, activations)
    base = unwrap_model(model)
    before = model_nbytes(base)
    already = _select(base, include, exclude, (QuantizedLinear,))
    _check_layers(already, bits, group_size, activations)
    rep = QuantizationReport(mode="ptq", bits=bits, bytes_before=before, bytes_after=before)
    if bits == 32:
        return rep
    layers = _select(base, include, exclude, (nn.Linear, SparseLinear))
    check_selection("quantize", base, layers, include, exclude, (nn.Linear, SparseLinear))
    _check_layers(layers, bits, group_size, activations)
    sparse = {k: v for k, v in layers.items() if isinstance(v, SparseLinear)}
    if sparse:
        if not hasattr(SparseLinear, "quantize"):
            # INTEGRATION POINT (issue 12 point 3): int8 SparseLinear lands separately in ops/sparse.py.
            raise NotImplementedError(
                f"quantize: layers {sorted(sparse)} are SparseLinear and this build has no "
                "SparseLinear.quantize (int8 sparse kernels); quantize before converting to SparseLinear")
        if bits != 8 or group_size is not None or activations is not None:
            raise ValueError(f"quantize: SparseLinear layers {sorted(sparse)} support bits=8, per-row scales "
                             "(group_size=None) and fp32 activations only")

    def make(name, mod):
        if isinstance(mod, SparseLinear):
            return mod.quantize(bits=8)
        q = QuantizedLinear.from_linear(mod, bits=bits, group_size=group_size, activations=activations)
        rep.layers.append(QuantLayerReport(
            name, (mod.out_features, mod.in_features), bits, group_size, activations, _linear_bytes(mod),
            q.nbytes(), "torch.ao fbgemm dynamic int8" if q.uses_fbgemm() else "dequantize + fp32 matmul"))
        return q

    for name, old, new in _replace(base, layers, make):
        if isinstance(old, SparseLinear):
            rep.layers.append(QuantLayerReport(name, (old.out_features, old.in_features), 8, None, None,
                                               model_nbytes(old), model_nbytes(new), "int8 SparseLinear"))
    order = {name: i for i, name in enumerate(layers)}
    rep.layers.sort(key=lambda r: order[r.name])  # the model's layer order, dense and sparse alike
    rep.bytes_after = model_nbytes(base)
    return rep


def prepare_qat(model: nn.Module, bits: int = 8, group_size: int | None = None, activations: str | None = None,
                *, include=None, exclude=None) -> QuantizationReport:
    """Swap the selected nn.Linear layers for :class:`FakeQuantLinear` (same parameters) for
    quantization-aware training; :func:`quantize` afterwards stores exactly the fake-quantized weights."""
    from raydistill.utils import unwrap_model

    check_scheme(bits, group_size, activations)
    base = unwrap_model(model)
    before = model_nbytes(base)
    _check_layers(_select(base, include, exclude, (QuantizedLinear,)), bits, group_size, activations)
    rep = QuantizationReport(mode="qat", bits=bits, bytes_before=before, bytes_after=before)
    if bits == 32:
        return rep
    layers = {k: v for k, v in _select(base, include, exclude, (nn.Linear,)).items()
              if not isinstance(v, FakeQuantLinear)}
    _check_layers(layers, bits, group_size, activations)

    def make(name, mod):
        rep.layers.append(QuantLayerReport(name, (mod.out_features, mod.in_features), bits, group_size,
                                           activations, _linear_bytes(mod), _linear_bytes(mod), "fake quant"))
        return FakeQuantLinear.from_linear(mod, bits=bits, group_size=group_size, activations=activations)

    _replace(base, layers, make)
    return rep
