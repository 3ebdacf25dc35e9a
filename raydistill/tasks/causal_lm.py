"""Causal LM: packed ``input_ids`` blocks ``(B, S)`` -> ``(B, S, V)`` logits; every position predicts the
next token (the last position and ``<pad>`` targets are ``ignore_index``).

Distillation is per token: the loss terms (``raydistill.losses``) read ``(B, S, V)`` logits, or the last
hidden states and the lm_head (``kd_loss_linear``: no logits tensor), or an offline teacher's top-k
log-probabilities per token (a compressed cache, with its tail mass when present: ``kd_loss_topk``), and the
hidden states of any layer (padding excluded).

Padded vocabularies: teacher and student may have more output ids than the tokenizer (padding, e.g.
32000 -> 32064); both are sliced to the tokenizer's ids (the ids no token maps to are left out, which is
what masking them with -inf does to a softmax). ``raydistill.models.hf.check_vocab`` rejects anything
beyond padding before Ray starts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

import torch
import torch.nn.functional as F

from raydistill.losses.outputs import Needs, Outputs
from raydistill.losses.terms import Layout
from raydistill.tasks.base import IGNORE_INDEX, Task, teacher_key
from raydistill.utils import unwrap_model

# the most bytes of teacher hidden states a worker keeps for its materialised shard (``CausalLMTask.prepare``,
# all teachers together); a larger shard runs the teacher at every step instead
TEACHER_HIDDEN_MAX_BYTES = 1 << 30
EVAL_LOGITS_MAX_BYTES = 128 << 20  # lm_metrics: rows per batch so that one float32 logits tensor stays below
# the teacher pass (``CausalLMTask.prepare``): tokens per teacher forward, half as many when the states of every
# layer come back. Fewer, larger matmuls: with 2 threads on a shared CPU the pass costs ~35% less CPU time at
# 64 rows x 256 tokens than at 16 rows (benchmarks/results/NOTES.md, issue 22)
TEACHER_PASS_TOKENS = 1 << 14


def lm_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S, V)`` logits of a transformers model (``.logits``) or of a plain module returning a tensor."""
    out = model(input_ids=input_ids) if _is_hf(model) else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model) -> bool:
    return hasattr(unwrap_model(model), "config") and hasattr(unwrap_model(model), "generation_config")


