"""Text corpora for causal-LM distillation: read with Ray Data, tokenized, packed into fixed-length blocks.

* **Corpus**: ``data.path`` is a ``.txt``/``.py``/``.md`` (one document per file), ``.jsonl``/``.json``
  (one document per line, ``data.text_column``) or ``.parquet`` file (``data.text_column``), or a folder
  of them (searched recursively). ``data.path: null`` is the default corpus: the Python standard
  library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``), present on every machine without
  a download -- the default job is a small *code* LM. Files are taken in sorted order until
  ``data.max_bytes``.
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


def read_corpus(files: list[Path], text_column: str = "text"):
    """A Ray dataset with one document per row in column ``text``."""
    import ray.data

    kind = _kind(files[0])
    paths = [str(f) for f in files]
    if kind == "text":
        ds = ray.data.read_binary_files(paths)
        return ds.map_batches(_decode, batch_format="numpy")
    ds = ray.data.read_json(paths, lines=True) if kind == "json" else ray.data.read_parquet(paths)
    cols = ds.columns()
    if text_column not in cols:
        raise ValueError(f"data.text_column: {text_column!r} is not a column of {files[0]} (columns: {cols})")
    return ds.select_columns([text_column]).rename_columns({text_column: "text"})


def _decode(batch: dict) -> dict:
    return {"text": np.array([bytes(b).decode("utf-8", errors="replace") for b in batch["bytes"]], dtype=object)}


def tokenizer_vocab_size(tokenizer_dir) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir).expanduser() / "tokenizer.json")).get_vocab_size()


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
    tok.save(str(tmp))
    os.replace(tmp, out_dir / "tokenizer.json")
    return out_dir


def special_ids(tokenizer_dir) -> tuple[int, int]:
    """(eos_id, pad_id) of a tokenizer; a tokenizer without ``<pad>`` pads with its EOS."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
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
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
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
    key = hashlib.sha256(json.dumps([fh, tok_hash, data.seq_len, data.val_fraction, data.seed,
                                     data.text_column]).encode()).hexdigest()[:12]
    cache = storage / "datasets" / f"text-{key}.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"), _ordered():
        ds = None
        if not (tok_dir / "tokenizer.json").is_file():
            ds = read_corpus(files, data.text_column).materialize()
            texts = (str(t) for b in ds.iter_batches(batch_size=64, batch_format="numpy") for t in b["text"])
            train_bpe(texts, data.vocab_size, tok_dir)
        if not cache.is_file():
            ds = ds if ds is not None else read_corpus(files, data.text_column)
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
            np.savez(tmp, train=arr[n_held:], val=arr[: n_held // 2], test=arr[n_held // 2: n_held])
            os.replace(tmp, cache)
    z = np.load(cache)
    eos, pad = special_ids(tok_dir)
    train = z["train"]
    return TextData(train=train, val=z["val"], test=z["test"], tokenizer_dir=str(tok_dir),
                    vocab_size=tokenizer_vocab_size(tok_dir), eos_id=eos, pad_id=pad,
                    num_tokens=int((train != pad).sum()))
