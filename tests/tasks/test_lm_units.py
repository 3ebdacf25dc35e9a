"""Unit tests (no Ray) of the task layer, packing, padded vocabularies, the config union and LM input checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raydistill.config import ConfigError, load_config
from raydistill.data.text import corpus_files, pack, train_bpe
from raydistill.distill.spec import StageSpec
from raydistill.losses import Criterion
from raydistill.tasks import IGNORE_INDEX, get_task
from raydistill.tasks.causal_lm import lm_metrics, next_token_labels, shared_vocab
from raydistill.tasks.classification import classification_metrics

TINY_LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32,
              "tie_word_embeddings": False}


def test_pack_fills_blocks_and_pads_only_the_tail():
    ids = np.arange(1, 12, dtype=np.int32)  # 11 tokens
    blocks = pack(ids, 4, pad_id=0)
    assert blocks.shape == (3, 4)
    assert blocks.reshape(-1)[:11].tolist() == list(range(1, 12)) and blocks[-1, -1] == 0
    assert pack(ids[:8], 4, 0).shape == (2, 4)  # exact fit: no pad block


def test_next_token_labels_shift_and_ignore_pad():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    lab = next_token_labels(ids, pad_id=0)
    assert lab.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_padded_vocab_slice_equals_minus_inf_mask():
    from raydistill import ops

    torch.manual_seed(0)
    vocab = 10
    s = torch.randn(2, 3, vocab + 6, dtype=torch.float64)   # student padded by 6
    t = torch.randn(2, 3, vocab + 2, dtype=torch.float64)   # teacher padded by 2
    lab = torch.randint(0, vocab, (2, 3))
    sliced = ops.kd_loss(shared_vocab(s, vocab), shared_vocab(t, vocab), lab, temperature=2.0, alpha=0.6)
    # the same with the padded ids masked to -inf at the student's width
    t_full = torch.full_like(s, float("-inf"))
    t_full[..., :vocab] = t[..., :vocab]
    s_masked = s.clone()
    s_masked[..., vocab:] = float("-inf")
    masked = ops.kd_loss_reference(s_masked, t_full, lab, temperature=2.0, alpha=0.6)
    torch.testing.assert_close(sliced.double(), masked, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        shared_vocab(torch.randn(2, 8), vocab)


KD_TERMS = ({"type": "kd_logits", "weight": 0.7, "teachers": {"main": 1.0}, "temperature": 2.0,
             "divergence": "forward_kl", "beta": 0.5}, {"type": "ce", "weight": 0.3})


def _lm_spec(kind="kd", offline=False, pad=0, vocab=40, fused=False):
    return StageSpec(stage="s", task="causal_lm", kind=kind, model={"model": "hf", "kwargs": {"config": TINY_LLAMA}},
                     epochs=1, batch_size=2, optimizer={}, lr_schedule={}, seed=0, progress_dir="/tmp",
                     **({"terms": KD_TERMS} if kind == "kd" else {}), fused_linear=fused,
                     offline_teacher="main" if offline else None,
                     task_info={"vocab_size": vocab, "pad_id": pad, "eos_id": 1})


def _criterion(task, spec, student, teacher):
    teachers = {"main": teacher} if teacher is not None else {}
    return Criterion(spec.terms, student=task.layout(student),
                     teachers={n: task.layout(t) for n, t in teachers.items()}), teachers


def _loss(task, student, batch, spec, teacher):
    """One step's loss as the per-worker loop computes it: the spec's criterion over the task's outputs."""
    crit, teachers = _criterion(task, spec, student, teacher)
    return task.loss(student, batch, spec, teachers, crit)


def _prepare(task, batch, spec, teacher, **kw):
    crit, teachers = _criterion(task, spec, task.build_model(spec.model, spec.task_info), teacher)
    return task.prepare(batch, spec, teachers, crit.needs(), **kw)


