"""Structured pruning: remove whole hidden units of MLPs, giving a smaller dense model.

A *unit pair* is two nn.Linear layers ``a -> f -> b`` that follow each other in an ``nn.Sequential``
with only elementwise activations ``f`` between them whose ``f(0) = 0`` (ReLU, GELU, SiLU, Tanh,
LeakyReLU, ELU, Dropout, Identity). Removing hidden unit ``k`` drops row ``k`` of ``a`` (and its bias) and
column ``k`` of ``b``; a unit whose output is always zero contributes nothing, so removing it keeps the
function exactly. The model's outputs (the last Linear's rows) are never removed.

Ranking (``calibration=None``): the L2 norm of the unit's incoming weights and bias (row ``k`` of ``a``).
With a calibration batch (the Minitron recipe, Muralidharan et al. 2024): the unit's activation
importance, ``sqrt(mean over rows of f(a(x))_k ** 2)`` measured at ``b``'s input in one forward pass.

Attention heads are not handled here yet: the repository has no transformer student (see
docs/quantize.md).

Public API::

    prune_structured(model, ratio=0.5, calibration=None, include=None, exclude=None) -> StructuredReport
    resize_structured(model, widths)   # shapes only (to load a pruned checkpoint into a fresh model)
    unit_pairs(model) -> list[(name_a, name_b)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["prune_structured", "resize_structured", "unit_pairs", "StructuredReport"]

_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Dropout, nn.Identity,
                    nn.Hardtanh, nn.Mish)


@dataclass
class StructuredReport:
    """What prune_structured changed: per layer the units before/after; whole-model params and bytes."""

    ratio: float
    ranking: str
    layers: list[dict] = field(default_factory=list)  # {name, units_before, units_after}
    widths: dict[str, int] = field(default_factory=dict)  # {layer a: out_features after}
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"compression_ratio": self.compression_ratio}


def _linear_like(m: nn.Module) -> bool:
    """nn.Linear, or a layer standing in for one (QuantizedLinear, SparseLinear, ...)."""
    return isinstance(m, nn.Linear) or (isinstance(getattr(m, "in_features", None), int)
                                        and isinstance(getattr(m, "out_features", None), int))


def unit_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(a, b) names of consecutive nn.Linear layers in an nn.Sequential joined by zero-preserving
    elementwise modules only."""
    from raydistill.compress.pruner import normalize_name, unwrap_model

    base = unwrap_model(model)
    pairs = []
    for pname, mod in base.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        prev = None
        for cname, child in mod.named_children():
            full = normalize_name(f"{pname}.{cname}" if pname else cname)
            if _linear_like(child):
                if prev is not None:
                    pairs.append((prev, full))
                prev = full
            elif not isinstance(child, _ZERO_PRESERVING):
                prev = None
    return pairs


def _params_bytes(model: nn.Module) -> tuple[int, int]:
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() * p.element_size() for p in ps)


def _check_float_linear(name: str, mod: nn.Module) -> None:
    if type(mod) is not nn.Linear:
        raise ValueError(f"prune_structured: layer {name!r} is a {type(mod).__name__}, not a float nn.Linear; "
                         "prune_structured must run before prune (SparseLinear) and quantize steps")


