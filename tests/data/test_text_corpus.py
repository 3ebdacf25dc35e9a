"""The corpus check that runs while files are read (``decode_corpus_file``) and on their heads before Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raydistill.config import ConfigError
from raydistill.data.text import CorpusError, check_corpus_heads, decode_corpus_file


@pytest.fixture
def rng():
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


def _words(rng, n):
    vocab = ["naïve", "café", "→", "teacher", "student", "temperature", "the", "of", "ß", "日本"]
    return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), n))


def test_text_file_is_one_document_and_bad_bytes_name_their_line(rng):
    text = "\n".join(_words(rng, 20) for _ in range(5)) + "\n"
    assert decode_corpus_file("a.txt", text.encode()) == [text]
    lines = text.splitlines(keepends=True)
    bad = "".join(lines[:3]).encode() + "caf\xe9\n".encode("latin-1") + "".join(lines[3:]).encode()
    with pytest.raises(CorpusError, match=r"a\.txt is not UTF-8 text \(byte 0xe9 at line 4") as e:
        decode_corpus_file("a.txt", bad)
    assert isinstance(e.value, ConfigError) and "data.skip_bad_files" in str(e.value)
    with pytest.raises(CorpusError, match="binary .*NUL byte at line 2"):
        decode_corpus_file("b.md", b"ok\n\x00\n")
    with pytest.raises(CorpusError, match="is not UTF-8"):
        decode_corpus_file("r.txt", b"\xff" + rng.bytes(100))


def test_a_head_may_end_inside_a_character_or_a_line(rng):
    text = _words(rng, 200)
    data = text.encode()
    cut = next(i for i in range(len(data) - 1, 0, -1) if data[i] >= 0x80 and data[i - 1] < 0x80) + 1  # mid-char
    with pytest.raises(CorpusError):
        decode_corpus_file("a.txt", data[:cut])
    assert decode_corpus_file("a.txt", data[:cut], partial=True) == [data[: cut - 1].decode()]
    rows = [json.dumps({"text": _words(rng, 10), "id": i}) for i in range(5)]
    blob = ("\n".join(rows) + "\n").encode()
    with pytest.raises(CorpusError, match="line 5 is not valid JSON"):
        decode_corpus_file("d.jsonl", blob[:-10])
    assert decode_corpus_file("d.jsonl", blob[:-10], partial=True) == [json.loads(r)["text"] for r in rows[:4]]


def test_jsonl_documents_blank_lines_and_bad_lines(rng):
    docs = [_words(rng, 8) for _ in range(4)]
    lines = [json.dumps({"text": d}) for d in docs]
    blob = "\n".join(lines[:2] + ["", "   "] + lines[2:]) + "\n"
    assert decode_corpus_file("d.jsonl", blob.encode()) == docs
    assert decode_corpus_file("d.jsonl", blob.replace('"text"', '"body"').encode(), text_column="body") == docs
    for bad, words in [('{"text": "x"', "line 3 is not valid JSON"), ("[1, 2]", "line 3 is a JSON list"),
                       ('{"text": 7}', "data.text_column: d.jsonl line 3 holds a JSON int in 'text'"),
                       ('{"txt": "x"}', "data.text_column: d.jsonl line 3 has no 'text'")]:
        with pytest.raises(CorpusError, match=words.replace("[", r"\[")):
            decode_corpus_file("d.jsonl", ("\n".join(lines[:2] + [bad] + lines[2:]) + "\n").encode())


def test_heads_check_names_only_bad_files_and_keeps_to_its_budget(tmp_path, rng):
    good, bad, late = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    good.write_text(_words(rng, 3000), encoding="utf-8")
    bad.write_bytes(b"\x7fELF\x02\x01\x01\x00" + rng.bytes(3000))
    late.write_bytes(_words(rng, 3000).encode() + b"\xff")
    msgs = check_corpus_heads([good, bad, late])
    assert len(msgs) == 1 and str(bad) in msgs[0]  # c.txt's bad byte lies past its head
    assert check_corpus_heads([good, bad], budget_bytes=100) == []  # the budget is spent on a.txt