def test_causal_lm_task_loss_matches_reference_and_metrics():
    from raydistill import ops

    torch.manual_seed(0)
    task = get_task("causal_lm")
    spec = _lm_spec()
    student = task.build_model(spec.model, spec.task_info)
    teacher = task.build_model({"model": "hf", "kwargs": {"config": dict(TINY_LLAMA, vocab_size=44)}},
                               spec.task_info)  # padded teacher vocabulary
    ids = torch.randint(2, 40, (3, 9))
    ids[0, 6:] = 0  # padding at the end of a block
    loss, n = _loss(task, student, {"input_ids": ids}, spec, teacher)
    assert n == 3 * 8 - 3
    lab = next_token_labels(ids, 0)
    ref = ops.kd_loss_reference(student(input_ids=ids).logits.double(),
                                teacher(input_ids=ids).logits[..., :40].double(), lab,
                                temperature=2.0, alpha=0.7)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    # ce stage: plain next-token cross-entropy over non-pad targets
    ce, _ = _loss(task, student, {"input_ids": ids}, _lm_spec("ce"), None)
    want = torch.nn.functional.cross_entropy(student(input_ids=ids).logits.reshape(-1, 40), lab.reshape(-1))
    torch.testing.assert_close(ce, want)
    m = lm_metrics(student, ids, 0, 40, teacher=student)
    assert m["teacher_agreement"] == 1.0 and m["eval_tokens"] == n
    assert m["perplexity"] == pytest.approx(float(torch.exp(want.detach())), rel=1e-4)


def test_lm_metrics_bounds_the_logits_of_a_batch(monkeypatch):
    """A large vocabulary x sequence: lm_metrics evaluates fewer rows at a time (at most
    EVAL_LOGITS_MAX_BYTES of float32 logits) and gives the per-block NLL, perplexity, accuracy and teacher
    agreement of the whole batch at once."""
    from raydistill.tasks import causal_lm

    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))
    task = get_task("causal_lm")
    spec = _lm_spec()
    student = task.build_model(spec.model, spec.task_info)
    teacher = task.build_model(spec.model, spec.task_info)
    ids = torch.randint(2, 40, (7, 9))
    ids[2, 5:] = 0
    whole = lm_metrics(student, ids, 0, 40, teacher=teacher, items=True)
    rows = []
    forward = student.forward
    monkeypatch.setattr(student, "forward", lambda *a, **k: rows.append(len(k["input_ids"])) or forward(*a, **k))
    monkeypatch.setattr(causal_lm, "EVAL_LOGITS_MAX_BYTES", 2 * 9 * 40 * 4 + 7)  # 2 rows of (9, 40) logits
    small = lm_metrics(student, ids, 0, 40, teacher=teacher, items=True)
    assert rows == [2, 2, 2, 1]
    torch.testing.assert_close(torch.tensor(small["_items"]["nll"]), torch.tensor(whole["_items"]["nll"]),
                               rtol=1e-5, atol=1e-5)
    for key in ("perplexity", "next_token_accuracy", "teacher_agreement", "eval_tokens"):
        assert small[key] == pytest.approx(whole[key], rel=1e-5), key


