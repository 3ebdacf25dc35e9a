"""A memory-lean RMSNorm for the Llama-family models of transformers.

transformers' ``LlamaRMSNorm`` (and the norms copied from it: Mistral, Mixtral, Qwen2, Qwen3, Phi-3)
computes in float32 and leaves autograd to keep what each of its elementwise steps needs: under bf16 /
fp16 that is a float32 copy of the input, the float32 normalised input and its low-precision cast, ten
bytes an element where the input itself is two (eight bytes against four under fp32). A student has two
norms a layer and a final one, each over every token of the batch, so these copies are a large part of
what the forward keeps for the backward.

:func:`lean_rms_norms` gives every such norm of a model a forward through :class:`RMSNormFunction`: the
same arithmetic in the same order (the output is bit-identical to transformers'), but it keeps only the
input and one float32 reciprocal root a row, and recomputes the normalised input in the backward. Norms
of another formula (Gemma's ``1 + weight``, Olmo2's) are left as they are.
"""

from __future__ import annotations

import functools
import types

import torch

__all__ = ["RMSNormFunction", "rms_norm", "lean_rms_norms"]


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, the mean and the product in float32, as
    transformers' ``LlamaRMSNorm`` (float64 inputs compute in float64); saves ``x`` and the float32
    ``rsqrt`` of each row only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            prod = (grad_out * normed).to(rstd.dtype).reshape(-1, x.shape[-1])
            grad_weight = prod.sum(0).reshape(weight.shape).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(rstd.dtype)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation of ``x``'s last dimension scaled by ``weight`` (see :class:`RMSNormFunction`)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be 1-D of x's last dimension {x.shape[-1]}, got shape {tuple(weight.shape)}")
    return RMSNormFunction.apply(x, weight, float(eps))


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, float(self.variance_epsilon))


@functools.lru_cache(maxsize=None)
def _llama_formula(cls: type) -> bool:
    """Whether ``cls.forward`` is transformers' ``LlamaRMSNorm.forward`` (the same code, as in the models
    whose norm transformers copies from Llama's)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    ref, code = LlamaRMSNorm.forward.__code__, getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and (code.co_code, code.co_names, code.co_consts) == (ref.co_code, ref.co_names,
                                                                                    ref.co_consts)


def lean_rms_norms(model: torch.nn.Module) -> int:
    """Give every Llama-formula RMSNorm of ``model`` the memory-lean forward (on the instance: the class,
    ``state_dict`` and export are unchanged; ``copy.deepcopy`` keeps it). Returns how many norms it set."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "forward", None), types.MethodType) and m.forward.__func__ is _lean_forward:
            continue
        if _llama_formula(type(m)) and isinstance(getattr(m, "weight", None), torch.Tensor) \
                and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_lean_forward, m)
            n += 1
    return n
