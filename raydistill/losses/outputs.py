"""What loss terms read: the outputs of the student and of each teacher on one batch, in the form the task
gives them (``Outputs``), and what a term asks the task for (``Needs``).

Tensors keep the task's leading shape: ``(B,)`` rows for classification, ``(B, S)`` positions for a causal
LM; ``labels`` and ``mask`` have that leading shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """What a term needs from one model on a batch.

    ``logits``: the output distribution: ``Outputs.logits``, or for an offline teacher ``Outputs.topk`` (and
    ``Outputs.topk_tail`` where its cache has the tail and ``distill.topk_tail`` lets the loss use it).
    ``head``: ``Outputs.head`` (the last hidden states and the output layer) serves as well, so that a fused
    ``kd_loss_linear`` never materialises the logits; the task gives it where the model has such a layer
    and the stage fuses (``distill.fused_linear``). ``hidden``: the hidden states of these layers (1-based:
    layer ``i`` is the output of the model's ``i``-th hidden layer)."""

    logits: bool = False
    head: bool = False
    hidden: frozenset[int] = frozenset()

    def __or__(self, other: "Needs") -> "Needs":
        """What both need: the output layer serves only if it serves every term that reads the logits."""
        logits = self.logits or other.logits
        head = logits and (self.head or not self.logits) and (other.head or not other.logits)
        return Needs(logits, head, self.hidden | other.hidden)


@dataclass
class Outputs:
    """One model's outputs on a batch (any subset, as asked)."""

    logits: Tensor | None = None                        # (..., V) over the tokenizer's / classes' ids
    head: tuple[Tensor, Tensor, Tensor | None] | None = None  # (last hidden (..., H), weight (V', H), bias)
    topk: tuple[Tensor, Tensor] | None = None           # offline teacher: (..., k) logits and their ids
    topk_tail: Tensor | None = None                     # offline teacher: (...) log of its mass outside the top-k
    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer -> (..., H_layer)


@dataclass
class StepOutputs:
    """Everything the terms of a ``Criterion`` read on one batch.

    ``labels``: hard labels (``ignore_index`` where a row / position has none). ``kd_mask``: the rows a
    soft (teacher) term averages over; None means "where ``labels`` is set" (a causal LM: every position
    with a next token), a tensor is given when rows without a hard label still get the soft term
    (classification's unlabelled transfer rows). ``mask``: the positions whose hidden states count
    (padding excluded). ``vocab``: the shared output ids (padded vocabularies are sliced to it)."""

    student: Outputs
    teachers: dict[str, Outputs]
    labels: Tensor
    mask: Tensor
    vocab: int
    ignore_index: int = -100
    kd_mask: Tensor | None = None                      # set only when some soft rows have no hard label
    count: int = 0                                      # rows or tokens (throughput)

    def all_labelled(self) -> bool:
        """Every row a soft term counts also has a hard label (then kd_logits + ce fuse into one call)."""
        return self.kd_mask is None