def _linear_head(model) -> torch.nn.Linear | None:
    """The ``lm_head`` of a transformers causal LM when it is an ``nn.Linear`` (what ``kd_loss_linear`` fuses)."""
    if not _is_hf(model):
        return None
    head = unwrap_model(model).get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) else None


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
    metric_label = "test perplexity (lower is better)"
    metric_fmt = ".2f"
    baseline_key = "perplexity_vs_baseline"
    throughput_unit = "tokens"
    reported_metrics = ("val_perplexity", "perplexity", "next_token_accuracy", "teacher_agreement", "tokens_per_s",
                        "latency_ms_b1")
    report_columns = (("test perplexity (95% CI)", "perplexity", "{:.2f}"),
                      ("next-token accuracy", "next_token_accuracy", "{:.2%}"),
                      ("teacher agreement", "teacher_agreement", "{:.2%}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
                      ("sparsity", "sparsity", "{:.1%}"), ("compression", "compression_ratio", "{:.2f}x"),
                      ("ms/sequence", "latency_ms_b1", "{:.2f}"))
    compare_text = "perplexity {:+.1f}%"
    float_columns = ("topk_values", "topk_tail")
    exports_pretrained = True
    teacher_batch_rows = 16
    latency_batches = (1,)  # one sequence of data.seq_len tokens: what serving a request costs

    # -- driver -----------------------------------------------------------------------------------------
    def task_info(self, cfg, storage: Path) -> dict:
        """The tokenizer's ids and the block counts, and ``materialize``: whether workers hold the train split
        in memory (``data.materialize``, or by its size when unset; ``stage_spec`` takes it out)."""
        return _task_info(cfg, text_data(cfg, storage))

    def check_data(self, cfg) -> None:
        """``data.cache_path`` (writable, or a known URI), and the head of every corpus file: binary / non-UTF-8
        files and malformed jsonl lines named (the rest is checked while Ray Data reads them);
        ``data.skip_bad_files`` leaves them out with a warning."""
        import logging

        from raydistill.errors import ConfigError
        from raydistill.data.text import SKIP_HINT, check_corpus_heads, corpus_files

        data = cfg.data
        if data.cache_path:
            from raydistill.data.text import check_cache_path

            check_cache_path(data.cache_path)
        try:
            files = corpus_files(data.path, data.max_bytes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        bad = check_corpus_heads(files, data.text_column)
        if not bad:
            return
        if data.skip_bad_files:
            if len(bad) == len(files):
                raise ConfigError(f"data.path: no file of the corpus can be read as text (data.skip_bad_files "
                                  f"leaves them all out): {bad[0]}")
            for msg in bad:
                logging.getLogger("raydistill").warning("skipped (data.skip_bad_files: true): %s",
                                                        msg.split("; ")[0].removeprefix("data.path: "))
            return
        more = f" (and {len(bad) - 5} more files)" if len(bad) > 5 else ""
        lines = "\n  ".join(m.replace(f"; {SKIP_HINT}", "") for m in bad[:5])
        raise ConfigError(f"data.path: {len(bad)} corpus file(s) cannot be used{more} ({SKIP_HINT}):\n  {lines}")

    def probe_info(self) -> dict:
        # a vocabulary only changes the embedding and the head, which no config check looks at
        return {"vocab_size": 128}

    def datasets(self, cfg, storage: Path, *, transfer: bool) -> tuple[dict, int]:
        """Packed ``input_ids`` blocks: train, and one eval dataset (split column: 0 = val, 1 = test)."""
        from raydistill.data import to_ray_dataset

        td = text_data(cfg, storage)
        eval_ds = {"eval": _eval_dataset(td)}
        if not td.materialize:  # streamed from the parquet shards (raydistill.data.text.CorpusInfo.train_dataset)
            return {"train": td.train_dataset(), **eval_ds}, td.train_blocks
        return {"train": to_ray_dataset(input_ids=td.train.astype(np.int64)), **eval_ds}, len(td.train)

    def eval_dataset(self, cfg, storage: Path):
        return _eval_dataset(text_data(cfg, storage))

    def train_rows(self, cfg, storage: Path, *, transfer: bool) -> int:
        return text_data(cfg, storage).train_blocks

    def calibration_inputs(self, cfg, storage: Path) -> torch.Tensor:
        """The first packed training blocks of token ids (``calibration_size`` of them; a random sample: the
        train shards hold the split's seeded permutation)."""
        size = cfg.compression.structured.calibration_size if cfg.compression.structured else None
        return torch.from_numpy(text_data(cfg, storage).head(size).astype("int64"))

    def test_metrics(self, cfg, model, storage: Path, info: dict, *, teacher=None, samples: bool = True) -> dict:
        """Perplexity (with its 95% interval and per-block ``"_items"``), next-token accuracy,
        ``teacher_agreement`` (``teacher()``: the teacher module or None) and a few greedy ``samples`` on the
        test blocks."""
        from raydistill.data.text import load_tokenizer

        td = text_data(cfg, storage)
        test = torch.as_tensor(td.test.astype(np.int64))
        out = lm_metrics(model, test, td.pad_id, td.vocab_size, teacher=teacher() if teacher else None, items=True)
        if samples and cfg.data.samples:
            tok = load_tokenizer(td.tokenizer_dir)
            prompts = [row[: 16].tolist() for row in td.test[: cfg.data.samples]]
            conts = greedy_samples(model, prompts, new_tokens=32, vocab=td.vocab_size, eos_id=td.eos_id,
                                   max_len=cfg.data.seq_len)
            out["samples"] = [{"prompt": tok.decode(p), "continuation": tok.decode(c)}
                              for p, c in zip(prompts, conts)]
        return out

    def latency_input(self, info: dict, batch: int) -> torch.Tensor:
        """Random token ids ``(batch, seq_len)`` of the tokenizer's vocabulary."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, int(info["vocab_size"]), (batch, int(info["seq_len"])), generator=g)

    def compare(self, new: dict, ref: dict) -> float:
        return new["perplexity"] / ref["perplexity"] - 1

    # -- teacher outputs --------------------------------------------------------------------------------
    def teacher_inputs(self, cfg, storage: Path) -> tuple[dict[str, np.ndarray], dict]:
        """The packed train blocks (``input_ids`` int32 ``(n, S)``)."""
        td = text_data(cfg, storage)
        return {"input_ids": np.ascontiguousarray(td.train, dtype=np.int32)}, _task_info(cfg, td)

    def tokens_per_row(self, inputs: dict[str, np.ndarray]) -> int:
        return int(inputs["input_ids"].shape[1])

    def output_size(self, info: dict) -> int:
        return int(info["vocab_size"])

    def teacher_logits(self, model, rows: dict[str, np.ndarray], device, info: dict) -> torch.Tensor:
        ids = torch.as_tensor(rows["input_ids"], dtype=torch.int64, device=device)
        return shared_vocab(lm_logits(model, ids), int(info["vocab_size"]))

    # -- worker -----------------------------------------------------------------------------------------
    def train_columns(self, offline: bool) -> list[str]:
        return ["input_ids"] + (["topk_values", "topk_indices", "topk_tail"] if offline else [])

    def eval_columns(self) -> list[str]:
        return ["input_ids", "split"]

    def build_model(self, model: dict, task_info: dict):
        from raydistill.models import build_model

        return build_model(model, vocab_size=int(task_info["vocab_size"]))

    def layout(self, model) -> Layout:
        """A transformers model: ``num_hidden_layers`` layers of ``hidden_size`` (layer i: ``hidden_states[i]``);
        any other module has no addressable hidden layers."""
        if not _is_hf(model):
            return Layout(())
        c = unwrap_model(model).config
        return Layout((int(c.hidden_size),) * int(c.num_hidden_layers))

    def outputs(self, model, batch: dict, need: Needs, spec) -> Outputs:
        """The model through its own (DDP / FSDP) wrapper. With the output layer welcome (``need.head``,
        ``distill.fused_linear``, a transformers model with a linear ``lm_head``) or no logits wanted, only
        one position's logits are computed (``logits_to_keep=1``) and the head is (last hidden states,
        lm_head weight, bias); else the logits, sliced to the tokenizer's ids."""
        ids = batch["input_ids"]
        head = _linear_head(model) if need.logits and need.head and spec is not None and spec.fused_linear else None
        if not _is_hf(model):
            if need.hidden:
                raise ValueError("hidden states are read from transformers models only")
            return Outputs(logits=shared_vocab(lm_logits(model, ids), int(spec.task_info["vocab_size"])))
        if head is not None or not need.logits:
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
            hs = out.hidden_states
            return Outputs(head=(hs[-1], head.weight, head.bias) if head is not None else None,
                           hidden={i: hs[i] for i in need.hidden})
        out = model(input_ids=ids, output_hidden_states=True) if need.hidden else model(input_ids=ids)
        return Outputs(logits=shared_vocab(out.logits, int(spec.task_info["vocab_size"])),
                       hidden={i: out.hidden_states[i] for i in need.hidden})

    def cached_outputs(self, batch: dict, name: str, need: Needs, model) -> Outputs | None:
        hidden = {i: batch.get(teacher_key(name, f"h{i}")) for i in need.hidden}
        last = batch.get(teacher_key(name, "last"))
        if any(h is None for h in hidden.values()) or (need.logits and last is None):
            return None
        head = _linear_head(model) if need.logits else None
        return Outputs(head=(last, head.weight, head.bias) if head is not None else None, hidden=hidden)

    def targets(self, batch: dict, spec) -> dict[str, Any]:
        ids = batch["input_ids"]
        pad = int(spec.task_info["pad_id"])
        labels = next_token_labels(ids, pad)
        return {"labels": labels, "mask": ids != pad, "vocab": int(spec.task_info["vocab_size"]),
                "ignore_index": IGNORE_INDEX, "count": int((labels != IGNORE_INDEX).sum())}

    @torch.no_grad()
    def prepare(self, batch: dict, spec, teachers: dict, needs: dict, chunk: int | None = None) -> dict:
        """Run each teacher once over the worker's rows and keep what its terms read
        (``teacher.<name>.last``: the last hidden states for the fused ``kd_loss_linear``;
        ``teacher.<name>.h<i>``: hidden layer i; ``(N, S, H)``, float32, or bf16 / fp16 for a teacher in that
        dtype: ``distill.precision``) next to ``input_ids``. The teachers
        are frozen and deterministic, so every epoch's targets are the same; computing them once instead of
        at every step saves all but one of the teacher forwards (a teacher is the larger model: most of a
        distillation step's cost). Not kept (the teacher runs at every step): logits (a teacher whose terms
        need them materialised, without ``distill.fused_linear``, or with no linear lm_head), and states
        beyond ``TEACHER_HIDDEN_MAX_BYTES`` in all."""
        ids = batch["input_ids"]
        budget = TEACHER_HIDDEN_MAX_BYTES
        for name, need in needs.items():
            if name is None or name not in teachers:
                continue
            teacher = teachers[name]
            last = need.logits
            if not _is_hf(teacher) or (last and not (need.head and spec.fused_linear
                                                     and _linear_head(teacher) is not None)):
                continue
            depth = self.layout(teacher).depth  # hidden_states[depth] is the last hidden state: kept once
            keys = (["last"] if last else []) + [f"h{i}" for i in sorted(need.hidden) if not (last and i == depth)]
            if not keys or all(teacher_key(name, k) in batch for k in keys):
                continue
            # kept in a bf16 / fp16 teacher's own dtype (distill.precision: half the bytes), else float32
            half = next(teacher.parameters()).dtype in (torch.bfloat16, torch.float16)
            nbytes = len(keys) * ids.numel() * int(unwrap_model(teacher).config.hidden_size) * (2 if half else 4)
            if nbytes > budget:
                continue
            budget -= nbytes
            parts: dict[str, list] = {k: [] for k in keys}
            # only the last hidden state: the decoder alone (no lm_head, no per-layer states kept); no KV cache
            core = unwrap_model(teacher)
            decoder = core.base_model if keys == ["last"] and core.base_model is not core else None
            rows = chunk or max(1, TEACHER_PASS_TOKENS // (1 if decoder is not None else 2) // max(1, ids.shape[1]))
            for i in range(0, len(ids), rows):
                x = ids[i:i + rows]
                hs = ((decoder(input_ids=x, use_cache=False).last_hidden_state,) if decoder is not None else
                      teacher(input_ids=x, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states)
                for k in keys:
                    h = hs[-1] if k == "last" else hs[int(k[1:])]
                    parts[k].append(h if h.dtype in (torch.bfloat16, torch.float16) else h.float())
            if len(ids):
                kept = {teacher_key(name, k): torch.cat(v) for k, v in parts.items()}
                if last and depth in need.hidden:
                    kept[teacher_key(name, f"h{depth}")] = kept[teacher_key(name, "last")]
                batch = {**batch, **kept}
        return batch

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


def _task_info(cfg, td) -> dict:
    """``CausalLMTask.task_info`` of a prepared corpus ``td`` (``text_data``)."""
    return {**td.info(), "seq_len": cfg.data.seq_len, "materialize": td.materialize}


def _eval_dataset(td):
    """The val then test blocks (``split`` column 0 / 1) as one Ray dataset."""
    from raydistill.data import val_test_dataset

    return val_test_dataset({"input_ids": td.val.astype(np.int64)}, {"input_ids": td.test.astype(np.int64)})


def text_data(cfg, storage: Path):
    """The tokenized, packed corpus (Ray Data; cached) -- see ``raydistill.data.text``. One tokenizer and one
    packed corpus per storage root, shared by the teacher cache and every run."""
    from raydistill.errors import ConfigError
    from raydistill.data.text import prepare_corpus
    from raydistill.models.hf import check_vocab, hf_config_dict

    root = Path(cfg.run.storage_path).expanduser().resolve() if cfg.run.storage_path else storage
    td = prepare_corpus(cfg.data, root)
    models = [(cfg.teacher_key(n), t) for n, t in cfg.teacher_map().items()] + [("student", cfg.student)]
    for key, spec in models:
        if spec.model == "hf":  # a trained BPE may be smaller than data.vocab_size: check again
            try:
                check_vocab(f"{key}.kwargs", hf_config_dict(spec.kwargs).get("vocab_size"), td.vocab_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return td


@torch.no_grad()
def lm_metrics(model, blocks: torch.Tensor, pad_id: int, vocab: int, *, teacher=None,
               batch_size: int = 32, items: bool = False) -> dict:
    """Perplexity, next-token accuracy and (with ``teacher``) top-1 agreement over ``blocks``; with
    ``items``, also the 95% bootstrap interval of the perplexity over blocks (``perplexity_ci95``) and, under
    ``"_items"``, each block's summed NLL and scored tokens (and the teacher's NLL) for paired comparisons
    (:mod:`raydistill.tasks.stats`). ``batch_size`` rows at a time, fewer where their ``(rows, seq, vocab)``
    float32 logits would exceed ``EVAL_LOGITS_MAX_BYTES`` (a 32000-token vocabulary at 512 tokens: 2 rows),
    so evaluation never needs more memory than a training step of the fused loss by much."""
    was = model.training
    model.eval()
    nll_b, tok_b, t_nll_b = [], [], []
    correct, agree = 0, 0
    row_bytes = 4 * max(1, blocks.shape[-1] if blocks.ndim > 1 else 1) * max(1, int(vocab))
    batch_size = max(1, min(int(batch_size), EVAL_LOGITS_MAX_BYTES // row_bytes))
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
