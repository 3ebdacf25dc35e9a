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
  ``data.vocab_size`` trained on the corpus with ``tokenizers`` and saved with the run
  (``<storage>/tokenizers/<hash>/tokenizer.json``); special tokens ``<|endoftext|>`` (ends every
  document) and ``<pad>``.
* **Packing**: each Ray Data batch of documents is tokenized, concatenated (EOS between documents) and cut
  into blocks of ``data.seq_len`` tokens; the last partial block is filled with ``<pad>``, whose
  positions are ``ignore_index`` in the loss. Blocks are shuffled (``data.seed``) and split into train /
  val / test; the result is cached under ``<storage>/datasets/text-<hash>.npz``.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydistill.config import ConfigError

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


def decode_corpus_file(path, data: bytes, *, text_column: str = "text", partial: bool = False) -> list[str]:
    """The documents in one text or jsonl corpus file, given its bytes: the whole file (``.txt``, ``.py``,
    ...) or one per line (``.jsonl`` / ``.json``: the ``text_column`` string of each JSON object; blank lines
    are skipped). Raises :class:`CorpusError` naming the file and line when the bytes are not UTF-8 text
    (binary, other encodings, NUL bytes) or a jsonl line is not such an object. ``partial``: ``data`` is
    only the head of the file, so a character or line cut at its end is not an error."""
    path = str(path)
    mv = memoryview(data)
    try:
        text = str(mv, "utf-8")
    except UnicodeDecodeError as exc:
        if partial and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            text = str(mv[: exc.start], "utf-8")
        else:
            line = data.count(b"\n", 0, exc.start) + 1
            raise CorpusError(f"data.path: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, "
                              f"offset {exc.start}): binary files and other encodings are refused; "
                              f"{SKIP_HINT}") from None
    nul = text.find("\0")
    if nul >= 0:
        raise CorpusError(f"data.path: {path} is binary (a NUL byte at line {text.count(chr(10), 0, nul) + 1}); "
                          f"{SKIP_HINT}")
    if Path(path).suffix not in JSON_SUFFIXES:
        return [text]
    lines = text.split("\n")
    if partial and not text.endswith("\n"):
        lines = lines[:-1]
    docs = []
    for no, line in enumerate(lines, 1):
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


def read_corpus(files: list[Path], text_column: str = "text", *, skip_bad_files: bool = False):
    """A Ray dataset with one document per row in column ``text``; each text / jsonl file is checked while it
    is read (:class:`_DecodeFiles`)."""
    import ray.data

    kind = _kind(files[0])
    paths = [str(f) for f in files]
    if kind in ("text", "json"):
        ds = ray.data.read_binary_files(paths, include_paths=True)
        return ds.map_batches(_DecodeFiles(text_column, skip_bad_files), batch_format="numpy")
    ds = ray.data.read_parquet(paths)
    cols = ds.columns()
    if text_column not in cols:
        raise ValueError(f"data.text_column: {text_column!r} is not a column of {files[0]} (columns: {cols})")
    return ds.select_columns([text_column]).rename_columns({text_column: "text"})


class _DecodeFiles:
    """Ray Data batch function: rows of (``path``, ``bytes``) -> documents; a bad file raises its
    :class:`CorpusError` (or is left out, logged in the worker's log, with ``skip_bad_files``)."""

    def __init__(self, text_column: str, skip_bad_files: bool):
        self.text_column, self.skip = text_column, skip_bad_files

    def __call__(self, batch: dict) -> dict:
        docs: list[str] = []
        for path, data in zip(batch["path"], batch["bytes"]):
            try:
                docs.extend(decode_corpus_file(path, bytes(data), text_column=self.text_column))
            except CorpusError as exc:
                if not self.skip:
                    raise
                import logging

                logging.getLogger("raydistill").warning("skipped (data.skip_bad_files): %s", exc)
        return {"text": np.array(docs, dtype=object)}


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


def special_ids(tokenizer_dir) -> tuple[int, int]:
    """(eos_id, pad_id) of a tokenizer; a tokenizer without ``<pad>`` pads with its EOS."""
    tok = load_tokenizer(tokenizer_dir)
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


