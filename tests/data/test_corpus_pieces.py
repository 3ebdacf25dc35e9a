"""The corpus cut into pieces and units (no Ray): a jsonl file read in byte ranges gives its documents once
each, in order, with errors naming the file's own line; units keep groups of PACK_DOCS documents; the
tokenizer's sample is bounded, seeded and in corpus order."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raydistill.data import text
from raydistill.data.text import CorpusError, Piece, corpus_pieces, piece_documents, plan_units, sample_pieces


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def _doc(rng) -> str:
    words = ["naïve", "teacher", "student", "→", "the", "of", "日本", "\\n", '"q"']
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(0, 40))))


def test_jsonl_ranges_give_every_line_once_in_order(tmp_path, rng):
    docs = [_doc(rng) for _ in range(300)]
    lines = [json.dumps({"text": d, "n": i}) for i, d in enumerate(docs)]
    for i in rng.choice(len(lines), 20, replace=False):  # blank lines are skipped wherever they fall
        lines[i] = lines[i] + "\n"
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""), encoding="utf-8")
    for piece_bytes in (int(rng.integers(1, 40)), int(rng.integers(40, 2000)), 10 ** 9):
        pieces = corpus_pieces([f], piece_bytes=piece_bytes)
        assert pieces[0].start == 0 and pieces[-1].end == f.stat().st_size
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # contiguous, no gap, no overlap
        got = [d for p in pieces for d in piece_documents(p)]
        assert got == docs, piece_bytes


def test_a_bad_line_in_a_later_range_names_its_line_in_the_file(tmp_path, rng):
    lines = [json.dumps({"text": _doc(rng)}) for _ in range(200)]
    bad = int(rng.integers(100, 200))
    lines[bad] = lines[bad][:-2]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pieces = corpus_pieces([f], piece_bytes=500)
    assert len(pieces) > 3
    hits = []
    for p in pieces:
        try:
            piece_documents(p)
        except CorpusError as exc:
            hits.append(str(exc))
    assert len(hits) == 1 and f"c.jsonl line {bad + 1} is not valid JSON" in hits[0], hits


def test_units_of_one_document_files_keep_groups_of_pack_docs(tmp_path, rng):
    sizes = rng.integers(1, 500, 3 * text.PACK_DOCS + 7)
    pieces = [Piece(f"f{i:03d}.py", 0, int(s), int(s)) for i, s in enumerate(sizes)]
    for unit_bytes in (1, int(rng.integers(100, 5000)), 10 ** 9):
        units = plan_units(pieces, unit_bytes)
        assert [p for u in units for p in u] == pieces
        assert all(len(u) % text.PACK_DOCS == 0 for u in units[:-1])
        assert all(sum(p.size for p in u) >= unit_bytes for u in units[:-1])
    jl = [Piece("a.jsonl", 10 * i, 10 * i + 10, 10) for i in range(25)]
    assert [len(u) for u in plan_units(jl, 35)] == [4, 4, 4, 4, 4, 4, 1]  # not one-document pieces: by bytes


def test_tokenizer_sample_is_bounded_seeded_and_in_corpus_order(rng):
    pieces = [Piece(f"f{i:03d}.py", 0, int(s), int(s)) for i, s in enumerate(rng.integers(1, 1000, 200))]
    total = sum(p.size for p in pieces)
    assert sample_pieces(pieces, total, 0) == pieces
    cap = int(rng.integers(1000, total // 2))
    seed = int(rng.integers(0, 1000))
    a, b = sample_pieces(pieces, cap, seed), sample_pieces(pieces, cap, seed)
    assert a == b and a == sorted(a, key=pieces.index)
    assert cap <= sum(p.size for p in a) < cap + 1000 and len(a) < len(pieces)
    assert a != sample_pieces(pieces, cap, seed + 1)


def test_cache_path_is_checked_before_ray_starts(tmp_path):
    """``data.cache_path``: a writable directory passes (created, no probe left behind); a file, an
    unwritable directory and an unknown URI scheme are ConfigErrors naming the key; a known remote scheme is
    left to the preparation (no network here)."""
    from raydistill.config import ConfigError, load_config
    from raydistill.tasks import get_task

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)) + "\n", encoding="utf-8")

    def check(cache):
        cfg = load_config("lm_tiny", [f"data.path={corpus}", f"data.cache_path={cache}"])
        get_task(cfg.data.task).check_data(cfg)

    check(tmp_path / "cache" / "deep")
    check(f"file://{tmp_path / 'uri'}")
    assert (tmp_path / "cache" / "deep").is_dir() and not any((tmp_path / "cache" / "deep").iterdir())
    assert (tmp_path / "uri").is_dir() and not any((tmp_path / "uri").iterdir())
    check("s3://bucket/corpora")
    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    bad = [(tmp_path / "a_file", "not a writable directory"), ("ftp://host/x", "unknown filesystem 'ftp'")]
    if os.geteuid() != 0:  # root writes anywhere
        bad.append((locked / "sub", "not a writable directory"))
    for cache, why in bad:
        with pytest.raises(ConfigError, match=r"data\.cache_path: .*" + why):
            check(cache)
