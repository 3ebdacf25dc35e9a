"""Causal LM through Ray (tiny config): tokenize (Ray Data + BPE), train the teacher, distil a 50%-sparse
student while a worker is killed and replaced (resume from the checkpoint), evaluate with SparseLinear,
export with save_pretrained and load it back with AutoModelForCausalLM.from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray

TINY = ["data.max_bytes=20000", "teacher.training.epochs=2", "data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def lm_storage(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_storage")


def test_lm_distil_crash_resume_export_roundtrip(ray_local, lm_storage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.config import load_config
    from raydistill.distill import build_student_trainer, ensure_teacher, evaluate_checkpoint
    from raydistill.distill.export import SPARSE_FILE, export_student
    from raydistill.tasks.causal_lm import text_data
    from raydistill.distill.evaluate import load_checkpoint_model
    from raydistill.tasks.causal_lm import lm_logits

    tmp_path = lm_storage
    cfg = load_config("lm_tiny", [*TINY, "distill.epochs=2", "run.debug_crash_at_epoch=2", "run.max_failures=1",
                                  f"run.storage_path={tmp_path}"])
    teacher = ensure_teacher(cfg, tmp_path)
    td = text_data(cfg, tmp_path)
    assert (Path(td.tokenizer_dir) / "tokenizer.json").is_file() and td.vocab_size <= 384
    # tokenizing and packing through Ray Data is deterministic: another storage path trains the same BPE
    # and gets the same blocks and splits (without preserve_order only ~15% of the blocks matched)
    td2 = text_data(cfg, tmp_path / "same_corpus_again")
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(td2, split), getattr(td, split), err_msg=split)
    assert td.train.shape[1] == 32 and len(td.test) >= 1
    assert teacher.metrics["perplexity"] < td.vocab_size / 4  # far better than uniform over the vocabulary

    res = build_student_trainer(cfg, teacher, storage_path=tmp_path / "ft", name="lm").fit()
    run = tmp_path / "ft" / "lm"
    assert (run / ".debug_crash_done").is_file()  # the worker process really died mid-epoch 2
    rows = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2]  # epoch 1 not repeated after the crash
    assert rows[0]["attempt"] != rows[1]["attempt"]
    assert rows[1]["global_step"] == 2 * rows[0]["global_step"]  # optimizer / schedule state resumed
    assert all(m["tokens_per_s"] > 0 and m["val_perplexity"] > 1 for m in rows)

    ck = Path(res.checkpoint.path)
    ev = evaluate_checkpoint(cfg, ck)
    assert ev["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert ev["sparse_layers"] == 7  # q, k, v, o, gate, up, down; embeddings and lm_head stay dense
    assert 1 < ev["perplexity"] < td.vocab_size / 2 and 0 <= ev["teacher_agreement"] <= 1
    assert len(ev["samples"]) == 2 and all(isinstance(s["continuation"], str) for s in ev["samples"])

    out = export_student(cfg, ck, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / SPARSE_FILE).is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    dense, *_ = load_checkpoint_model(cfg, ck, convert=False)
    sparse, *_ = load_checkpoint_model(cfg, ck, convert=True)
    ids = torch.as_tensor(td.test[:2].astype("int64"))
    with torch.no_grad():
        want = lm_logits(dense.eval(), ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, want)
        torch.testing.assert_close(lm_logits(sparse.eval(), ids), want, rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x\n"
    from tokenizers import Tokenizer

    assert tok(text)["input_ids"] == Tokenizer.from_file(td.tokenizer_dir + "/tokenizer.json").encode(text).ids


def test_lm_teacher_logits_compressed_resumed_and_offline_distillation(ray_local, lm_storage):
    """k = 128 through the default codec (cm at this vocabulary) in 4 shards: an interrupted run (its actor dies
    after one shard), run again, writes exactly the shards of an uninterrupted run; the decoded outputs match the
    online teacher within the codec's steps; the report records bytes / token, tokens / s and fidelity; a
    student distils from the cache (read one shard per Ray Data task) with its tail."""
    import math

    from raydistill.config import load_config
    from raydistill.data.topk_cache import REPORT_FILE, read_shard, shard_files
    from raydistill.data.topk_codec import topk_from_logits
    from raydistill.distill import build_student_trainer, ensure_teacher
    from raydistill.distill.teacher_logits import write_teacher_outputs
    from raydistill.tasks.causal_lm import text_data
    from raydistill.distill.evaluate import load_checkpoint_model
    from raydistill.tasks.causal_lm import lm_logits

    cfg = load_config("lm_tiny", [*TINY, f"run.storage_path={lm_storage}"])
    teacher = ensure_teacher(cfg, lm_storage)  # cached by the previous test when it ran first
    td = text_data(cfg, lm_storage)
    shard_rows = math.ceil(len(td.train) / 4)
    kw = dict(storage_path=lm_storage, topk=128, concurrency=1, shard_rows=shard_rows)
    full = write_teacher_outputs(cfg, output=lm_storage / "tl_full", **kw)
    with pytest.raises(Exception, match="debug_fail_after_shards"):
        write_teacher_outputs(cfg, output=lm_storage / "tl_resumed", debug_fail_after_shards=1, **kw)
    assert len(shard_files(lm_storage / "tl_resumed")) == 1
    resumed = write_teacher_outputs(cfg, output=lm_storage / "tl_resumed", **kw)
    files = shard_files(full)
    assert len(files) == 4 and [f.name for f in shard_files(resumed)] == [f.name for f in files]
    for f in files:  # byte for byte
        assert (resumed / f.name).read_bytes() == f.read_bytes(), f.name
    rep = json.loads((resumed / REPORT_FILE).read_text())
    assert rep["resumed_shards"] == 1 and rep["written_shards"] == 3 and rep["tokens"] == td.train.size
    assert rep["bytes"] == sum(f.stat().st_size for f in files) and rep["tokens_per_s"] > 0
    assert rep["codec"]["name"] == "cm" and rep["bytes_per_token"] < 250 and 0 < rep["fidelity"]["kl_topk"] < 1e-3
    assert rep["codec"]["codec_version"] == 2  # the compiled coder, in the Ray workers too
    assert 0 < rep["fidelity"]["kl_with_tail"] < 1e-3 and rep["fidelity"]["temperature"] == 2.0

    out = read_shard(files[0])
    ids = torch.as_tensor(out["input_ids"][:3])
    net, *_ = load_checkpoint_model(cfg, teacher.path, model=teacher.model)
    with torch.no_grad():
        want_v, want_i, want_t = topk_from_logits(lm_logits(net.eval(), ids)[..., :td.vocab_size], 128, 2.0)
    got_i = torch.as_tensor(out["topk_indices"][:3])
    assert (got_i == want_i.sort(-1).values).float().mean() > 0.99  # ties deep in the tail may swap
    got_v = torch.as_tensor(out["topk_values"][:3]).gather(-1, got_i.argsort(-1))
    want_sorted = want_v.gather(-1, want_i.argsort(-1))
    step = 1 / (rep["codec"]["value_levels"] - 1)
    gamma = rep["codec"]["gamma"]
    assert ((got_v * gamma).exp() - (want_sorted * gamma).exp()).abs().max() <= step  # (matched where ids agree)
    torch.testing.assert_close(torch.as_tensor(out["topk_tail"][:3]).exp().sqrt(), want_t.exp().sqrt(),
                               atol=1 / 255, rtol=0)

    cfg2 = load_config("lm_tiny", [*TINY, f"run.storage_path={lm_storage}", f"distill.teacher_outputs={full}",
                                   "distill.topk=128", "distill.topk_tail=true", "distill.epochs=1",
                                   "compression.sparsity=0"])
    res = build_student_trainer(cfg2, teacher, storage_path=lm_storage / "ft", name="offline").fit()
    meta = json.loads((Path(res.checkpoint.path) / "meta.json").read_text())
    assert meta["offline"] is True and meta["teacher"] is None
    assert 1 < meta["metrics"]["perplexity"] < td.vocab_size / 2


def test_lm_fsdp_two_cpu_workers_gloo_resume(ray_local, lm_storage):
    """FSDP2 (fully_shard) through Ray Train on 2 CPU workers (gloo) in bf16 (FSDP's mixed precision: float32
    shards, bf16 compute), a worker killed mid-epoch 2: the gathered full float32 model + optimizer state is
    checkpointed and restored (set_optimizer_state_dict)."""
    from raydistill.config import load_config
    from raydistill.distill import build_student_trainer, ensure_teacher, evaluate_checkpoint

    cfg = load_config("lm_tiny", [*TINY, f"run.storage_path={lm_storage}", "scaling.strategy=fsdp",
                                  "distill.precision=bf16",
                                  "compression.sparsity=0", "distill.epochs=2", "run.debug_crash_at_epoch=2",
                                  "run.max_failures=1"])
    teacher = ensure_teacher(cfg, lm_storage)
    res = build_student_trainer(cfg, teacher, storage_path=lm_storage / "ft", name="fsdp", num_workers=2,
                                resources_per_worker={"CPU": 0.5}).fit()
    rows = [json.loads(line) for line in (lm_storage / "ft" / "fsdp" / "epochs.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2] and rows[0]["attempt"] != rows[1]["attempt"]
    assert rows[1]["global_step"] == 2 * rows[0]["global_step"]
    assert rows[1]["val_perplexity"] < rows[0]["val_perplexity"]  # the resumed optimizer kept learning
    ev = evaluate_checkpoint(cfg, Path(res.checkpoint.path), samples=False)
    assert ev["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-4)  # full weights were saved
    from safetensors.torch import load_file

    weights = load_file(str(Path(res.checkpoint.path) / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # the master weights
