"""The corpus through Ray Data (issue 22): several packing tasks and train shards give exactly the blocks and
the split of the in-memory packing (groups of PACK_DOCS documents, one seeded permutation of all blocks); the
streamed train set yields the shards' rows in order; a pyarrow URI works as the cache path; the tokenizer is
trained on exactly its bounded, seeded sample."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raydistill.data import text

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray2():
    from raydistill.distill.session import ray_session

    with ray_session(num_cpus=2) as ray:
        yield ray


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


WORDS = ["teacher", "student", "soft", "targets", "temperature", "alpha", "the", "of", "naïve", "→"]


def _doc(rng, lo=5, hi=120) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))


def _in_memory_split(docs, tok_dir, seq_len, val_fraction, seed):
    """What the corpus preparation computed in memory before issue 22: PACK_DOCS documents at a time encoded
    (EOS after each) and cut into padded blocks, all blocks permuted by ``seed``, the first ones held out."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<pad>")
    blocks = []
    for i in range(0, len(docs), 32):
        ids = [t for d in docs[i:i + 32] for t in tok.encode(d, add_special_tokens=False).ids + [eos]]
        n = -(-len(ids) // seq_len)
        b = np.full(n * seq_len, pad, np.int32)
        b[: len(ids)] = ids
        blocks.append(b.reshape(n, seq_len))
    arr = np.concatenate(blocks)
    arr = arr[np.random.default_rng(seed).permutation(len(arr))]
    held = max(2, int(round(len(arr) * val_fraction)))
    return arr[held:], arr[: held // 2], arr[held // 2: held], pad


def _data(path, **kw):
    from raydistill.config import load_config

    over = [f"data.path={path}", "data.max_bytes=null", "data.vocab_size=300", "data.seq_len=16",
            "data.val_fraction=0.1"] + [f"data.{k}={v}" for k, v in kw.items()]
    return load_config("lm_tiny", over).data


def _streamed(info) -> np.ndarray:
    """The train dataset's rows in the order Ray Data yields them with ``preserve_order`` (what the training
    workers' shards use; a dataset copies the context when it is created)."""
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    old, opts.preserve_order = opts.preserve_order, True
    try:
        ds = info.train_dataset()
        return np.concatenate([b["input_ids"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    finally:
        opts.preserve_order = old


def test_many_tasks_and_shards_give_the_in_memory_split(ray2, tmp_path, rng, monkeypatch):
    from pathlib import Path

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [_doc(rng) for _ in range(int(rng.integers(70, 110)))]  # > 2 groups of PACK_DOCS files
    for i, d in enumerate(docs):
        (corpus / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    monkeypatch.setattr(text, "UNIT_BYTES", 2000)  # several packing tasks (32 files each) ...
    monkeypatch.setattr(text, "SHARD_BYTES", 4 * 16 * 40)  # ... and train shards of 40 blocks
    seed = int(rng.integers(0, 1000))
    data = _data(corpus, seed=seed)
    assert len(text.plan_units(text.corpus_pieces(text.corpus_files(corpus)))) >= 2
    td = text.prepare_corpus(data, tmp_path / "s")
    train, val, test, pad = _in_memory_split(docs, Path(td.tokenizer_dir), 16, 0.1, seed)
    np.testing.assert_array_equal(td.val, val)
    np.testing.assert_array_equal(td.test, test)
    np.testing.assert_array_equal(td.train, train)
    assert len(td.train_files) == -(-len(train) // 40) >= 3 and set(td.train_rows[:-1]) == {40}
    assert td.num_tokens == int((train != pad).sum()) and td.pad_id == pad
    np.testing.assert_array_equal(_streamed(td), train)  # streamed: the shards in order
    np.testing.assert_array_equal(td.head(50), train[:50])
    assert td.materialize  # data.materialize null: a small corpus is held in memory ...
    assert not text.prepare_corpus(data.model_copy(update={"materialize": False}), tmp_path / "s").materialize

    # ... a pyarrow URI as the cache path: the same files there (and nothing under the storage path)
    uri = text.prepare_corpus(data.model_copy(update={"cache_path": f"file://{tmp_path / 'remote'}"}),
                              tmp_path / "unused")
    assert uri.root.startswith("file://") and (tmp_path / "remote" / "datasets").is_dir()
    assert not (tmp_path / "unused").exists()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(uri, split), getattr(td, split), err_msg=split)
    np.testing.assert_array_equal(_streamed(uri), train)


def test_jsonl_in_byte_ranges_and_the_tokenizer_sample(ray2, tmp_path, rng, monkeypatch):
    from pathlib import Path

    docs = [_doc(rng, 1, 60) for _ in range(400)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    monkeypatch.setattr(text, "PIECE_BYTES", int(rng.integers(300, 900)))  # many ranges of one file
    sample = f.stat().st_size // 3
    seed = int(rng.integers(0, 1000))
    data = _data(f, seed=seed, tokenizer_sample_bytes=sample)
    td = text.prepare_corpus(data, tmp_path / "s")
    # the BPE saw exactly the seeded sample of ranges (the same merges as one trained here on those lines)
    pieces = text.corpus_pieces([f])
    chosen = text.sample_pieces(pieces, sample, seed)
    assert len(pieces) > 6 and len(chosen) < len(pieces)
    want = text.train_bpe([d for p in chosen for d in text.piece_documents(p)], 300, tmp_path / "want")
    assert json.loads((Path(td.tokenizer_dir) / "tokenizer.json").read_text())["model"] == \
        json.loads((want / "tokenizer.json").read_text())["model"]
    # one unit, many pieces: the documents packed PACK_DOCS at a time across the ranges, split as in memory
    train, val, test, _ = _in_memory_split(docs, Path(td.tokenizer_dir), 16, 0.1, seed)
    for got, ref in ((td.train, train), (td.val, val), (td.test, test)):
        np.testing.assert_array_equal(got, ref)
