"""Gradual pruning of nn.Linear layers during training (dense weights with masks)."""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn

from raydistill.compress.masks import (block_mask, check_sparsity, global_magnitude_masks, magnitude_mask,
                                       nm_mask, num_pruned, _block_shape, _prune_lowest)
from raydistill.compress.schedule import cubic_sparsity
from raydistill.utils import unwrap_model

__all__ = ["GradualPruner", "normalize_name", "select_linear_layers", "METHODS", "SCOPES"]

METHODS = ("magnitude", "nm", "block")
SCOPES = ("layer", "global")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def normalize_name(name: str) -> str:
    """Strip wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) from a module name."""
    parts = [p for p in name.split(".") if p and p + "." not in _WRAPPER_PREFIXES]
    return ".".join(parts)


def _patterns(p, name: str) -> list[str] | None:
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    if isinstance(p, (list, tuple)) and all(isinstance(x, str) for x in p):
        return list(p)
    raise TypeError(f"{name} must be a str, a list of fnmatch patterns or None, got {p!r}")


def select_linear_layers(model: nn.Module, include=None, exclude=None, types=(nn.Linear,)) -> dict[str, nn.Module]:
    """Layers of ``types`` whose normalised names match an ``include`` pattern (default: all) and no
    ``exclude`` pattern (fnmatch). Returns {normalised name: module}, in module order."""
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude") or []
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = {}
    for name, mod in unwrap_model(model).named_modules():
        if not isinstance(mod, types):
            continue
        n = normalize_name(name)
        if inc is not None and not any(fnmatch.fnmatchcase(n, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(n, p) for p in exc):
            continue
        out[n] = mod
    return out


def check_patterns_match(model: nn.Module, *, include=None, exclude=None, types=(nn.Linear,)) -> None:
    """Raise ``ValueError`` if an ``include`` or ``exclude`` pattern matches no layer of ``types`` (a typo
    such as ``exclude=['haed']`` would otherwise silently prune the layer it meant to keep)."""
    names = [normalize_name(n) for n, m in unwrap_model(model).named_modules() if isinstance(m, types)]
    for arg, pats in (("include", _patterns(include, "include")), ("exclude", _patterns(exclude, "exclude"))):
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"{arg} pattern {p!r} matches no {'/'.join('nn.' + t.__name__ for t in types)} layer; "
                                 f"the model's layers are {names}")


