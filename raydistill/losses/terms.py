"""The loss terms a student learns from (``distill.terms``), each an ``nn.Module`` whose ``forward`` gives its
unweighted value on a batch's ``StepOutputs``:

``kd_logits``  the teacher's softened distribution (``ops.kd_loss``: forward / reverse KL or JSD at a
               temperature, scaled by T^2; ``kd_loss_topk`` from an offline top-k cache (with the teacher's
               mass outside the top-k as a rest bucket when the cache has it); ``kd_loss_linear``
               when the task gives the last hidden states and the output layer). Several teachers:
               ``combine: sum`` is the weighted sum of per-teacher terms, ``combine: mean`` distils the
               weighted mean of their distributions.
``ce``         cross-entropy with the hard labels.
``hidden``     hidden states, layer pairs ``(student, teacher)``: MSE or 1 - cosine per row (padding
               excluded), the student's states mapped through a learned linear projection when the widths
               differ (a parameter of the term: optimised with the student, checkpointed, never exported).
``relation``   similarity-preserving KD (Tung & Mori, 2019): the batch's row-normalised Gram matrix of
               pooled hidden states, student against teacher (no projection: the matrices are B x B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.losses.outputs import Needs, Outputs, StepOutputs
from raydistill.losses.registry import register_term


@dataclass(frozen=True)
class Layout:
    """A model's hidden layers as terms see them: ``widths[i - 1]`` is the width of layer ``i``."""

    widths: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.widths)


class Term(nn.Module):
    """One weighted term. ``label`` names it in logs (``kd_logits``, ``hidden:second``, ...)."""

    type = ""

    def __init__(self, spec: dict, *, student: Layout | None, teachers: dict[str, Layout]):
        super().__init__()
        self.spec = dict(spec)
        self.key = spec.get("key", "distill.terms")
        self.weight = float(spec["weight"])

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return ()

    @property
    def label(self) -> str:
        names = self.teacher_names
        return self.type + (f":{'+'.join(names)}" if names else "")

    def needs(self) -> dict[str | None, Needs]:
        """What this term reads: ``None`` -> the student's outputs, a name -> that teacher's."""
        raise NotImplementedError

    def forward(self, out: StepOutputs) -> Tensor:
        raise NotImplementedError


def logits_of(o: Outputs, vocab: int) -> Tensor:
    """``(..., vocab)`` logits: given, or computed from the last hidden states and the output layer."""
    if o.logits is not None:
        return o.logits
    if o.head is None:
        raise ValueError("the task gave neither logits nor the output layer for a logit term")
    h, w, b = o.head
    return F.linear(h, first_rows(w, vocab), first_rows(b, vocab))


def first_rows(x: Tensor | None, n: int) -> Tensor | None:
    """``x[:n]`` (an output layer's first ``n`` ids), ``x`` itself when it has no more: no slice in the
    autograd graph, whose backward would write the whole weight's gradient into a fresh zero tensor."""
    return x if x is None or x.shape[0] == n else x[:n]