@pytest.mark.parametrize("offline", [False, True])
def test_fused_linear_loss_equals_materialised_logits(offline):
    """distill.fused_linear: hidden states + lm_head through ops.kd_loss_linear(_topk) give the loss and
    the gradients of the materialised-logits path (padded teacher vocabulary, pad targets ignored)."""
    torch.manual_seed(1)
    task = get_task("causal_lm")
    plain, fused = _lm_spec(offline=offline), _lm_spec(offline=offline, fused=True)
    student = task.build_model(plain.model, plain.task_info)
    teacher = task.build_model({"model": "hf", "kwargs": {"config": dict(TINY_LLAMA, vocab_size=44)}},
                               plain.task_info)
    ids = torch.randint(2, 40, (3, 9))
    ids[1, 5:] = 0
    batch = {"input_ids": ids}
    if offline:
        with torch.no_grad():
            vals, idx = teacher(input_ids=ids).logits[..., :40].topk(8, dim=-1)
        batch.update(topk_values=vals, topk_indices=idx)
    grads = []
    losses = []
    for spec in (plain, fused):
        student.zero_grad(set_to_none=True)
        loss, _ = _loss(task, student, batch, spec, None if offline else teacher)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and "lm_head.weight" in grads[1]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_prepare_computes_the_teacher_once_and_gives_the_online_loss(monkeypatch):
    """Online fused distillation: prepare runs the teacher once over the shard; the loss on any batch of it
    then equals (loss and gradients) the loss with a teacher forward at the step, and runs no teacher."""
    import raydistill.tasks.causal_lm as clm

    torch.manual_seed(2)
    task = get_task("causal_lm")
    spec = _lm_spec(fused=True)
    student = task.build_model(spec.model, spec.task_info)
    teacher = task.build_model({"model": "hf", "kwargs": {"config": dict(TINY_LLAMA, vocab_size=44)}},
                               spec.task_info).eval()
    ids = torch.randint(2, 40, (5, 9))
    ids[3, 6:] = 0
    shard = _prepare(task, {"input_ids": ids}, spec, teacher, chunk=2)
    assert shard["teacher.main.last"].shape == (5, 9, TINY_LLAMA["hidden_size"])
    assert shard["input_ids"] is ids
    idx = torch.tensor([4, 1, 3])
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    losses, grads = [], []
    for batch in ({"input_ids": ids[idx]}, {k: v[idx] for k, v in shard.items()}):
        calls.clear()
        student.zero_grad(set_to_none=True)
        loss, n = _loss(task, student, batch, spec, teacher)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in student.named_parameters()})
        assert len(calls) == (0 if "teacher.main.last" in batch else 1)
    hook.remove()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
    # nothing cached for cross-entropy stages, offline outputs, the materialised-logits path, a shard
    # whose states would exceed the cap, or a teacher that is no transformers model
    key = "teacher.main.last"
    assert key not in _prepare(task, {"input_ids": ids}, _lm_spec("ce"), None)
    for s in (_lm_spec(offline=True, fused=True), _lm_spec(fused=False)):
        assert key not in _prepare(task, {"input_ids": ids}, s, None if s.offline else teacher)
    monkeypatch.setattr(clm, "TEACHER_HIDDEN_MAX_BYTES", 5 * 9 * TINY_LLAMA["hidden_size"] * 4 - 1)
    assert key not in _prepare(task, {"input_ids": ids}, spec, teacher)
    monkeypatch.setattr(clm, "TEACHER_HIDDEN_MAX_BYTES", 5 * 9 * TINY_LLAMA["hidden_size"] * 4)
    assert key in _prepare(task, {"input_ids": ids}, spec, teacher)
    plain = torch.nn.Sequential(torch.nn.Embedding(40, 8), torch.nn.Linear(8, 40, bias=False))
    assert key not in _prepare(task, {"input_ids": ids}, spec, plain)


def test_teacher_pass_runs_the_decoder_alone_in_chunks_of_its_token_budget(monkeypatch):
    """The teacher pass keeps the states the whole model returns (``hidden_states``), whatever the chunking:
    with only the last state kept, through the decoder alone (no lm_head) at ``TEACHER_PASS_TOKENS`` tokens
    per forward; with a hidden-layer term too, through the model (every layer's states) at half as many."""
    import raydistill.tasks.causal_lm as clm

    torch.manual_seed(3)
    task = get_task("causal_lm")
    teacher = task.build_model({"model": "hf", "kwargs": {"config": dict(TINY_LLAMA, num_hidden_layers=2)}},
                               _lm_spec().task_info).eval()
    ids = torch.randint(2, 40, (5, 9))
    ids[3, 6:] = 0
    with torch.no_grad():
        full = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    calls = {"model": 0, "decoder": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    teacher.base_model.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    monkeypatch.setattr(clm, "TEACHER_PASS_TOKENS", 2 * 9)  # two rows of 9 tokens per forward

    got = _prepare(task, {"input_ids": ids}, _lm_spec(fused=True), teacher)
    assert calls == {"model": 0, "decoder": 3}
    torch.testing.assert_close(got["teacher.main.last"], full[-1], rtol=1e-5, atol=1e-6)

    hidden = {"type": "hidden", "weight": 0.5, "teacher": "main", "layers": [[1, 1]], "metric": "mse"}
    calls.update(model=0, decoder=0)
    got = _prepare(task, {"input_ids": ids}, _lm_spec(fused=True).replace(terms=KD_TERMS + (hidden,)), teacher)
    assert calls == {"model": 5, "decoder": 5}  # one row per forward (the decoder runs inside the model)
    torch.testing.assert_close(got["teacher.main.last"], full[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["teacher.main.h1"], full[1], rtol=1e-5, atol=1e-6)


def test_classification_macro_precision_recall():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(p, y, num_classes=3)
    assert m["macro_precision"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1 / 1]))
    assert m["macro_recall"] == pytest.approx(np.mean([1 / 2, 2 / 2, 1 / 2]))


