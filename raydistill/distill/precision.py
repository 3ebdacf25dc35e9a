"""Mixed precision and activation checkpointing of a training stage (``distill.precision``,
``distill.gradient_checkpointing``; the teacher's ``training`` section takes the same keys).

``bf16`` / ``fp16`` keep float32 **master weights** and optimizer state, and run the student's forward and
backward on a **compute copy** of it in the low-precision dtype (:meth:`Precision.compute_model`; Megatron's
and DeepSpeed's scheme): every activation the backward keeps is then bf16 / fp16, where ``torch.autocast``
alone leaves a transformer's residual stream, its norms and each matmul input's cast copy in float32 (on
the rehearsal's Llama, autocast keeps 0.69x of float32's saved activations, the compute copy 0.55x). Each
optimizer step moves the compute copy's gradients to the master weights in float32 (summed over the
micro-batches of ``distill.grad_accum_steps`` in the compute dtype, as DDP reduces them), steps the
optimizer on the master weights, and the next forward copies them back (after the pruner's masks). Buffers
(a rotary embedding's frequencies) stay float32. Checkpoints, evaluation and export read the master weights.
The forward passes also run under ``torch.autocast`` (the loss terms' own projections, the teacher pass of
``CausalLMTask.prepare``). FSDP-sharded students use FSDP2's own mixed precision instead (float32 shards,
parameters gathered in bf16 / fp16, gradients reduced in float32: ``loop.wrap_model``); QAT students keep
float32 parameters under autocast only. ``fp16`` scales the loss with ``torch.amp.GradScaler`` (gradients unscaled before clipping, steps with
inf/nan gradients skipped). The frozen teacher is cast to the low-precision dtype (it has no master weights
to keep: half the memory). The fused ``kd_loss_linear`` casts float32 inputs to the autocast dtype itself
(``raydistill.ops``).
"""

from __future__ import annotations

import contextlib
import copy

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
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (master, compute)
        self._stale = False  # the master weights changed since the compute copy was last written

    def compute_model(self, base: torch.nn.Module, *, master_weights: bool = True) -> torch.nn.Module:
        """The module the student's forward and backward run on: ``base`` itself in fp32 (or with
        ``master_weights`` False), else a copy of it whose parameters are in the low-precision dtype (buffers
        keep theirs); ``base`` then holds the float32 master weights, which :meth:`optimized_parameters`
        gives the optimizer."""
        if self.dtype is None or not master_weights:
            self._pairs = []
            return base
        compute = copy.deepcopy(base)
        for p in compute.parameters():
            if p.is_floating_point():
                p.data = p.data.to(self.dtype)
        names = [n for n, _ in base.named_parameters()]
        if names != [n for n, _ in compute.named_parameters()]:  # deepcopy keeps the order; a guard, not a rule
            raise RuntimeError("the compute copy's parameters differ from the student's")
        self._pairs = list(zip(base.parameters(), compute.parameters()))
        self._stale = True  # the first step's sync also carries edits made after the copy (the pruner's masks)
        return compute

    @property
    def has_master_weights(self) -> bool:
        """Whether the forward runs on a low-precision compute copy of float32 master weights."""
        return bool(self._pairs)

    def optimized_parameters(self, model: torch.nn.Module) -> list:
        """The parameters the optimizer updates: the master weights, or ``model``'s own."""
        return [m for m, _ in self._pairs] if self._pairs else list(model.parameters())

    @torch.no_grad()
    def sync(self) -> None:
        """Write the master weights into the compute copy if they changed (an optimizer step, the pruner's
        masks): call before a forward of the compute copy."""
        if self._pairs and self._stale:
            torch._foreach_copy_([c for _, c in self._pairs], [m for m, _ in self._pairs])
            self._stale = False

    def master_gradients(self, model: torch.nn.Module) -> list:
        """After the backward passes of a step: the compute copy's gradients moved to the master weights in
        float32 (the compute copy's freed); returns :meth:`optimized_parameters`."""
        for m, c in self._pairs:
            m.grad = None if c.grad is None else c.grad.to(torch.float32)
            c.grad = None
        return self.optimized_parameters(model)

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
        self._stale = True

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


def lean_activations(model: torch.nn.Module, *, gradient_checkpointing: bool = False) -> int:
    """What a trained model keeps for its backward, made smaller: transformers' activation checkpointing
    when ``gradient_checkpointing`` (ValueError for a model without it), and the memory-lean RMSNorm of
    ``raydistill.models.norms`` for every Llama-family norm (the same outputs, one copy of the input kept
    instead of two to five). Returns how many norms it set."""
    from raydistill.models.norms import lean_rms_norms
    from raydistill.utils import unwrap_model

    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return lean_rms_norms(unwrap_model(model))