def f32(x: Tensor) -> Tensor:
    """``x`` in float32 at least (half precision up; float64 stays, for float64 references)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _rows(x: Tensor | None, mask: Tensor | None) -> Tensor | None:
    return x if x is None or mask is None else x[mask]


def soft_loss(out: StepOutputs, s: Outputs, t: Outputs, *, alpha: float, temperature: float, divergence: str,
              beta: float) -> Tensor:
    """``alpha * T^2 * D(teacher, student) + (1 - alpha) * CE`` over the soft rows in ONE kernel call:
    ``kd_loss_linear(_topk)`` when the student gives its output layer (and the teacher its output layer or a
    top-k cache, with its tail mass when given), else ``kd_loss(_topk)`` on logits. ``alpha < 1`` needs every soft row labelled."""
    from raydistill import ops

    kw = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, ignore_index=out.ignore_index)
    rows = out.kd_mask  # None: the labelled rows (the op skips ignore_index); else those rows, unlabelled
    if rows is not None and alpha < 1:
        raise ValueError("a soft term mixed with cross-entropy needs a hard label on every soft row")
    labels = out.labels if rows is None else None
    if s.head is not None and (t.head is not None or t.topk is not None):
        h_s, w_s, b_s = s.head
        h_s = _rows(h_s, rows)
        kw["student_bias"] = first_rows(b_s, out.vocab)
        w_s = first_rows(w_s, out.vocab)
        if t.topk is not None:
            return ops.kd_loss_linear_topk(h_s, w_s, _rows(t.topk[0], rows), _rows(t.topk[1], rows),
                                           labels, teacher_topk_tail=_rows(t.topk_tail, rows), **kw)
        h_t, w_t, b_t = t.head
        return ops.kd_loss_linear(h_s, w_s, _rows(h_t, rows).detach(), w_t.detach(), labels,
                                  teacher_bias=None if b_t is None else b_t.detach(), **kw)
    logits = _rows(logits_of(s, out.vocab), rows)
    if t.topk is not None:
        return ops.kd_loss_topk(logits, _rows(t.topk[0], rows), _rows(t.topk[1], rows), labels,
                                teacher_topk_tail=_rows(t.topk_tail, rows), **kw)
    return ops.kd_loss(logits, _rows(logits_of(t, out.vocab), rows).detach(), labels, **kw)


def mixture_logits(teachers: list[Outputs], weights: list[float], vocab: int, temperature: float) -> Tensor:
    """Logits whose softmax at ``temperature`` is the weighted mean of the teachers' distributions at that
    temperature: ``T * log(sum_i w_i softmax(t_i / T))`` (weights normalised to sum 1)."""
    total = float(sum(weights))
    logp = [torch.log_softmax(f32(logits_of(t, vocab)) / temperature, dim=-1) + math.log(w / total)
            for t, w in zip(teachers, weights)]
    return temperature * torch.logsumexp(torch.stack(logp), dim=0)


@register_term("kd_logits")
class KDLogits(Term):
    """The teachers' output distributions. Spec: ``teachers`` {name: weight}, ``combine`` (sum | mean),
    ``temperature``, ``divergence``, ``beta``."""

    def __init__(self, spec: dict, *, student: Layout | None, teachers: dict[str, Layout]):
        super().__init__(spec, student=student, teachers=teachers)
        self.teacher_weights = {str(k): float(v) for k, v in spec["teachers"].items() if float(v) > 0}
        if not self.teacher_weights:
            raise ValueError(f"{self.key}.teachers: every teacher weight is 0; give one a positive weight")
        self.combine = spec.get("combine", "sum")
        self.temperature = float(spec["temperature"])
        self.divergence = spec["divergence"]
        self.beta = float(spec["beta"])

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(self.teacher_weights)

    @property
    def single(self) -> str | None:
        """The teacher of a one-teacher term (None for several)."""
        return next(iter(self.teacher_weights)) if len(self.teacher_weights) == 1 else None

    def needs(self) -> dict[str | None, Needs]:
        fused = self.combine == "sum"  # one kernel call per teacher: the output layer is enough
        return {None: Needs(logits=True, head=fused),
                **{n: Needs(logits=True, head=fused) for n in self.teacher_weights}}

    def soft(self, out: StepOutputs, name: str, alpha: float = 1.0) -> Tensor:
        return soft_loss(out, out.student, out.teachers[name], alpha=alpha, temperature=self.temperature,
                         divergence=self.divergence, beta=self.beta)

    def forward(self, out: StepOutputs) -> Tensor:
        if self.combine == "mean" and len(self.teacher_weights) > 1:
            names = list(self.teacher_weights)
            mix = mixture_logits([out.teachers[n] for n in names], [self.teacher_weights[n] for n in names],
                                 out.vocab, self.temperature)
            return soft_loss(out, out.student, Outputs(logits=mix), alpha=1.0, temperature=self.temperature,
                             divergence=self.divergence, beta=self.beta)
        total = None
        for name, w in self.teacher_weights.items():
            v = w * self.soft(out, name)
            total = v if total is None else total + v
        return total


@register_term("ce")
class CrossEntropy(Term):
    """Cross-entropy of the student with the hard labels (rows without one are skipped)."""

    def needs(self) -> dict[str | None, Needs]:
        return {None: Needs(logits=True)}

    def forward(self, out: StepOutputs) -> Tensor:
        s = out.student
        if s.logits is None and s.head is not None and not torch.is_grad_enabled():
            return chunked_cross_entropy(s.head, out.labels, out.vocab, out.ignore_index)
        logits = logits_of(s, out.vocab)
        return F.cross_entropy(logits.reshape(-1, out.vocab), out.labels.reshape(-1), ignore_index=out.ignore_index)


CE_CHUNK_BYTES = 64 << 20  # float32 logits per chunk of chunked_cross_entropy


def chunked_cross_entropy(head: tuple[Tensor, Tensor, Tensor | None], labels: Tensor, vocab: int,
                          ignore_index: int) -> Tensor:
    """The mean cross-entropy of ``F.cross_entropy`` over the output layer's logits, computed (without
    gradient) over chunks of rows of at most ``CE_CHUNK_BYTES`` of float32 logits: a value for the logs
    that never materialises a batch's ``(tokens, vocab)`` logits and their log-softmax (at 6144 tokens x 32000
    ids, 1.5 GB in float32: the peak of a step that logs it)."""
    h, w, b = head
    h = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    w, b = first_rows(w, vocab), first_rows(b, vocab)
    rows = max(1, CE_CHUNK_BYTES // (4 * vocab))
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], rows):
        logits = F.linear(h[i:i + rows], w, b).to(dt)
        total += F.cross_entropy(logits, lab[i:i + rows], ignore_index=ignore_index, reduction="sum").double()
    count = (lab != ignore_index).sum()
    return (total / count).to(dt)  # no labelled row: nan, as F.cross_entropy's mean


def resolve_layers(layers, student: Layout, teacher: Layout, key: str, teacher_name: str) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based. ``uniform``: ``min(depths)`` pairs spread evenly over
    both models, ending at the last layers; ``last``: the last layers; else explicit ``[[s, t], ...]``."""
    ds, dt = student.depth, teacher.depth
    for who, d in (("the student", ds), (f"teacher {teacher_name!r}", dt)):
        if d < 1:
            raise ValueError(f"{key}.layers: {who} has no hidden layers to distil")
    if layers == "last":
        return [(ds, dt)]
    if layers == "uniform":
        n = min(ds, dt)
        return [((2 * i * ds + n) // (2 * n), (2 * i * dt + n) // (2 * n)) for i in range(1, n + 1)]
    pairs = [tuple(p) for p in layers]
    if len(pairs) > min(ds, dt):
        raise ValueError(f"{key}.layers: {len(pairs)} layer pairs, more than the depth of the student ({ds}) or "
                         f"of teacher {teacher_name!r} ({dt})")
    for s, t in pairs:
        for who, i, d in (("student", s, ds), (f"teacher {teacher_name!r}", t, dt)):
            if not 1 <= i <= d:
                raise ValueError(f"{key}.layers: layer {i} of the {who} does not exist (layers 1..{d})")
    return pairs


class _LayerTerm(Term):
    """A term on hidden states of layer pairs of the student and one teacher."""

    default_layers = "uniform"

    def __init__(self, spec: dict, *, student: Layout | None, teachers: dict[str, Layout]):
        super().__init__(spec, student=student, teachers=teachers)
        self.teacher = str(spec["teacher"])
        if student is None or self.teacher not in teachers:
            raise ValueError(f"{self.key}.teacher: the hidden layers of teacher {self.teacher!r} are unknown "
                             "(an offline top-k teacher has logits only)")
        self.pairs = resolve_layers(spec.get("layers") or self.default_layers, student, teachers[self.teacher],
                                    self.key, self.teacher)

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return (self.teacher,)

    def needs(self) -> dict[str | None, Needs]:
        return {None: Needs(hidden=frozenset(s for s, _ in self.pairs)),
                self.teacher: Needs(hidden=frozenset(t for _, t in self.pairs))}

    def states(self, out: StepOutputs, i: int) -> tuple[Tensor, Tensor]:
        s, t = self.pairs[i]
        return f32(out.student.hidden[s]), f32(out.teachers[self.teacher].hidden[t]).detach()


@register_term("hidden")
class Hidden(_LayerTerm):
    """Spec: ``teacher``, ``layers`` (uniform | last | [[s, t], ...]), ``metric`` (mse | cosine), ``projection``
    (allow a learned ``Linear(student width, teacher width)`` where the widths differ)."""

    def __init__(self, spec: dict, *, student: Layout | None, teachers: dict[str, Layout]):
        super().__init__(spec, student=student, teachers=teachers)
        self.metric = spec.get("metric", "mse")
        proj = []
        for s, t in self.pairs:
            ws, wt = student.widths[s - 1], teachers[self.teacher].widths[t - 1]
            if ws != wt and not spec.get("projection", True):
                raise ValueError(f"{self.key}.projection: student layer {s} is {ws} wide, layer {t} of teacher "
                                 f"{self.teacher!r} {wt}; allow a projection (projection: true) or pick layers of "
                                 "equal width")
            proj.append(nn.Linear(ws, wt, bias=False) if ws != wt else nn.Identity())
        self.projections = nn.ModuleList(proj)

    def forward(self, out: StepOutputs) -> Tensor:
        total = None
        for i, p in enumerate(self.projections):
            h_s, h_t = self.states(out, i)
            h_s, h_t = p(h_s[out.mask]), h_t[out.mask]
            if self.metric == "cosine":
                v = (1.0 - F.cosine_similarity(h_s, h_t, dim=-1)).mean() if len(h_s) else h_s.sum() * 0
            else:
                v = F.mse_loss(h_s, h_t) if len(h_s) else h_s.sum() * 0
            total = v if total is None else total + v
        return total / len(self.pairs)


def pooled(h: Tensor, mask: Tensor) -> Tensor:
    """One vector per sample: ``(B, H)`` as is; ``(B, S, H)`` averaged over its unmasked positions."""
    if h.dim() == 2:
        return h
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def _gram(x: Tensor) -> Tensor:
    return F.normalize(x @ x.T, dim=1)


@register_term("relation")
class Relation(_LayerTerm):
    """Spec: ``teacher``, ``layers`` (default ``last``). ``||G_s - G_t||_F^2 / B^2`` per layer pair, with
    ``G = row_normalise(X X^T)`` over the batch's pooled hidden states ``X`` (B, H)."""

    default_layers = "last"

    def forward(self, out: StepOutputs) -> Tensor:
        total = None
        for i in range(len(self.pairs)):
            h_s, h_t = self.states(out, i)
            g_s, g_t = _gram(pooled(h_s, out.mask)), _gram(pooled(h_t, out.mask))
            v = ((g_s - g_t) ** 2).sum() / max(1, g_s.shape[0]) ** 2
            total = v if total is None else total + v
        return total / len(self.pairs)
