"""Text corpora for causal-LM distillation: read with Ray Data, tokenized, packed into fixed-length blocks.

* **Corpus**: ``data.path`` is a ``.txt``/``.py``/``.md`` (one document per file), ``.jsonl``/``.json``
  (one document per line, ``data.text_column``) or ``.parquet`` file (``data.text_column``), or a folder
  of them (searched recursively). ``data.path: null`` is the default corpus: the Python standard
  library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``), present on every machine without
  a download -- the default job is a small *code* LM. Files are taken in sorted order until
  ``data.max_bytes``. Every file must be UTF-8 text (no NUL bytes) and every jsonl line a JSON object
  whose ``data.text_column`` is a string: otherwise the corpus is refused with a :class:`CorpusError`
  naming the file (and line), or, with ``data.skip_bad_files: true``, such files are left out.
  :func:`decode_corpus_file` checks one file's bytes while it is read (a Ray Data ``map_batches`` step);
  :func:`check_corpus_heads` checks the head of each file before Ray starts.
* **Tokenizer**: ``data.tokenizer`` (a local directory with ``tokenizer.json``), or a byte-level BPE of
  ``data.vocab_size`` trained with ``tokenizers`` in a Ray task on a seeded sample of the corpus of about
  ``data.tokenizer_sample_bytes`` (all of it when smaller) and saved under ``<root>/tokenizers/<hash>``;
  special tokens ``<|endoftext|>`` (ends every document) and ``<pad>``.
* **Packing** (:func:`prepare_corpus`, Ray Data end to end, nothing gathered on the driver): the files are
  cut into pieces (a text file; a byte range of whole lines of a jsonl file; a parquet row group) and the
  pieces into units of about 16 MiB. A Ray Data ``map_batches`` task per unit reads and checks its pieces,
  tokenizes them ``PACK_DOCS`` documents at a time (EOS after each), cuts the stream into blocks of
  ``data.seq_len`` tokens (the last block of each group filled with ``<pad>``, whose positions are
  ``ignore_index`` in the loss) and writes them to a parquet file. The driver then knows only the block count
  ``N``: block ``i`` gets rank ``inv[i]`` in ``default_rng(data.seed).permutation(N)``; the lowest ranks are
  val and test (``data.val_fraction``), the rest train. A second Ray Data pass groups the blocks by output
  file (``groupby().map_groups()``) and writes ``val.parquet``, ``test.parquet`` and the train shards
  ``train/part-*.parquet`` (about 8 MiB each), every file in rank order, then a ``manifest.json``.
  ``<root>`` is ``data.cache_path`` (a local path or a pyarrow filesystem URI) or the storage path; the
  corpus goes to ``<root>/datasets/text-<hash>/`` and is reused by every run with the same corpus and keys.
* **Reading** (:class:`CorpusInfo`): the train split streamed as a Ray dataset (``train_dataset``; the
  workers' ``get_dataset_shard("train")``) or, for small corpora (``data.materialize``), in memory.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from raydistill.errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<pad>"
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


def default_corpus_dir() -> Path:
    """The Python standard library's source directory (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: str | os.PathLike | None, max_bytes: int | None = None) -> list[Path]:
    """The corpus files, sorted; ``ValueError`` naming ``data.path`` when missing or empty."""
    if path is None:
        root = default_corpus_dir()
        files = sorted(p for p in root.glob("*.py") if p.is_file())  # top level: no site-packages, no tests
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise ValueError(f"data.path: {root} does not exist")
        if root.is_file():
            if root.suffix not in ALL_SUFFIXES:
                raise ValueError(f"data.path: {root} is not a {'/'.join(ALL_SUFFIXES)} file")
            files = [root]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in ALL_SUFFIXES)
            if not files:
                raise ValueError(f"data.path: the folder {root} holds no {'/'.join(ALL_SUFFIXES)} files")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ValueError(f"data.path: the corpus at {root} is empty (every file has 0 bytes)")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data.path: {root} mixes file kinds {sorted(kinds)}; use one kind per corpus")
    if max_bytes:
        out, total = [], 0
        for f in files:
            out.append(f)
            total += f.stat().st_size
            if total >= max_bytes:
                break
        files = out
    return files


def _kind(f: Path) -> str:
    return "text" if f.suffix in TEXT_SUFFIXES else "json" if f.suffix in JSON_SUFFIXES else "parquet"


class CorpusError(ConfigError):
    """A corpus file is not what ``data.path`` allows: the message names the file (and line)."""


SKIP_HINT = "set data.skip_bad_files: true to leave such files out"