@torch.no_grad()
def _activation_importance(model: nn.Module, layers: dict[str, nn.Module], pairs, calibration: Tensor) -> dict:
    sums: dict[str, Tensor] = {}
    rows = {"n": 0}
    hooks = []
    for a, b in pairs:
        def hook(_mod, inp, a=a):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[a] = sums.get(a, 0) + (x * x).sum(0)
        hooks.append(layers[b].register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        out_rows = calibration.shape[0] if calibration.dim() > 1 else 1
        model(calibration)
        rows["n"] = out_rows
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {a: (s / max(1, rows["n"])).sqrt() for a, s in sums.items()}


def _apply(base: nn.Module, layers: dict[str, nn.Module], keep: dict[str, Tensor], pairs) -> None:
    from raydistill.compress.convert import _set_submodule

    col_keep = {b: keep[a] for a, b in pairs if a in keep}
    for name in dict.fromkeys([n for p in pairs for n in p]):
        old = layers[name]
        rows = keep.get(name)
        cols = col_keep.get(name)
        w = old.weight
        if rows is not None:
            w = w[rows.to(w.device)]
        if cols is not None:
            w = w[:, cols.to(w.device)]
        new = nn.Linear(w.shape[1], w.shape[0], old.bias is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias if rows is None else old.bias[rows.to(w.device)])
        new.train(old.training)
        _set_submodule(base, name, new)


@torch.no_grad()
def prune_structured(model: nn.Module, ratio: float = 0.5, calibration: Tensor | None = None, *, include=None,
                     exclude=None) -> StructuredReport:
    """Remove ``round(ratio * units)`` hidden units of every selected unit pair's first layer (in
    place; the layers are replaced by smaller nn.Linear). ``include``/``exclude`` are fnmatch patterns on
    the first layer's name. ``calibration``: a batch of model inputs for activation ranking (None: weight
    norm). Returns a :class:`StructuredReport` (``widths`` rebuilds the shapes: :func:`resize_structured`)."""
    from raydistill.compress.pruner import _patterns, normalize_name, unwrap_model
    import fnmatch

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a float in [0, 1) (the fraction of hidden units removed), got {ratio!r}")
    if calibration is not None and (not isinstance(calibration, Tensor) or calibration.numel() == 0):
        raise ValueError("calibration must be a non-empty Tensor batch of model inputs, or None")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude") or []
    base = unwrap_model(model)
    layers = {normalize_name(n): m for n, m in base.named_modules()}
    pairs = [(a, b) for a, b in unit_pairs(base)
             if (inc is None or any(fnmatch.fnmatchcase(a, p) for p in inc))
             and not any(fnmatch.fnmatchcase(a, p) for p in exc)]
    if not pairs:
        raise ValueError(f"prune_structured: no Linear -> activation -> Linear pair in the model matches "
                         f"include={include!r} exclude={exclude!r}")
    for a, b in pairs:
        _check_float_linear(a, layers[a])
        _check_float_linear(b, layers[b])
    ratio = float(ratio)
    for a, _ in pairs:
        n = layers[a].out_features
        if n - round(ratio * n) < 1:
            raise ValueError(f"prune_structured: ratio {ratio} would remove every unit of layer {a!r} "
                             f"({n} units); use a smaller ratio")
    params_b, bytes_b = _params_bytes(base)
    if calibration is not None:
        dev = next(base.parameters()).device
        scores = _activation_importance(base, layers, pairs, calibration.to(dev))
    else:
        scores = {a: torch.cat([layers[a].weight.float(), layers[a].bias.float()[:, None]], 1).norm(dim=1)
                  if layers[a].bias is not None else layers[a].weight.float().norm(dim=1) for a, _ in pairs}
    keep: dict[str, Tensor] = {}
    rep = StructuredReport(ratio=ratio, ranking="activation" if calibration is not None else "weight_norm")
    for a, _ in pairs:
        n = layers[a].out_features
        k = n - round(ratio * n)
        order = torch.argsort(scores[a].cpu(), descending=True, stable=True)
        keep[a] = order[:k].sort().values
        rep.layers.append({"name": a, "units_before": n, "units_after": k})
        rep.widths[a] = k
    _apply(base, layers, keep, pairs)
    rep.params_before, rep.bytes_before = params_b, bytes_b
    rep.params_after, rep.bytes_after = _params_bytes(base)
    return rep


@torch.no_grad()
def resize_structured(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Give the unit pairs' first layers the given out_features (keeping their first units) so that a
    state dict saved after :func:`prune_structured` loads into a freshly built model."""
    from raydistill.compress.pruner import normalize_name, unwrap_model

    base = unwrap_model(model)
    layers = {normalize_name(n): m for n, m in base.named_modules()}
    pairs = [(a, b) for a, b in unit_pairs(base) if a in widths]
    missing = set(widths) - {a for a, _ in pairs}
    if missing:
        raise ValueError(f"resize_structured: widths name layers that are not the first layer of a unit pair: "
                         f"{sorted(missing)}")
    keep = {}
    for a, _ in pairs:
        w = int(widths[a])
        if not 1 <= w <= layers[a].out_features:
            raise ValueError(f"resize_structured: width {w} for {a!r} must be in [1, {layers[a].out_features}]")
        keep[a] = torch.arange(w)
    _apply(base, layers, keep, pairs)
    return model
