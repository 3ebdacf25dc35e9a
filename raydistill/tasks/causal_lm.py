"""Causal LM: packed ``input_ids`` blocks ``(B, S)`` -> ``(B, S, V)`` logits; every position predicts the
next token (the last position and ``<pad>`` targets are ``ignore_index``).

Distillation is per token: ``kd_loss`` over ``(B, S, V)`` (online teacher) or ``kd_loss_topk`` over the
teacher's top-k logits per token (offline, parquet), alpha-mixed with next-token cross-entropy.

Padded vocabularies: teacher and student may have more output ids than the tokenizer (padding, e.g.
32000 -> 32064); both are sliced to the tokenizer's ids (the ids no token maps to are left out, which is
what masking them with -inf does to a softmax). ``raydistill.models.hf.check_vocab`` rejects anything
beyond padding before Ray starts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from raydistill.tasks.base import IGNORE_INDEX, Task

# the most bytes of teacher hidden states a worker keeps for its materialised shard (``CausalLMTask.prepare``);
# a larger shard runs the teacher at every step instead
TEACHER_HIDDEN_MAX_BYTES = 1 << 30


def lm_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S, V)`` logits of a transformers model (``.logits``) or of a plain module returning a tensor."""
    out = model(input_ids=input_ids) if _is_hf(model) else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model) -> bool:
    from raydistill.utils import unwrap_model

    return hasattr(unwrap_model(model), "config") and hasattr(unwrap_model(model), "generation_config")


def _hidden_and_head(model, input_ids: torch.Tensor):
    """(last hidden states (B, S, H), lm_head weight, lm_head bias) of a transformers causal LM, computed
    through the model's own forward (so DDP / FSDP wrappers see the call) with the logits of one position
    only; None for other models."""
    from raydistill.utils import unwrap_model

    if not _is_hf(model):
        return None
    head = unwrap_model(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], head.weight, head.bias


def next_token_labels(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``labels[b, s] = input_ids[b, s + 1]``; the last position and pad targets are ``IGNORE_INDEX``."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    nxt = input_ids[:, 1:]
    labels[:, :-1] = torch.where(nxt == pad_id, torch.full_like(nxt, IGNORE_INDEX), nxt)
    return labels


def shared_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The first ``vocab`` (tokenizer) ids of a possibly padded ``(..., V)`` output."""
    if logits.shape[-1] < vocab:
        raise ValueError(f"the model has {logits.shape[-1]} output ids, fewer than the tokenizer's {vocab}")
    return logits if logits.shape[-1] == vocab else logits[..., :vocab]


class CausalLMTask(Task):
    name = "causal_lm"
    metric = "perplexity"
    higher_is_better = False
    float_columns = ("topk_values",)
    latency_batches = (1,)  # one sequence of data.seq_len tokens: what serving a request costs

    def latency_input(self, task_info: dict, batch: int) -> torch.Tensor:
        """Random token ids ``(batch, seq_len)`` of the tokenizer's vocabulary."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, int(task_info["vocab_size"]), (batch, int(task_info["seq_len"])), generator=g)

    def train_columns(self, offline: bool) -> list[str]:
        return ["input_ids"] + (["topk_values", "topk_indices"] if offline else [])

    def eval_columns(self) -> list[str]:
        return ["input_ids", "split"]

    def build_model(self, model: dict, task_info: dict):
        from raydistill.models import build_model

        return build_model(model, vocab_size=int(task_info["vocab_size"]))

    @torch.no_grad()
    def prepare(self, batch: dict, spec, teacher, chunk: int = 16) -> dict:
        """Online distillation through the fused loss: run the teacher once over the worker's rows and keep
        its last hidden states (``teacher_hidden``, ``(N, S, H)`` float32) next to ``input_ids``. The teacher
        is frozen and deterministic, so every epoch's soft targets are the same; computing them once
        instead of at every step saves all but one of the teacher forwards (the teacher is the larger model:
        most of a distillation step's cost). ``loss`` then uses them with the teacher's lm_head weights.
        Skipped (the teacher runs at every step) when the states would exceed
        ``TEACHER_HIDDEN_MAX_BYTES``, for offline outputs, without ``distill.fused_linear``, or when the
        teacher is no transformers causal LM with a linear lm_head."""
        if spec.kind != "kd" or spec.offline or teacher is None or not spec.kd.fused_linear \
                or "teacher_hidden" in batch:
            return batch
        ids = batch["input_ids"]
        parts = []
        for i in range(0, len(ids), chunk):
            t = _hidden_and_head(teacher, ids[i:i + chunk])
            if t is None:
                return batch
            parts.append(t[0].float())
            if i == 0 and parts[0][0].numel() * 4 * len(ids) > TEACHER_HIDDEN_MAX_BYTES:
                return batch
        if not parts:
            return batch
        return {**batch, "teacher_hidden": torch.cat(parts)}

    def loss(self, model, batch: dict, spec, teacher) -> tuple[torch.Tensor, int]:
        info = spec.task_info
        ids = batch["input_ids"]
        labels = next_token_labels(ids, int(info["pad_id"]))
        n_tok = int((labels != IGNORE_INDEX).sum())
        vocab = int(info["vocab_size"])
        if spec.kind == "kd" and spec.kd.fused_linear:
            fused = self._fused_loss(model, ids, labels, vocab, batch, spec, teacher)
            if fused is not None:
                return fused, n_tok
        logits = shared_vocab(lm_logits(model, ids), vocab)
        if spec.kind == "ce":
            return F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX), n_tok
        from raydistill import ops

        kd = spec.kd
        kw = dict(temperature=kd.temperature, alpha=kd.alpha, divergence=kd.divergence, beta=kd.beta,
                  ignore_index=IGNORE_INDEX)
        if spec.offline:
            return ops.kd_loss_topk(logits, batch["topk_values"], batch["topk_indices"], labels, **kw), n_tok
        with torch.no_grad():
            t = shared_vocab(lm_logits(teacher, ids), vocab)
        return ops.kd_loss(logits, t, labels, **kw), n_tok

    @staticmethod
    def _fused_loss(model, ids, labels, vocab: int, batch: dict, spec, teacher):
        """``distill.fused_linear``: the student's (and teacher's) last hidden states go through
        ``ops.kd_loss_linear(_topk)`` with the lm_head weights, so no (tokens x V) logits tensor exists.
        The models still run through their (DDP / FSDP) wrappers, asked for hidden states and the logits of
        one position only (``logits_to_keep=1``). None when the model is no transformers causal LM with a
        linear lm_head (the caller then materialises the logits)."""
        from raydistill import ops

        s = _hidden_and_head(model, ids)
        if s is None:
            return None
        h_s, w_s, b_s = s
        kw = dict(temperature=spec.kd.temperature, alpha=spec.kd.alpha, divergence=spec.kd.divergence,
                  beta=spec.kd.beta, ignore_index=IGNORE_INDEX, student_bias=None if b_s is None else b_s[:vocab])
        if spec.offline:
            return ops.kd_loss_linear_topk(h_s, w_s[:vocab], batch["topk_values"], batch["topk_indices"], labels, **kw)
        if "teacher_hidden" in batch:  # computed once by prepare
            from raydistill.utils import unwrap_model

            head = unwrap_model(teacher).get_output_embeddings()
            h_t, w_t, b_t = batch["teacher_hidden"], head.weight, head.bias
        else:
            with torch.no_grad():
                t = _hidden_and_head(teacher, ids)
            if t is None:
                return None
            h_t, w_t, b_t = t
        return ops.kd_loss_linear(h_s, w_s[:vocab], h_t.detach(), w_t.detach(), labels, teacher_bias=None if b_t is None
                                  else b_t.detach(), **kw)

    @torch.no_grad()
    def evaluate(self, model, data: dict, teacher=None, task_info: dict | None = None,
                 batch_size: int = 32) -> dict[str, Any]:
        """Validation perplexity (``val_perplexity``) and, on the test blocks, ``perplexity``,
        ``next_token_accuracy`` and ``teacher_agreement`` (top-1 agreement with the teacher, when given)."""
        info = task_info or {}
        out: dict[str, Any] = {}
        split = data["split"]
        for name, sel in (("val", split == 0), ("test", split == 1)):
            m = lm_metrics(model, data["input_ids"][sel], int(info["pad_id"]), int(info["vocab_size"]),
                           teacher=teacher if name == "test" else None, batch_size=batch_size)
            if name == "val":
                out["val_perplexity"] = m["perplexity"]
            else:
                out.update(m)
        return out


