"""Mixed precision and activation checkpointing of a training stage (``distill.precision``,
``distill.gradient_checkpointing``; the teacher's ``training`` section takes the same keys).

``bf16`` / ``fp16`` run the forward passes under ``torch.autocast`` (the student's, the teacher's at every
step and the teacher pass of ``CausalLMTask.prepare``); the student's weights, its gradients and the
optimizer state stay float32 (the master weights). ``fp16`` scales the loss with ``torch.amp.GradScaler``
(gradients unscaled before clipping, steps with inf/nan gradients skipped). The frozen teacher is cast to
the low-precision dtype (it has no master weights to keep: half the memory). The fused ``kd_loss_linear``
casts its inputs to the autocast dtype itself (``raydistill.ops``).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and loss scaling for one stage on one device (``name``: fp32 | bf16 | fp16)."""

    def __init__(self, name: str, device: torch.device | str):
        if name not in DTYPES:
            raise ValueError(f"precision must be one of {list(DTYPES)}, got {name!r}")
        self.name, self.device = name, torch.device(device)
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=name == "fp16")

    def autocast(self):
        """The forward's context: ``torch.autocast`` in bf16 / fp16, nothing in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss scaled first under fp16."""
        self.scaler.scale(loss).backward()  # fp32 / bf16: the scaler is disabled and returns loss itself

    def step(self, optimizer, parameters, grad_clip: float | None = None) -> None:
        """Unscale (fp16), clip the gradient norm to ``grad_clip``, step (skipped on inf/nan under fp16)."""
        if grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the teacher) in the autocast dtype: no master weights, half the bytes."""
        return module if self.dtype is None else module.to(self.dtype)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' own activation checkpointing (non-reentrant, so DDP / FSDP and frozen inputs work);
    ValueError for a model without it."""
    from raydistill.utils import unwrap_model

    m = unwrap_model(model)
    if not (getattr(m, "supports_gradient_checkpointing", False) and hasattr(m, "gradient_checkpointing_enable")):
        raise ValueError(f"{type(m).__name__} does not support gradient checkpointing (transformers models whose "
                         f"class sets supports_gradient_checkpointing do)")
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