class TokenizePack:
    """Ray Data callable class: documents -> packed ``input_ids`` blocks (one tokenizer per actor)."""

    def __init__(self, tokenizer_dir: str, seq_len: int):
        self.tok = load_tokenizer(tokenizer_dir)
        self.eos, self.pad = special_ids(tokenizer_dir)
        self.seq_len = int(seq_len)

    def __call__(self, batch: dict) -> dict:
        ids: list[int] = []
        for enc in self.tok.encode_batch([str(t) for t in batch["text"]], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(self.eos)
        return {"input_ids": pack(np.asarray(ids, dtype=np.int32), self.seq_len, self.pad)}


def pack(ids: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Cut a token stream into ``(n, seq_len)`` blocks; the last partial block is filled with ``pad_id``."""
    n = -(-len(ids) // seq_len)
    out = np.full((n, seq_len), pad_id, dtype=np.int32)
    out.reshape(-1)[: len(ids)] = ids
    return out


@dataclass(frozen=True)
class TextData:
    """Packed blocks (int32 ``(n, seq_len)``) and the tokenizer they were made with."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    tokenizer_dir: str
    vocab_size: int
    eos_id: int
    pad_id: int
    num_tokens: int

    def info(self) -> dict:
        return {"tokenizer_dir": self.tokenizer_dir, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "train_blocks": len(self.train), "val_blocks": len(self.val),
                "test_blocks": len(self.test), "num_tokens": self.num_tokens}


def _files_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _ordered():
    """Ray Data keeps the documents in file order while this is open (``preserve_order``): otherwise read
    and map tasks finish in any order, the BPE merges' ties and the packed blocks differ from run to run,
    and so do the train / val / test splits of two storage paths (only ~15% of blocks matched)."""
    import ray.data

    opts = ray.data.DataContext.get_current().execution_options
    old = opts.preserve_order
    opts.preserve_order = True
    try:
        yield
    finally:
        opts.preserve_order = old


@contextlib.contextmanager
def _corpus_errors():
    """A bad corpus file found while Ray Data reads it surfaces as its :class:`CorpusError` (a
    ``ConfigError``: rc 2 from the CLI), not as Ray's wrapper of a failed task."""
    try:
        yield
    except Exception as exc:
        err = corpus_error(exc)
        if err is None:
            raise
        raise err from None


def prepare_text(data, storage: Path) -> TextData:
    """Tokenizer (given or trained) + packed, split blocks for ``data`` (a ``TextDataConfig``), cached under
    ``storage``. Needs Ray (Ray Data reads and tokenizes the corpus)."""
    from filelock import FileLock

    files = corpus_files(data.path, data.max_bytes)
    fh = _files_hash(files)
    if data.tokenizer:
        tok_dir = Path(data.tokenizer).expanduser().resolve()
        tok_hash = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:12]
    else:
        tok_hash = hashlib.sha256(f"bpe:{data.vocab_size}:{fh}".encode()).hexdigest()[:12]
        tok_dir = storage / "tokenizers" / tok_hash
    skip = bool(getattr(data, "skip_bad_files", False))
    key = hashlib.sha256(json.dumps([fh, tok_hash, data.seq_len, data.val_fraction, data.seed,
                                     data.text_column, *(["skip_bad_files"] if skip else [])]).encode()
                         ).hexdigest()[:12]
    cache = storage / "datasets" / f"text-{key}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"), _ordered(), _corpus_errors():
        ds = None
        if not (tok_dir / "tokenizer.json").is_file():
            ds = read_corpus(files, data.text_column, skip_bad_files=skip).materialize()
            texts = (str(t) for b in ds.iter_batches(batch_size=64, batch_format="numpy") for t in b["text"])
            train_bpe(texts, data.vocab_size, tok_dir)
        if not cache.is_file():
            ds = ds if ds is not None else read_corpus(files, data.text_column, skip_bad_files=skip)
            blocks = ds.map_batches(TokenizePack, fn_constructor_kwargs={"tokenizer_dir": str(tok_dir),
                                                                         "seq_len": data.seq_len},
                                    batch_size=32, batch_format="numpy", concurrency=1)
            arr = np.concatenate([b["input_ids"] for b in blocks.iter_batches(batch_size=None,
                                                                              batch_format="numpy")])
            order = np.random.default_rng(data.seed).permutation(len(arr))
            arr = arr[order]
            n_held = max(2, int(round(len(arr) * data.val_fraction)))
            if len(arr) - n_held < 2:
                raise ValueError(f"data.path: the corpus gives only {len(arr)} blocks of data.seq_len="
                                 f"{data.seq_len} tokens; use a larger corpus or a smaller seq_len")
            tmp = cache.with_suffix(".tmp.npz")
            try:
                np.savez(tmp, train=arr[n_held:], val=arr[: n_held // 2], test=arr[n_held // 2: n_held])
                os.replace(tmp, cache)
            finally:  # a failed write (a full disk) leaves no partial file behind
                tmp.unlink(missing_ok=True)
    z = np.load(cache)
    eos, pad = special_ids(tok_dir)
    train = z["train"]
    return TextData(train=train, val=z["val"], test=z["test"], tokenizer_dir=str(tok_dir),
                    vocab_size=tokenizer_vocab_size(tok_dir), eos_id=eos, pad_id=pad,
                    num_tokens=int((train != pad).sum()))