def compute_masks(weights: dict[str, Tensor], sparsity: float, method: str = "magnitude", *,
                  scope: str = "layer", n: int = 2, m: int = 4, block=4) -> dict[str, Tensor]:
    """Masks for the given weights (True = keep) with one of the METHODS."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if method == "nm":
        return {k: nm_mask(w, n, m) for k, w in weights.items()}
    s = check_sparsity(sparsity)
    if method == "magnitude":
        if scope == "global":
            return global_magnitude_masks(weights, s)
        return {k: magnitude_mask(w, s) for k, w in weights.items()}
    if scope == "global":
        raise ValueError("scope='global' is only supported for method='magnitude'")
    return {k: block_mask(w, s, block) for k, w in weights.items()}


class GradualPruner:
    """Prune the selected nn.Linear weights to ``final_sparsity`` along the cubic schedule
    (:func:`cubic_sparsity`), training dense weights under masks.

    Call :meth:`step` after every ``optimizer.step()``: at multiples of ``frequency`` within
    [begin_step, end_step] the masks are recomputed from the current weight magnitudes (monotonically:
    a pruned weight stays pruned), and on every call the masks are re-applied so pruned weights stay
    exactly zero through optimizer updates (momentum/Adam state would otherwise revive them).

    ``method="nm"``: N:M is not a gradual target -- the N:M masks (sparsity 1 - n/m) apply from
    ``begin_step`` on and are recomputed every ``frequency`` steps until ``end_step``.
    ``method="block"``: the cubic schedule with block masks. ``scope="global"`` (magnitude only): one
    threshold over all selected layers.

    Layer names are normalised (DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed),
    so masks from a wrapped model apply to the unwrapped one and vice versa.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, method: str = "magnitude",
                 initial_sparsity: float = 0.0, begin_step: int = 0, end_step: int, frequency: int = 1,
                 include=None, exclude=None, scope: str = "layer", n: int = 2, m: int = 4, block=4):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "global" and method != "magnitude":
            raise ValueError("scope='global' is only supported for method='magnitude'")
        if method == "nm":
            nm_mask(torch.zeros(1, m if isinstance(m, int) and m > 0 else 1), n, m)  # validates n, m
        if method == "block":
            _block_shape(block)
        # validates the schedule arguments (raises with the argument's name)
        cubic_sparsity(begin_step, initial_sparsity=initial_sparsity, final_sparsity=final_sparsity,
                       begin_step=begin_step, end_step=end_step, frequency=frequency)
        self.model = model
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        self.method, self.scope = method, scope
        self.begin_step, self.end_step, self.frequency = int(begin_step), int(end_step), int(frequency)
        self.n, self.m, self.block = n, m, block
        check_patterns_match(model, include=include, exclude=exclude)
        self.layers = select_linear_layers(model, include, exclude)
        if not self.layers:
            raise ValueError(f"no nn.Linear layer matches include={include!r} exclude={exclude!r}")
        self.masks: dict[str, Tensor] = {
            k: torch.ones_like(mod.weight, dtype=torch.bool) for k, mod in self.layers.items()}
        self.last_step: int | None = None
        self.target: float = 0.0

    # schedule -------------------------------------------------------------------------------------
    def target_sparsity(self, step: int) -> float:
        if self.method == "nm":
            return 1.0 - self.n / self.m if step >= self.begin_step else 0.0
        return cubic_sparsity(step, initial_sparsity=self.initial_sparsity, final_sparsity=self.final_sparsity,
                              begin_step=self.begin_step, end_step=self.end_step, frequency=self.frequency)

    def _is_update_step(self, step: int) -> bool:
        return (self.begin_step <= step <= self.end_step
                and (step - self.begin_step) % self.frequency == 0)

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute the masks at ``sparsity`` from current magnitudes (pruned entries stay pruned)."""
        if self.method == "nm":
            new = compute_masks({k: mod.weight for k, mod in self.layers.items()}, 0.0, "nm", n=self.n, m=self.m)
        else:
            # already-pruned entries score -1: with a non-decreasing target they stay pruned
            scores = {}
            for k, mod in self.layers.items():
                w = mod.weight.detach().float().abs()
                scores[k] = torch.where(self.masks[k].to(w.device), w, torch.full_like(w, -1.0))
            if self.method == "block":
                new = compute_masks({k: w.clamp_min(0.0) for k, w in scores.items()}, sparsity, "block",
                                    block=self.block)
            elif self.scope == "global":
                flat = torch.cat([w.cpu().reshape(-1) for w in scores.values()])
                keep = _prune_lowest(flat, num_pruned(flat.numel(), sparsity))
                new, i = {}, 0
                for k, w in scores.items():
                    new[k] = keep[i:i + w.numel()].reshape(w.shape)
                    i += w.numel()
            else:
                new = {k: _prune_lowest(w, num_pruned(w.numel(), sparsity)).reshape(w.shape)
                       for k, w in scores.items()}
        self.masks = {k: v.to(self.layers[k].weight.device) for k, v in new.items()}

    def step(self, step: int) -> float:
        """Advance to ``step`` (call after optimizer.step()); returns the current target sparsity."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        target = self.target_sparsity(step)
        if self._is_update_step(step) and (self.method == "nm" or target > 0.0):
            self.update_masks(target)
        elif step >= self.begin_step and self.last_step is None and target > 0.0:
            self.update_masks(target)  # resumed/started mid-schedule: catch up once
        self.target = target
        self.last_step = step
        self.apply()
        return target

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights (idempotent)."""
        for k, mod in self.layers.items():
            mask = self.masks[k]
            if mask.device != mod.weight.device:
                mask = self.masks[k] = mask.to(mod.weight.device)
            mod.weight.mul_(mask.to(mod.weight.dtype))

    def sparsity(self) -> float:
        """Actual fraction of exact zeros over the selected weights."""
        zeros = total = 0
        for mod in self.layers.values():
            zeros += int((mod.weight.detach() == 0).sum())
            total += mod.weight.numel()
        return zeros / total if total else 0.0

    def mask_sparsity(self) -> float:
        """Fraction of False entries over the masks."""
        total = sum(v.numel() for v in self.masks.values())
        return sum(int((~v).sum()) for v in self.masks.values()) / total if total else 0.0

    # checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "target": self.target,
            "masks": {k: v.detach().cpu().clone() for k, v in self.masks.items()},
            "config": {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                       "method": self.method, "scope": self.scope, "begin_step": self.begin_step,
                       "end_step": self.end_step, "frequency": self.frequency, "n": self.n, "m": self.m,
                       "block": self.block},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore masks and step (the layer set must match) and re-apply the masks."""
        if not isinstance(state, dict) or "masks" not in state:
            raise TypeError("state must be a dict from GradualPruner.state_dict()")
        masks = {normalize_name(k): v for k, v in state["masks"].items()}
        if set(masks) != set(self.layers):
            raise ValueError(f"state masks are for layers {sorted(masks)}, this pruner has {sorted(self.layers)}")
        for k, v in masks.items():
            if tuple(v.shape) != tuple(self.layers[k].weight.shape):
                raise ValueError(f"mask {k!r} has shape {tuple(v.shape)}, weight has {tuple(self.layers[k].weight.shape)}")
        self.masks = {k: v.to(self.layers[k].weight.device, torch.bool) for k, v in masks.items()}
        self.last_step = state.get("last_step")
        self.target = float(state.get("target", 0.0))
        self.apply()

    def __repr__(self) -> str:
        return (f"GradualPruner(layers={len(self.layers)}, method={self.method!r}, scope={self.scope!r}, "
                f"final_sparsity={self.final_sparsity}, steps={self.begin_step}..{self.end_step}/"
                f"{self.frequency}, target={self.target:.4f})")