def decode_corpus_file(path, data: bytes, *, text_column: str = "text", partial: bool = False,
                       first_line: int = 1, offset: int = 0) -> list[str]:
    """The documents in one text or jsonl corpus file, given its bytes: the whole file (``.txt``, ``.py``,
    ...) or one per line (``.jsonl`` / ``.json``: the ``text_column`` string of each JSON object; blank lines
    are skipped). Raises :class:`CorpusError` naming the file and line when the bytes are not UTF-8 text
    (binary, other encodings, NUL bytes) or a jsonl line is not such an object. ``partial``: ``data`` is
    only the head of the file, so a character or line cut at its end is not an error. ``first_line`` /
    ``offset``: the line number and byte offset of ``data``'s start in the file (a range of a jsonl file)."""
    path = str(path)
    mv = memoryview(data)
    try:
        text = str(mv, "utf-8")
    except UnicodeDecodeError as exc:
        if partial and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            text = str(mv[: exc.start], "utf-8")
        else:
            line = data.count(b"\n", 0, exc.start) + first_line
            raise CorpusError(f"data.path: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, "
                              f"offset {offset + exc.start}): binary files and other encodings are refused; "
                              f"{SKIP_HINT}") from None
    nul = text.find("\0")
    if nul >= 0:
        raise CorpusError(f"data.path: {path} is binary (a NUL byte at line {text.count(chr(10), 0, nul) + first_line}); "
                          f"{SKIP_HINT}")
    if Path(path).suffix not in JSON_SUFFIXES:
        return [text]
    lines = text.split("\n")
    if partial and not text.endswith("\n"):
        lines = lines[:-1]
    docs = []
    for no, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"data.path: {path} line {no} is not valid JSON ({exc.msg} at column {exc.colno}); "
                              f"a jsonl corpus holds one JSON object per line; {SKIP_HINT}") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"data.path: {path} line {no} is a JSON {type(obj).__name__}, not an object; a jsonl "
                              f"corpus holds one JSON object per line; {SKIP_HINT}")
        doc = obj.get(text_column)
        if not isinstance(doc, str):
            what = f"has no {text_column!r}" if text_column not in obj else \
                f"holds a JSON {type(doc).__name__} in {text_column!r}"
            raise CorpusError(f"data.text_column: {path} line {no} {what}, not a string (keys: {sorted(obj)[:10]})")
        docs.append(doc)
    return docs


HEAD_BYTES = 8 * 1024
HEADS_BUDGET_BYTES = 16 * 1024 * 1024


def check_corpus_heads(files: list[Path], text_column: str = "text", head_bytes: int = HEAD_BYTES,
                       budget_bytes: int = HEADS_BUDGET_BYTES) -> list[str]:
    """:func:`decode_corpus_file` on the first ``head_bytes`` of each text / jsonl file, until ``budget_bytes``
    have been read (cheap, before Ray starts: a binary file shows in its first bytes; the rest of the corpus
    is checked while Ray Data reads it); the problems, one message per bad file."""
    bad = []
    for f in files:
        if _kind(f) == "parquet" or budget_bytes <= 0:
            continue
        with open(f, "rb") as fh:
            head = fh.read(head_bytes + 1)
        budget_bytes -= len(head)
        try:
            decode_corpus_file(f, head[:head_bytes], text_column=text_column, partial=len(head) > head_bytes)
        except CorpusError as exc:
            bad.append(str(exc))
    return bad


def corpus_error(exc: BaseException) -> CorpusError | None:
    """The :class:`CorpusError` behind ``exc``, if any: Ray Data reports a batch function's exception as a
    ``RayTaskError(UserCodeException)`` that holds only the remote traceback's text."""
    marker = f"{CorpusError.__module__}.{CorpusError.__qualname__}: "
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CorpusError):
            return CorpusError(*e.args)
        text = str(e)
        if marker in text:
            return CorpusError(text.split(marker, 1)[1].splitlines()[0])
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def load_tokenizer(tokenizer_dir):
    """The ``tokenizers.Tokenizer`` of ``tokenizer_dir/tokenizer.json``; ``ValueError`` naming
    ``data.tokenizer`` and the file when it is missing or not a tokenizer (not JSON, a foreign format)."""
    from tokenizers import Tokenizer

    f = Path(tokenizer_dir).expanduser() / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ValueError(f"data.tokenizer: {f} is not a tokenizers / transformers tokenizer file ({why})") from None


def tokenizer_vocab_size(tokenizer_dir) -> int:
    return load_tokenizer(tokenizer_dir).get_vocab_size()


