"""``Criterion``: the weighted sum of a stage's loss terms (``distill.terms``).

    criterion = Criterion(spec.terms, student=task.layout(student), teachers={name: task.layout(t), ...})
    needs = criterion.needs()                 # {None: student's Needs, teacher name: its Needs}
    loss = criterion(outputs)                 # total = sum_i weight_i * term_i(outputs)
    loss = criterion(outputs, values=vals)    # the same, and vals[label] = each term's value (detached)
    criterion.values(outputs)                 # {label: value} of each term, for the logs

A ``ce`` term and the first one-teacher ``kd_logits`` term run as ONE fused kernel call,
``(w_kd + w_ce) * kd_loss(alpha = w_kd / (w_kd + w_ce))`` (``kd_loss_linear`` with the output layer: no
tokens x vocabulary logits), which is exactly ``w_kd * kd + w_ce * ce``: the terms cost nothing on the
path that ``distill.temperature`` / ``distill.alpha`` describe. Terms of weight 0 are not computed.
The criterion's parameters (the projections of ``hidden`` terms) belong to the student's training: they
are optimised with it and saved in the train state of a checkpoint, never with the model's weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.losses.outputs import Needs, StepOutputs
from raydistill.losses.registry import TERMS
from raydistill.losses.terms import CrossEntropy, KDLogits, Layout, Term


def build_term(spec: dict, student: Layout | None = None, teachers: dict[str, Layout] | None = None) -> Term:
    """The term of a resolved spec (``{"type": ..., "weight": ..., ...}``); ``student`` / ``teachers``: the
    models' hidden-layer layouts (needed by terms on hidden states). ValueError names the term's key."""
    kind = spec.get("type")
    if kind not in TERMS:
        raise ValueError(f"{spec.get('key', 'distill.terms')}.type: unknown loss term {kind!r}; "
                         f"use one of {sorted(TERMS)}")
    return TERMS[kind](spec, student=student, teachers=teachers or {})


class Criterion(nn.Module):
    def __init__(self, terms: list[dict] | tuple[dict, ...], *, student: Layout | None = None,
                 teachers: dict[str, Layout] | None = None, fuse: bool = True):
        super().__init__()
        if not any(float(t["weight"]) > 0 for t in terms):
            raise ValueError("distill.terms: every term's weight is 0; give at least one a positive weight")
        built = [build_term(t, student, teachers) for t in terms if float(t["weight"]) > 0]
        self.terms = nn.ModuleList(built)
        self.labels = _unique([t.label for t in built])
        self.pair: tuple[int, int] | None = _fusable_pair(built) if fuse else None

    def needs(self) -> dict[str | None, Needs]:
        """What the task must give: ``None`` -> the student, a teacher's name -> that teacher."""
        out: dict[str | None, Needs] = {}
        for i, term in enumerate(self.terms):
            for who, n in term.needs().items():
                if self.pair is not None and i in self.pair and n.logits:
                    n = Needs(logits=True, head=True, hidden=n.hidden)  # the fused call takes the output layer
                out[who] = out[who] | n if who in out else n
        return out

    @property
    def teacher_names(self) -> list[str]:
        return [w for w in self.needs() if w is not None]

    def forward(self, out: StepOutputs, values: dict[str, Tensor] | None = None) -> Tensor:
        """The weighted total. ``values``: a dict that also receives each term's unweighted value on this
        batch (detached scalars, as :meth:`values` gives them): the terms computed on their own are read off
        this forward at no cost; the fused ``kd_logits`` + ``ce`` pair is computed term by term once more
        (without gradient)."""
        total: Tensor | None = None
        skip: tuple[int, ...] = ()
        if self.pair is not None and out.all_labelled():
            kd, ce = (self.terms[i] for i in self.pair)
            w_kd, w_ce = kd.weight * kd.teacher_weights[kd.single], ce.weight
            scale = w_kd + w_ce
            total = kd.soft(out, kd.single, alpha=w_kd / scale)
            if scale != 1.0:
                total = total * scale
            skip = self.pair
            if values is not None:
                with torch.no_grad():
                    values.update({self.labels[i]: self.terms[i](out).detach() for i in skip})
        for i, term in enumerate(self.terms):
            if i in skip:
                continue
            v = term(out)
            if values is not None:
                values[self.labels[i]] = v.detach()
            v = v if term.weight == 1.0 else term.weight * v
            total = v if total is None else total + v
        return total

    @torch.no_grad()
    def values(self, out: StepOutputs) -> dict[str, float]:
        """Each term's unweighted value on this batch, computed on its own (for the logs)."""
        return {label: float(term(out)) for label, term in zip(self.labels, self.terms)}


def _fusable_pair(terms: list[Term]) -> tuple[int, int] | None:
    ce = next((i for i, t in enumerate(terms) if isinstance(t, CrossEntropy)), None)
    kd = next((i for i, t in enumerate(terms) if isinstance(t, KDLogits) and t.single is not None), None)
    return None if ce is None or kd is None else (kd, ce)


def _unique(labels: list[str]) -> list[str]:
    out = []
    for i, lab in enumerate(labels):
        out.append(lab if labels.count(lab) == 1 else f"{lab}#{labels[:i + 1].count(lab)}")
    return out