@torch.no_grad()
def lm_metrics(model, blocks: torch.Tensor, pad_id: int, vocab: int, *, teacher=None,
               batch_size: int = 32, items: bool = False) -> dict:
    """Perplexity, next-token accuracy and (with ``teacher``) top-1 agreement over ``blocks``; with
    ``items``, also the 95% bootstrap interval of the perplexity over blocks (``perplexity_ci95``) and, under
    ``"_items"``, each block's summed NLL and scored tokens (and the teacher's NLL) for paired comparisons
    (:mod:`raydistill.tasks.stats`)."""
    was = model.training
    model.eval()
    nll_b, tok_b, t_nll_b = [], [], []
    correct, agree = 0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        labels = next_token_labels(ids, pad_id)
        valid = labels != IGNORE_INDEX
        logits = shared_vocab(lm_logits(model, ids), vocab).float()
        nll_b.append(_block_nll(logits, labels))
        tok_b.append(valid.sum(1).double())
        pred = logits.argmax(-1)
        correct += int((pred == labels)[valid].sum())
        if teacher is not None:
            t_logits = shared_vocab(lm_logits(teacher, ids), vocab).float()
            agree += int((pred == t_logits.argmax(-1))[valid].sum())
            if items:
                t_nll_b.append(_block_nll(t_logits, labels))
    model.train(was)
    nll = torch.cat(nll_b) if nll_b else torch.zeros(0, dtype=torch.float64)
    tok = torch.cat(tok_b) if tok_b else torch.zeros(0, dtype=torch.float64)
    n = int(tok.sum())
    out: dict = {"perplexity": math.exp(min(float(nll.sum()) / max(n, 1), 50.0)),
                 "next_token_accuracy": correct / max(n, 1), "eval_tokens": n}
    if teacher is not None:
        out["teacher_agreement"] = agree / max(n, 1)
    if items:
        from raydistill.tasks.stats import perplexity_ci

        out["perplexity_ci95"] = perplexity_ci(nll.numpy(), tok.numpy())
        out["eval_blocks"] = len(blocks)
        out["_items"] = {"nll": nll.tolist(), "tokens": tok.tolist(),
                         **({"teacher_nll": torch.cat(t_nll_b).tolist()} if t_nll_b else {})}
    return out


def _block_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats) of each block, ``(B,)`` float64."""
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.double().sum(1)


@torch.no_grad()
def greedy_samples(model, prompts: list[list[int]], *, new_tokens: int, vocab: int, eos_id: int,
                   max_len: int) -> list[list[int]]:
    """Greedy continuation of each prompt (no KV cache: short samples for the report)."""
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p], dtype=torch.int64)
        for _ in range(new_tokens):
            nxt = int(shared_vocab(lm_logits(model, ids[:, -max_len:]), vocab)[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == eos_id:
                break
        outs.append(ids[0, len(p):].tolist())
    return outs