def train_bpe(texts, vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save ``out_dir/tokenizer.json`` (atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    try:
        tok.save(str(tmp))
        os.replace(tmp, out_dir / "tokenizer.json")
    finally:  # a failed write (a full disk) leaves no partial file behind
        tmp.unlink(missing_ok=True)
    return out_dir


def _special_ids(tok, tokenizer_dir) -> tuple[int, int]:
    """(eos_id, pad_id) of a tokenizer; a tokenizer without ``<pad>`` pads with its EOS."""
    eos = tok.token_to_id(EOS)
    if eos is None:
        for cand in ("</s>", "<eos>", "[SEP]"):
            eos = tok.token_to_id(cand)
            if eos is not None:
                break
    if eos is None:
        raise ValueError(f"data.tokenizer: {tokenizer_dir} has no end-of-text token ({EOS}, </s> or <eos>)")
    pad = tok.token_to_id(PAD)
    return int(eos), int(eos if pad is None else pad)


def pack(ids: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Cut a token stream into ``(n, seq_len)`` blocks; the last partial block is filled with ``pad_id``."""
    n = -(-len(ids) // seq_len)
    out = np.full((n, seq_len), pad_id, dtype=np.int32)
    out.reshape(-1)[: len(ids)] = ids
    return out




def pack_documents(tok, docs: list[str], seq_len: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Tokenize ``docs`` (an EOS after each), concatenate and cut into ``(n, seq_len)`` blocks (:func:`pack`)."""
    ids: list[int] = []
    for enc in tok.encode_batch([str(t) for t in docs], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return pack(np.asarray(ids, dtype=np.int32), seq_len, pad_id)


def _files_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _corpus_errors():
    """A bad corpus file found while a Ray task reads it surfaces as its :class:`CorpusError` (a
    ``ConfigError``: rc 2 from the CLI), not as Ray's wrapper of a failed task."""
    try:
        yield
    except Exception as exc:
        err = corpus_error(exc)
        if err is None:
            raise
        raise err from None


# ----------------------------------------------------------------------------------------------------
# Data at scale: the corpus goes through Ray Data tasks in pieces and is written as sharded parquet files;
# no process ever holds all of it (issue 22).

PACK_DOCS = 32            # documents tokenized and packed together (their last block is padded)
PIECE_BYTES = 4 << 20     # a jsonl file is read in byte ranges of about this size (whole lines)
UNIT_BYTES = 16 << 20     # corpus bytes per task of the packing pass
SHARD_BYTES = 8 << 20     # bytes of tokens (int32) per train shard file
MATERIALIZE_MAX_TOKENS = 4_000_000  # data.materialize unset: workers hold the train split up to this size
LAYOUT = "parquet-1"      # the on-disk layout (part of the cache key)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Piece:
    """What one read covers: a whole text file (one document), the lines of a jsonl file that start in
    bytes ``[start, end)``, or row group ``start`` of a parquet file; ``size`` its bytes."""

    path: str
    start: int
    end: int
    size: int


def corpus_pieces(files: list[Path], text_column: str = "text", piece_bytes: int | None = None) -> list[Piece]:
    """The corpus ``files`` cut into :class:`Piece` s, in corpus order (jsonl ranges of ``PIECE_BYTES``)."""
    piece_bytes = int(piece_bytes or PIECE_BYTES)
    out: list[Piece] = []
    for f in files:
        kind, size = _kind(f), f.stat().st_size
        if kind == "text":
            out.append(Piece(str(f), 0, size, size))
        elif kind == "json":
            out += [Piece(str(f), a, min(size, a + piece_bytes), min(size, a + piece_bytes) - a)
                    for a in range(0, size, piece_bytes)]
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            cols = pf.schema_arrow.names
            if text_column not in cols:
                raise ValueError(f"data.text_column: {text_column!r} is not a column of {f} (columns: {cols})")
            md = pf.metadata
            out += [Piece(str(f), g, g + 1, md.row_group(g).total_byte_size) for g in range(md.num_row_groups)]
    return out


def plan_units(pieces: list[Piece], unit_bytes: int | None = None) -> list[list[Piece]]:
    """Consecutive pieces grouped into the tasks of the packing pass (about ``unit_bytes`` each). A corpus
    of one-document files is cut after a multiple of ``PACK_DOCS`` files, so documents are packed in the
    same groups of ``PACK_DOCS`` whatever the unit size."""
    unit_bytes = int(unit_bytes or UNIT_BYTES)
    one_doc = all(_kind(Path(p.path)) == "text" for p in pieces)
    units: list[list[Piece]] = []
    cur: list[Piece] = []
    size = 0
    for p in pieces:
        cur.append(p)
        size += p.size
        if size >= unit_bytes and (not one_doc or len(cur) % PACK_DOCS == 0):
            units.append(cur)
            cur, size = [], 0
    if cur:
        units.append(cur)
    return units


def piece_documents(piece: Piece, text_column: str = "text") -> list[str]:
    """The documents of one piece, checked by :func:`decode_corpus_file` (a :class:`CorpusError` names the
    file and line)."""
    path = piece.path
    kind = _kind(Path(path))
    if kind == "parquet":
        import pyarrow.parquet as pq

        col = pq.ParquetFile(path).read_row_group(piece.start, columns=[text_column]).column(0)
        return [str(t) for t in col.to_pylist()]
    with open(path, "rb") as fh:
        if kind == "text":
            return decode_corpus_file(path, fh.read(), text_column=text_column)
        pos = 0
        if piece.start > 0:  # the lines that start in [start, end): skip the one running into start
            fh.seek(piece.start - 1)
            fh.readline()
            pos = fh.tell()
        if pos >= piece.end:
            return []
        data = fh.read(piece.end - pos)
        if data and not data.endswith(b"\n"):
            data += fh.readline()
    try:
        return decode_corpus_file(path, data, text_column=text_column, offset=pos)
    except CorpusError:
        if pos == 0:
            raise
    # a bad line in a later range: the message with the line's number in the file
    return decode_corpus_file(path, data, text_column=text_column, offset=pos, first_line=_lines_before(path, pos) + 1)


def _lines_before(path: str, pos: int, chunk: int = 1 << 20) -> int:
    n = 0
    with open(path, "rb") as fh:
        while pos > 0:
            buf = fh.read(min(chunk, pos))
            if not buf:
                break
            n += buf.count(b"\n")
            pos -= len(buf)
    return n


def _documents(pieces, text_column: str, skip: bool, bad: list[str]):
    """The documents of ``pieces`` in order; with ``skip``, a piece of a bad file is left out and the file
    appended to ``bad`` (the caller then starts again without it)."""
    for p in pieces:
        try:
            docs = piece_documents(p, text_column)
        except CorpusError as exc:
            if not skip:
                raise
            import logging

            logging.getLogger("raydistill").warning("skipped (data.skip_bad_files): %s", exc)
            if p.path not in bad:
                bad.append(p.path)
            continue
        yield from docs


def sample_pieces(pieces: list[Piece], max_bytes: int, seed: int) -> list[Piece]:
    """The tokenizer's training sample: every piece when the corpus is at most ``max_bytes``, else pieces
    drawn at random (``seed``) until ``max_bytes``, in corpus order."""
    if sum(p.size for p in pieces) <= max_bytes:
        return list(pieces)
    chosen, size = [], 0
    for i in np.random.default_rng(seed).permutation(len(pieces)):
        chosen.append(int(i))
        size += pieces[i].size
        if size >= max_bytes:
            break
    return [pieces[i] for i in sorted(chosen)]


def _train_tokenizer_task(pieces: list[dict], text_column: str, skip: bool, vocab_size: int):
    """(tokenizer.json text, []) of a BPE trained on ``pieces``; (None, bad files) when some were skipped."""
    import tempfile

    bad: list[str] = []
    with tempfile.TemporaryDirectory(prefix="raydistill-bpe-") as d:
        train_bpe(_documents([Piece(**p) for p in pieces], text_column, skip, bad), vocab_size, Path(d))
        return (None if bad else (Path(d) / "tokenizer.json").read_text()), bad


def _pack_units(batch: dict, *, tokenizer_json: str, seq_len: int, text_column: str, skip: bool,
                out_dir: str) -> dict:
    """Ray Data batch function of the packing pass: each row is a unit (its index and pieces); its
    documents are tokenized and packed ``PACK_DOCS`` at a time and written to ``out_dir/unit-<i>.parquet``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    eos, pad = _special_ids(tok, "data.tokenizer")
    fs, base = filesystem(out_dir)
    units, rows, bads = [], [], []
    for unit, pieces in zip(batch["unit"], batch["pieces"]):
        bad: list[str] = []
        docs = _documents([Piece(**p) for p in json.loads(str(pieces))], text_column, skip, bad)
        blocks, group = [], []
        for doc in docs:
            group.append(doc)
            if len(group) == PACK_DOCS:
                blocks.append(pack_documents(tok, group, seq_len, eos, pad))
                group = []
        if group:
            blocks.append(pack_documents(tok, group, seq_len, eos, pad))
        arr = np.concatenate(blocks) if blocks else np.empty((0, seq_len), np.int32)
        if len(arr):
            write_blocks(fs, f"{base}/unit-{int(unit):06d}.parquet", arr)
        units.append(int(unit))
        rows.append(len(arr))
        bads.append(json.dumps(bad))
    return {"unit": np.array(units, np.int64), "rows": np.array(rows, np.int64), "bad": np.array(bads, dtype=object)}


def _assign_ranks(batch: dict, *, ranks, n_held: int, shard_rows: int, in_dir: str) -> dict:
    """Ray Data batch function: the blocks of each unit with their rank in the seeded permutation and the
    file they go to (-1 val, -2 test, else the train shard ``(rank - n_held) // shard_rows``)."""
    import ray

    inv = ray.get(ranks[0])
    fs, base = filesystem(in_dir)
    out_ids, out_rank = [], []
    for unit, offset in zip(batch["unit"], batch["offset"]):
        ids = read_blocks(fs, [f"{base}/unit-{int(unit):06d}.parquet"])
        out_ids.append(ids)
        out_rank.append(inv[int(offset): int(offset) + len(ids)])
    rank = np.concatenate(out_rank)
    dest = np.where(rank < n_held // 2, -1, np.where(rank < n_held, -2, (rank - n_held) // shard_rows))
    return {"dest": dest.astype(np.int64), "rank": rank.astype(np.int64), "input_ids": np.concatenate(out_ids)}


def _write_group(batch: dict, *, out_dir: str, pad_id: int) -> dict:
    """Ray Data ``map_groups`` function: one output file's blocks, written in rank order."""
    d = int(batch["dest"][0])
    order = np.argsort(batch["rank"], kind="stable")
    ids = np.asarray(batch["input_ids"])[order]
    fs, base = filesystem(out_dir)
    write_blocks(fs, f"{base}/{_split_file(d)}", ids)
    return {"dest": np.array([d]), "rows": np.array([len(ids)]), "tokens": np.array([int((ids != pad_id).sum())]),
            "first_rank": np.array([int(batch["rank"][order[0]])])}


def _split_file(dest: int) -> str:
    return "val.parquet" if dest == -1 else "test.parquet" if dest == -2 else f"train/part-{dest:06d}.parquet"


def filesystem(uri: str | os.PathLike):
    """(pyarrow filesystem, path in it) of a local path or a URI that pyarrow knows (``s3://``, ``gs://``,
    ``hdfs://``, ``file://``, ...)."""
    from pyarrow import fs as pafs

    s = str(uri)
    if "://" in s:
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve())


REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_cache_path(uri) -> None:
    """``data.cache_path`` before Ray starts: a local path (or ``file://``) must be a writable directory (a
    probe file is written and removed); a URI must name a filesystem pyarrow knows (``REMOTE_SCHEMES``;
    reaching it is left to the preparation, which may need credentials). A :class:`ConfigError` otherwise."""
    s = str(uri)
    scheme = s.split("://", 1)[0].lower() if "://" in s else "file"
    if scheme in REMOTE_SCHEMES:
        return
    if scheme not in ("file", "local"):
        raise ConfigError(f"data.cache_path: {s!r}: unknown filesystem {scheme!r}:// (a local path, file://, or "
                          f"one of {', '.join(x + '://' for x in REMOTE_SCHEMES)})")
    fs, base = filesystem(s)
    try:
        fs.create_dir(base, recursive=True)
        probe = f"{base}/.raydistill-write-probe-{os.getpid()}"
        _write_text(fs, probe, "probe")
        fs.delete_file(probe)
    except OSError as exc:
        raise ConfigError(f"data.cache_path: {s!r} is not a writable directory ({exc})") from None


def write_blocks(fs, path: str, blocks: np.ndarray) -> None:
    """Packed blocks ``(n, seq_len)`` as a parquet file with one tensor column ``input_ids`` (Ray Data's)."""
    import pyarrow.parquet as pq

    from raydistill.data.ray_data import arrays_to_table

    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(arrays_to_table(input_ids=np.ascontiguousarray(blocks, dtype=np.int32)), path, filesystem=fs)


def read_blocks(fs, paths: list[str], limit: int | None = None) -> np.ndarray:
    """The ``input_ids`` of parquet files written by :func:`write_blocks`, concatenated (the first ``limit``)."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers Ray's tensor extension type with pyarrow

    from raydistill.data.ray_data import table_to_arrays

    parts, n = [], 0
    for p in paths:
        if limit is not None and n >= limit:
            break
        parts.append(table_to_arrays(pq.read_table(p, filesystem=fs, columns=["input_ids"]))["input_ids"])
        n += len(parts[-1])
    return np.concatenate(parts)[:limit] if parts else np.empty((0, 0), np.int32)


@dataclass(frozen=True)
class CorpusInfo:
    """A prepared corpus: packed blocks of ``seq_len`` token ids in parquet files under ``root`` (a path or
    URI): the train split in shards ``train_files`` (blocks in a fixed seeded random order), ``val.parquet``
    and ``test.parquet``; the tokenizer (a local directory) and its special ids. ``materialize``: whether
    training workers hold the train split in memory (else they stream their shard)."""

    root: str
    train_files: tuple[str, ...]
    train_rows: tuple[int, ...]
    val_blocks: int
    test_blocks: int
    seq_len: int
    tokenizer_dir: str
    vocab_size: int
    eos_id: int
    pad_id: int
    num_tokens: int
    materialize: bool = True
    skipped_files: tuple[str, ...] = ()

    @property
    def train_blocks(self) -> int:
        return int(sum(self.train_rows))

    def info(self) -> dict:
        return {"tokenizer_dir": self.tokenizer_dir, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "train_blocks": self.train_blocks, "val_blocks": self.val_blocks,
                "test_blocks": self.test_blocks, "num_tokens": self.num_tokens}

    def _paths(self, names) -> tuple:
        fs, base = filesystem(self.root)
        return fs, [f"{base}/{n}" for n in names]

    @cached_property
    def val(self) -> np.ndarray:
        return read_blocks(*self._paths(["val.parquet"]))

    @cached_property
    def test(self) -> np.ndarray:
        return read_blocks(*self._paths(["test.parquet"]))

    @cached_property
    def train(self) -> np.ndarray:
        """The whole train split in memory (small corpora: the materialised path)."""
        return read_blocks(*self._paths(self.train_files))

    def head(self, n: int | None) -> np.ndarray:
        """The first ``n`` train blocks (a random sample of the corpus: the shards are in a random order);
        None: all of them."""
        return read_blocks(*self._paths(self.train_files), limit=None if n is None else int(n))

    def train_dataset(self):
        """The train split as a Ray dataset read from its shards (streamed: nothing is loaded here): one task
        per shard, so its blocks and their order do not depend on the cluster's size. The reads take no CPU
        (the tokens are packed already): they must not wait for the CPUs the training workers hold."""
        import ray.data

        items = [{"file": f} for f in self.train_files]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"root": self.root}, num_cpus=0)


def _read_shards(batch: dict, *, root: str) -> dict:
    fs, base = filesystem(root)
    return {"input_ids": read_blocks(fs, [f"{base}/{f}" for f in batch["file"]])}


def prepare_corpus(data, storage) -> CorpusInfo:
    """Tokenizer (given or trained) and packed, split blocks for ``data`` (a ``TextDataConfig``), written once
    under ``<root>/datasets/text-<hash>`` and ``<root>/tokenizers/<hash>`` and reused; ``root`` is
    ``data.cache_path`` (a path or a pyarrow URI) or ``storage``. Needs Ray: Ray
    tasks read, tokenize and pack the corpus; the driver holds file names, counts and the split's
    permutation (16 bytes a block), never the corpus."""
    files = corpus_files(data.path, data.max_bytes)
    skip = bool(getattr(data, "skip_bad_files", False))
    fh = _files_hash(files)
    sample = int(getattr(data, "tokenizer_sample_bytes", 0) or 0)
    total = sum(f.stat().st_size for f in files)
    if data.tokenizer:
        tok_key = "file:" + hashlib.sha256((Path(data.tokenizer).expanduser() / "tokenizer.json").read_bytes()
                                          ).hexdigest()[:12]
    else:
        tok_key = f"bpe:{data.vocab_size}" + (f":sample:{sample}" if sample and total > sample else "")
    key = hashlib.sha256(json.dumps([fh, tok_key, data.seq_len, data.val_fraction, data.seed, data.text_column,
                                     LAYOUT, *(["skip_bad_files"] if skip else [])]).encode()).hexdigest()[:12]
    root = str(getattr(data, "cache_path", None) or storage)
    fs, base = filesystem(root)
    ddir = f"{base}/datasets/text-{key}"
    with _lock(fs, ddir), _corpus_errors():
        manifest = _read_json(fs, f"{ddir}/{MANIFEST}")
        if manifest is None:
            manifest = _build_corpus(data, files, fs, base, ddir, skip, sample)
    tok_dir = _local_tokenizer(data, fs, base, manifest["tokenizer"])
    n_tok = int(manifest["train_tokens"])
    mat = getattr(data, "materialize", True)
    return CorpusInfo(root=f"{root.split('://', 1)[0]}://{ddir}" if "://" in root else ddir,
                      train_files=tuple(f for f, _ in manifest["train"]),
                      train_rows=tuple(int(n) for _, n in manifest["train"]), val_blocks=int(manifest["val_blocks"]),
                      test_blocks=int(manifest["test_blocks"]), seq_len=int(manifest["seq_len"]),
                      tokenizer_dir=str(tok_dir), vocab_size=int(manifest["vocab_size"]),
                      eos_id=int(manifest["eos_id"]), pad_id=int(manifest["pad_id"]), num_tokens=n_tok,
                      materialize=bool(mat) if mat is not None else
                      sum(n for _, n in manifest["train"]) * int(manifest["seq_len"]) <= MATERIALIZE_MAX_TOKENS,
                      skipped_files=tuple(manifest.get("skipped_files", ())))


prepare_text = prepare_corpus  # the former name


def _build_corpus(data, files: list[Path], fs, base: str, ddir: str, skip: bool, sample: int) -> dict:
    """Tokenizer, packing pass, split pass; the manifest (written last). A bad file found on the way with
    ``skip_bad_files`` starts it again without that file, so the result is the corpus without it."""
    import logging

    bad: list[str] = []
    while True:
        good = [f for f in files if str(f) not in bad]
        if not good:
            raise CorpusError("data.path: no file of the corpus can be read as text (data.skip_bad_files "
                              f"left out all {len(files)})")
        pieces = corpus_pieces(good, data.text_column)
        tok, tok_json, new_bad = _tokenizer(data, good, pieces, fs, base, skip, sample)
        if not new_bad:
            fs.delete_dir_contents(ddir, missing_dir_ok=True)  # what a failed attempt left
            rows, new_bad = _pack_pass(plan_units(pieces), tok_json, data, f"{ddir}/packed", skip)
        if not new_bad:
            break
        bad += [b for b in new_bad if b not in bad]
        logging.getLogger("raydistill").warning("data.skip_bad_files: %d file(s) left out, preparing the corpus "
                                                "again without them", len(bad))
    from tokenizers import Tokenizer

    eos, pad = _special_ids(Tokenizer.from_str(tok_json), data.tokenizer or "data.tokenizer")
    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    split = _split_pass(rows, data, ddir, pad)
    fs.delete_dir(f"{ddir}/packed")
    manifest = {"layout": LAYOUT, "seq_len": int(data.seq_len), "tokenizer": tok, "vocab_size": int(vocab),
                "eos_id": eos, "pad_id": pad, "skipped_files": bad, "files": len(good), **split}
    _write_json(fs, f"{ddir}/{MANIFEST}", manifest)
    return manifest


def _tokenizer(data, good: list[Path], pieces: list[Piece], fs, base: str, skip: bool, sample: int):
    """(the tokenizer's id in the manifest, its JSON text, bad files found): ``data.tokenizer``, or a BPE
    cached under ``<root>/tokenizers/<hash>`` or trained now, in a Ray task, on :func:`sample_pieces`."""
    import ray

    if data.tokenizer:
        tok_dir = Path(data.tokenizer).expanduser().resolve()
        return str(tok_dir), (tok_dir / "tokenizer.json").read_text(), []
    total = sum(p.size for p in pieces)
    binding = sample and total > sample
    tok_hash = hashlib.sha256((f"bpe:{data.vocab_size}:{_files_hash(good)}" +
                               (f":sample:{sample}:{data.seed}" if binding else "")).encode()).hexdigest()[:12]
    path = f"{base}/tokenizers/{tok_hash}/tokenizer.json"
    if fs.get_file_info(path).type.name == "File":
        with fs.open_input_stream(path) as fh:
            return tok_hash, fh.read().decode(), []
    chosen = sample_pieces(pieces, sample, data.seed) if binding else pieces
    # scheduling_strategy "DEFAULT": never inside the caller's placement group (a Tune trial's holds a
    # fraction of a CPU, and Ray would place a captured child task there: "cannot fit into any bundles")
    task = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="DEFAULT")(_train_tokenizer_task)
    text, bad = ray.get(task.remote([p.__dict__ for p in chosen], data.text_column, skip, data.vocab_size))
    if text is None:
        return tok_hash, None, bad
    _write_text(fs, path, text)
    return tok_hash, text, []


def _pack_pass(units: list[list[Piece]], tok_json: str, data, out_dir: str, skip: bool) -> tuple[list[int], list]:
    """Ray Data: every unit read, checked, tokenized, packed and written; (blocks per unit, bad files)."""
    import ray.data

    items = [{"unit": i, "pieces": json.dumps([p.__dict__ for p in u])} for i, u in enumerate(units)]
    out = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _pack_units, batch_size=1, batch_format="numpy",
        fn_kwargs={"tokenizer_json": tok_json, "seq_len": int(data.seq_len), "text_column": data.text_column,
                   "skip": skip, "out_dir": out_dir}).take_all()
    rows = [0] * len(units)
    bad: list[str] = []
    for r in out:
        rows[int(r["unit"])] = int(r["rows"])
        bad += [b for b in json.loads(str(r["bad"])) if b not in bad]
    if len(out) != len(units):
        raise RuntimeError(f"the packing pass returned {len(out)} of {len(units)} units")
    return rows, bad


def _split_pass(rows: list[int], data, ddir: str, pad_id: int) -> dict:
    """The split: block ``i`` of the packed stream (units in order) has rank ``inv[i]`` in the permutation
    ``default_rng(data.seed).permutation(N)``; ranks below ``n_held // 2`` are val, below ``n_held`` test,
    the rest train, each file in rank order -- the blocks and order of the in-memory split this replaces.
    Ray Data groups the blocks by output file (a shuffle) and writes each file."""
    import ray
    import ray.data

    n = int(sum(rows))
    n_held = max(2, int(round(n * data.val_fraction)))
    if n - n_held < 2:
        raise ValueError(f"data.path: the corpus gives only {n} blocks of data.seq_len={data.seq_len} tokens; "
                         "use a larger corpus or a smaller seq_len")
    inv = np.empty(n, np.int64)
    inv[np.random.default_rng(data.seed).permutation(n)] = np.arange(n)
    ranks = ray.put(inv)
    del inv
    shard_rows = max(1, SHARD_BYTES // (4 * int(data.seq_len)))
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    items = [{"unit": u, "offset": int(offsets[u])} for u in range(len(rows)) if rows[u]]
    out = (ray.data.from_items(items, override_num_blocks=len(items))
           .map_batches(_assign_ranks, batch_size=1, batch_format="numpy",
                        fn_kwargs={"ranks": [ranks], "n_held": n_held, "shard_rows": shard_rows,
                                   "in_dir": f"{ddir}/packed"})
           .groupby("dest").map_groups(_write_group, batch_format="numpy",
                                       fn_kwargs={"out_dir": ddir, "pad_id": pad_id})
           .take_all())
    del ranks
    got = {int(r["dest"]): r for r in out}
    n_train = n - n_held
    shards = -(-n_train // shard_rows)
    want = {-1: (n_held // 2, 0), -2: (n_held - n_held // 2, n_held // 2)}
    want.update({j: (min(shard_rows, n_train - j * shard_rows), n_held + j * shard_rows) for j in range(shards)})
    for d, (cnt, first) in want.items():
        r = got.get(d)
        if r is None or int(r["rows"]) != cnt or int(r["first_rank"]) != first:
            raise RuntimeError(f"the split pass wrote {_split_file(d)} wrongly ({r}; want {cnt} rows from rank {first})")
    return {"train": [[_split_file(j), int(got[j]["rows"])] for j in range(shards)],
            "train_tokens": int(sum(int(got[j]["tokens"]) for j in range(shards))),
            "val_blocks": int(got[-1]["rows"]), "test_blocks": int(got[-2]["rows"])}


def _local_tokenizer(data, fs, base: str, tok: str) -> Path:
    """A local directory with the corpus's ``tokenizer.json`` (the driver's models and export read it)."""
    if data.tokenizer:
        return Path(data.tokenizer).expanduser().resolve()
    path = f"{base}/tokenizers/{tok}"
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    import tempfile

    local = Path(tempfile.gettempdir()) / "raydistill-tokenizers" / tok
    if not (local / "tokenizer.json").is_file():
        with fs.open_input_stream(f"{path}/tokenizer.json") as fh:
            text = fh.read().decode()
        local.mkdir(parents=True, exist_ok=True)
        _write_text(filesystem(local)[0], str(local / "tokenizer.json"), text)
    return local


def _read_json(fs, path: str) -> dict | None:
    if fs.get_file_info(path).type.name != "File":
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def _write_json(fs, path: str, obj: dict) -> None:
    _write_text(fs, path, json.dumps(obj, indent=1))


def _write_text(fs, path: str, text: str) -> None:
    """Write ``path`` through a temporary name and a move, so a reader never sees a partial file (a failed
    write, a full disk, leaves none behind)."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(text.encode())
        fs.move(tmp, path)
    finally:
        if fs.get_file_info(tmp).type.name == "File":
            fs.delete_file(tmp)


@contextlib.contextmanager
def _lock(fs, ddir: str):
    """One preparer at a time per corpus directory on a local filesystem (a file lock beside it); on another
    filesystem, prepare a corpus once before starting jobs that share it."""
    from pyarrow import fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    from filelock import FileLock

    Path(ddir).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(ddir + ".lock"):
        yield