def test_sparse_linear_without_bias():
    from raydistill.ops.sparse import SparseLinear

    lin = torch.nn.Linear(8, 4, bias=False)
    sl = SparseLinear.from_dense(lin, torch.rand(4, 8) > 0.5)
    assert SparseLinear(8, 4, bias=False).bias is None and sl.bias is None
    x = torch.randn(3, 5, 8)  # (B, S, H) as in a transformer
    torch.testing.assert_close(sl(x), x @ sl.weight_dense().T)


def test_config_union_and_lm_input_errors(tmp_path):
    cfg = load_config("lm_tiny")
    assert cfg.data.name == "text" and cfg.data.task == "causal_lm"
    assert load_config(None).data.task == "classification"
    cases = [
        (["data.path=" + str(tmp_path / "nope")], "data.path: .*does not exist"),
        (["data.seq_len=100"], r"data.seq_len \(100\) exceeds teacher.kwargs.config max positions \(64\)"),
        (["student.kwargs={pretrained: " + str(tmp_path) + "}"], "student.kwargs.pretrained: .* has no config.json"),
        (["student.kwargs.config.vocab_size=100"], "student.kwargs.config: vocab_size 100 is smaller"),
        (["data.nosuch=1"], "data.nosuch: unknown key; allowed keys here: .*seq_len"),
        (["data.name=csv"], r"data.name: must be one of .mnist1d., .text. \(got .csv.\)"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_config("lm_tiny", overrides)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ConfigError, match="data.path: the corpus at .* is empty"):
        load_config("lm_tiny", [f"data.path={empty}"])


def test_tokenizer_dir_vocab_checks(tmp_path):
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], 300, tmp_path / "tok")
    n = json.loads((tok / "tokenizer.json").read_text())
    assert n["model"]["type"] == "BPE"
    from raydistill.data.text import tokenizer_vocab_size

    v = tokenizer_vocab_size(tok)
    ok = load_config("lm_tiny", [f"data.tokenizer={tok}", f"student.kwargs.config.vocab_size={v + 64}"])
    assert ok.data.tokenizer == str(tok)  # padding (< 128 extra ids) is fine
    with pytest.raises(ConfigError, match="more than padding"):
        load_config("lm_tiny", [f"data.tokenizer={tok}", f"teacher.kwargs.config.vocab_size={v + 500}"])
    with pytest.raises(ConfigError, match="does not fit"):
        load_config("lm_tiny", [f"data.tokenizer={tok}", f"teacher.kwargs.config.vocab_size={v - 1}"])
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        load_config("lm_tiny", [f"data.tokenizer={tmp_path}"])


def test_corpus_files_default_is_stdlib_and_formats(tmp_path):
    files = corpus_files(None, max_bytes=50_000)
    assert files and all(f.suffix == ".py" for f in files)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(ValueError, match="mixes file kinds"):
        corpus_files(tmp_path)


def test_tied_embeddings_checkpoint_roundtrip(tmp_path):
    from raydistill.distill.worker import load_weights, save_checkpoint_dir
    from raydistill.models import build_model

    spec = {"model": "hf", "kwargs": {"config": {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2,
                                                 "n_positions": 16, "tie_word_embeddings": True}}}
    torch.manual_seed(0)
    m = build_model(spec, vocab_size=50)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    d = save_checkpoint_dir(tmp_path / "ck", model=m, meta={"epoch": 1})
    torch.manual_seed(1)
    m2 = build_model(spec, vocab_size=50)
    load_weights(m2, d)
    ids = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(m2.eval()(input_ids=ids).logits, m.eval()(input_ids=ids).logits)  # no dropout
