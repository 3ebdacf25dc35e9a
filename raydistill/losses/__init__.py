"""Loss terms: the seam through which a student learns (``distill.terms``).

* :class:`Criterion`: the weighted sum of a stage's terms; asks the task for exactly the outputs they
  need (:class:`Needs`) and fuses ``kd_logits`` + ``ce`` of one teacher into one kernel call;
* the terms (:mod:`raydistill.losses.terms`): ``kd_logits``, ``ce``, ``hidden``, ``relation``; a new one
  is a ``Term`` subclass registered with :func:`register_term`;
* :class:`Outputs` / :class:`StepOutputs`: what the task gives the terms.
"""

from raydistill.losses.criterion import Criterion, build_term
from raydistill.losses.outputs import Needs, Outputs, StepOutputs
from raydistill.losses.registry import TERMS, register_term
from raydistill.losses.terms import Layout, Term

__all__ = ["Criterion", "Layout", "Needs", "Outputs", "StepOutputs", "TERMS", "Term", "build_term",
           "register_term"]
