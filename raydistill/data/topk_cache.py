"""The on-disk format of offline teacher outputs (``raydistill teacher-logits``): a directory of parquet
shards, each self-describing, and the readers that decode them in the data loader.

Layout::

    <dir>/part-<start>-<stop>.parquet    rows [start, stop) of the teacher's input, in input order
    <dir>/teacher_logits.json            the run's report (bytes per token, tokens/s, fidelity, shards)

One parquet row per input row (a packed block of ``tokens_per_row`` tokens for a causal LM, one example for
classification) with the input columns (``input_ids`` int32 ``(S,)``; or ``x``, ``y``) and the codec's
columns: ``raw`` stores ``topk_values`` float32, ``topk_indices`` int32 (``(S, k)`` / ``(k,)``) and
``topk_tail`` float32; ``q8`` stores one binary value per row and field, ``topk_indices_q8``,
``topk_values_q8``, ``topk_tail_q8`` (``raydistill.data.topk_codec``); ``cm`` stores the shard's whole stream
in the first row of ``topk_cm`` (the other rows empty): its context model runs over the shard's tokens in
order, so a ``cm`` shard is decoded whole (:func:`read_dataset` reads one shard per Ray Data task). The file's
key-value metadata ``raydistill.topk_cache`` is a JSON object::

    {"format": "raydistill.topk_cache", "version": 1, "codec": {name, value_levels, gamma, ...},
     "k", "vocab_size", "task", "tokens_per_row", "rows", "start", "stop", "input_columns",
     "teacher_hash", "tokenizer_hash", "tail_temperature" (null: no tail)}

Decoded batches (:func:`decode_batch`, run on each shard by :func:`read_dataset`'s Ray Data tasks) always have
``topk_values`` float32 (log-probabilities at temperature 1, ``(..., k)``), ``topk_indices`` int64 (ascending
per token) and, when the cache has a tail and it is asked for, ``topk_tail`` float32 (log of the mass
outside the top-k at the cache's ``tail_temperature``). A directory written before this format (no
metadata: raw top-k logits and int64 ids) is read as it is, as format version 0.

Every error names the file and what is wrong (:class:`CacheError`, a ``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from raydistill.data.ray_data import table_to_arrays
from raydistill.data.topk_codec import CodecError, CodecSpec, decode, decode_cm

FORMAT = "raydistill.topk_cache"
VERSION = 1
META_KEY = b"raydistill.topk_cache"
REPORT_FILE = "teacher_logits.json"
SHARD_RE = re.compile(r"^part-(\d{10})-(\d{10})\.parquet$")
Q8_FIELDS = ("indices", "values", "tail")
CM_COLUMN = "topk_cm"


class CacheError(ValueError):
    """A teacher-output cache that cannot be used: the message names the file (or key) and the problem."""


def shard_name(start: int, stop: int) -> str:
    return f"part-{start:010d}-{stop:010d}.parquet"


def shard_plan(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_rows)`` in shards of ``shard_rows`` rows."""
    return [(a, min(n_rows, a + shard_rows)) for a in range(0, n_rows, shard_rows)]


def tokenizer_hash(tokenizer_dir) -> str:
    """Identity of a tokenizer: sha256 of its ``tokenizer.json`` (first 16 hex digits)."""
    return hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


@dataclass
class CacheMeta:
    """What a shard says about itself (the ``raydistill.topk_cache`` metadata)."""

    codec: dict
    k: int
    vocab_size: int
    task: str
    tokens_per_row: int
    rows: int
    start: int
    stop: int
    input_columns: list[str] = field(default_factory=list)
    teacher_hash: str | None = None
    tokenizer_hash: str | None = None
    tail_temperature: float | None = None
    version: int = VERSION
    format: str = FORMAT

    @property
    def spec(self) -> CodecSpec:
        return CodecSpec.from_dict(self.codec)

    @property
    def has_tail(self) -> bool:
        return self.tail_temperature is not None

    def identity(self) -> dict:
        """The fields every shard of one cache shares."""
        d = asdict(self)
        for key in ("rows", "start", "stop"):
            d.pop(key)
        return d

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


# --------------------------------------------------------------------------------------------------
# writing

def _tensor_column(arr: np.ndarray):
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    arr = np.ascontiguousarray(arr)
    return ArrowTensorArray.from_numpy(arr) if arr.ndim > 1 else pa.array(arr)


def _row_binary(b: np.ndarray, per_token: np.ndarray, rows: int):
    """One binary value per row from a byte stream of all tokens (row-major) and each token's byte count."""
    import pyarrow as pa

    per_row = per_token.reshape(rows, -1).sum(1)
    offsets = np.r_[0, np.cumsum(per_row)].astype(np.int64)
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), rows, [None, pa.py_buffer(offsets),
                                                                      pa.py_buffer(np.ascontiguousarray(b))])


def _context_ids(inputs: dict, n_tok: int) -> np.ndarray:
    """The input id of each token (cm's context): ``input_ids`` when the rows have them, else zeros."""
    if "input_ids" in inputs:
        x = np.asarray(inputs["input_ids"]).reshape(-1)
        if len(x) == n_tok:
            return x.astype(np.int64)
    return np.zeros(n_tok, np.int64)


def shard_table(meta: CacheMeta, inputs: dict[str, np.ndarray], values: np.ndarray, indices: np.ndarray,
                tail: np.ndarray | None):
    """The parquet table of one shard: ``inputs`` (row columns) and the top-k outputs ``(rows, [S,] k)``
    (``tail``: ``(rows, [S])`` or None) encoded with the (resolved) ``meta.codec``."""
    import pyarrow as pa

    from raydistill.data.topk_codec import encode

    spec = meta.spec
    rows, k = len(values), meta.k
    cols = {name: _tensor_column(arr) for name, arr in inputs.items()}
    if spec.name == "raw":  # (entries sorted by id, as q8 decodes them)
        order = np.argsort(indices, axis=-1, kind="stable")
        cols["topk_values"] = _tensor_column(np.take_along_axis(values, order, -1).astype(np.float32))
        cols["topk_indices"] = _tensor_column(np.take_along_axis(indices, order, -1).astype(np.int32))
        if tail is not None:
            cols["topk_tail"] = _tensor_column(tail.astype(np.float32))
    elif spec.name == "cm":
        import pyarrow as pa

        from raydistill.data.topk_codec import encode_cm

        n_tok = values.reshape(-1, k).shape[0]
        x = _context_ids(inputs, n_tok)
        stream = encode_cm(values.reshape(-1, k), indices.reshape(-1, k), None if tail is None else tail.reshape(-1),
                           x, meta.vocab_size, spec)
        cols[CM_COLUMN] = pa.array([stream.tobytes()] + [b""] * (rows - 1), pa.large_binary())
    else:
        enc = encode(values.reshape(-1, k), indices.reshape(-1, k), None if tail is None else tail.reshape(-1),
                     meta.vocab_size, spec)
        for name, (b, per_token) in enc.items():
            cols[f"topk_{name}_q8"] = _row_binary(b, per_token, rows)
    table = pa.table(cols)
    return table.replace_schema_metadata({META_KEY: meta.to_json()})


def write_shard(path: Path, table, *, compression: str = "zstd", compression_level: int | None = 9) -> int:
    """Write ``table`` to ``path`` atomically (a temporary name in the same directory, then a rename), with
    page checksums; returns the file's size in bytes."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression=compression, compression_level=compression_level,
                   use_dictionary=False, write_page_checksum=True, write_statistics=False)
    os.replace(tmp, path)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------------
# reading

def read_meta(path) -> CacheMeta | None:
    """The metadata of one shard (None for a file of the pre-metadata format); :class:`CacheError` naming the
    file when it is no readable parquet (truncated, corrupted) or its metadata is malformed or of an unknown
    version / codec."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        md = pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged footer
        raise CacheError(f"{path}: not a readable parquet file (truncated or corrupted?): {exc}") from None
    raw = (md.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        raise CacheError(f"{path}: metadata key {META_KEY.decode()!r} is not valid JSON") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CacheError(f"{path}: metadata key {META_KEY.decode()!r} is not a {FORMAT} header")
    version = d.get("version")
    if version != VERSION:
        raise CacheError(f"{path}: {FORMAT} version {version!r} is not supported by this raydistill (it reads "
                         f"version {VERSION} and the unversioned format before it); rewrite the cache with "
                         "`raydistill teacher-logits` or upgrade raydistill")
    try:
        meta = CacheMeta(**d)
        spec = meta.spec
    except (TypeError, ValueError) as exc:
        raise CacheError(f"{path}: bad {META_KEY.decode()!r} metadata: {exc}") from None
    if spec.name == "auto" or spec.codec_version is None or (spec.name in ("q8", "cm") and (
            spec.value_levels is None or spec.index_coding == "auto")):
        raise CacheError(f"{path}: codec parameters not resolved: {meta.codec}")
    if md.num_rows != meta.rows:
        raise CacheError(f"{path}: holds {md.num_rows} rows, its metadata says {meta.rows}")
    return meta


def shard_files(path) -> list[Path]:
    """The parquet files of a cache directory (or the file itself), sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*.parquet") if f.is_file() and not f.name.startswith("."))


def _binary_column_bytes(col) -> np.ndarray:
    """All values of a binary column (a numpy object array of bytes, or an Arrow (large) binary array) as one
    uint8 array."""
    if isinstance(col, np.ndarray):
        return np.frombuffer(b"".join(bytes(c) for c in col), np.uint8)
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = col.cast(pa.large_binary())
    _, offsets, data = col.buffers()
    off = np.frombuffer(offsets, np.int64)[col.offset:col.offset + len(col) + 1]
    return np.frombuffer(data, np.uint8)[off[0]:off[-1]] if len(col) else np.zeros(0, np.uint8)


def decode_batch(batch: dict, meta: CacheMeta | dict | None, *, tail: bool = True, source: str = "") -> dict:
    """A batch of cache rows (numpy columns, e.g. from Ray Data) -> the input columns plus ``topk_values``,
    ``topk_indices`` and (``tail`` and the cache has one) ``topk_tail``. ``meta`` None: the pre-metadata format
    (passed through). Damaged payloads raise :class:`CacheError` naming ``source`` (or the batch's ``path``)."""
    if meta is None:
        return {k: v for k, v in batch.items() if k != "path"}
    if isinstance(meta, dict):
        meta = CacheMeta(**meta)
    src = source or (str(batch["path"][0]) if "path" in batch and len(batch["path"]) else "teacher outputs")
    out = {c: np.asarray(batch[c]) for c in meta.input_columns}
    if "input_ids" in out:
        out["input_ids"] = out["input_ids"].astype(np.int64)
    spec = meta.spec
    lead = len(next(iter(batch.values())))
    shape = (lead, meta.tokens_per_row) if meta.task == "causal_lm" else (lead,)
    k = meta.k
    if spec.name == "raw":
        out["topk_values"] = np.asarray(batch["topk_values"], np.float32).reshape(*shape, k)
        out["topk_indices"] = np.asarray(batch["topk_indices"]).astype(np.int64).reshape(*shape, k)
        if tail and meta.has_tail:
            out["topk_tail"] = np.asarray(batch["topk_tail"], np.float32).reshape(shape)
        return out
    if spec.name == "cm":
        return _decode_cm_batch(batch, meta, out, shape, tail, src)
    payload = {f: _binary_column_bytes(batch[f"topk_{f}_q8"]) for f in Q8_FIELDS
               if f"topk_{f}_q8" in batch and (f != "tail" or tail)}
    n = int(np.prod(shape))
    try:
        vals, idx, tl = decode(payload, n, k, meta.vocab_size, spec)
    except CodecError as exc:
        raise CacheError(f"{src}: corrupted top-k payload: {exc}") from None
    out["topk_values"] = vals.reshape(*shape, k)
    out["topk_indices"] = idx.reshape(*shape, k)
    if tl is not None:
        out["topk_tail"] = tl.reshape(shape)
    return out


def _decode_cm_batch(batch: dict, meta: CacheMeta, out: dict, shape: tuple, tail: bool, src: str) -> dict:
    import pyarrow as pa

    col = batch[CM_COLUMN]
    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        lengths = np.asarray(pa.compute.binary_length(col))
        first = col[0].as_py() if len(col) else b""
    else:
        lengths = np.array([len(c) for c in col])
        first = bytes(col[0]) if len(col) else b""
    if len(lengths) and (lengths[0] == 0 or lengths[1:].any()):
        raise CacheError(f"{src}: a 'cm' shard is decoded whole, from its first row (this batch has "
                         f"{len(lengths)} of its rows, the stream in row {int(np.argmax(lengths > 0))})")
    n, k = int(np.prod(shape)), meta.k
    x = _context_ids(out, n)
    try:
        vals, idx, tl = decode_cm(np.frombuffer(first, np.uint8), n, k, meta.has_tail, x, meta.vocab_size, meta.spec)
    except CodecError as exc:
        raise CacheError(f"{src}: corrupted top-k payload: {exc}") from None
    out["topk_values"] = vals.reshape(*shape, k)
    out["topk_indices"] = idx.reshape(*shape, k)
    if tail and tl is not None:
        out["topk_tail"] = tl.reshape(shape)
    return out


def read_shard(path, *, tail: bool = True) -> dict[str, np.ndarray]:
    """One shard, decoded (numpy columns)."""
    import pyarrow.parquet as pq

    meta = read_meta(path)
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as exc:  # noqa: BLE001
        raise CacheError(f"{path}: cannot read its pages (corrupted?): {exc}") from None

    packed = [c for c in table.column_names if c.endswith("_q8") or c == CM_COLUMN]
    arrays = table_to_arrays(table.drop_columns(packed))
    arrays.update({c: table.column(c) for c in packed})
    return decode_batch(arrays, meta, tail=tail, source=str(path))


def read_shards(paths, *, tail: bool = True, threads: int = 2) -> dict[str, np.ndarray]:
    """Several shards of one cache read and decoded in this process into one set of numpy columns, rows in the
    order of ``paths``. Up to ``threads`` shards are read at once, each whole in a thread of its own: pyarrow's
    reader, the compiled ``cm`` decoder and numpy's copies run without the GIL, so on a machine with cores to
    spare the shards decode side by side (the result is the same as reading them one after another). The
    first shard's error is raised (a :class:`CacheError` naming its file)."""
    paths = list(paths)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not paths:
        raise ValueError("paths: no shard to read")
    if threads == 1 or len(paths) == 1:
        parts = [read_shard(p, tail=tail) for p in paths]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(paths)), thread_name_prefix="topk-read") as pool:
            parts = list(pool.map(lambda p: read_shard(p, tail=tail), paths))
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


@dataclass
class CacheInfo:
    """A checked cache directory: its shards, their common metadata (None: the pre-metadata format) and
    the number of input rows."""

    path: Path
    files: list[Path]
    meta: CacheMeta | None
    rows: int


def open_cache(path, *, key: str = "distill.teacher_outputs") -> CacheInfo:
    """Check every shard of a cache (footer, metadata, sizes recorded in the report, shards that agree with
    each other and cover their rows without gaps) without reading the data pages; errors name ``key`` and the
    file."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.exists():
        raise CacheError(f"{key}: {p} does not exist (write it with `raydistill teacher-logits CONFIG`)")
    files = shard_files(p)
    if not files:
        raise CacheError(f"{key}: {p} holds no parquet shards")
    report = {}
    if p.is_dir() and (p / REPORT_FILE).is_file():
        try:
            report = {s["file"]: s for s in json.loads((p / REPORT_FILE).read_text()).get("shards", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CacheError(f"{key}: {p / REPORT_FILE} is not a valid teacher-logits report") from None
    metas = []
    for f in files:
        want = report.get(f.name, {}).get("bytes")
        if want is not None and f.stat().st_size != want:
            raise CacheError(f"{key}: {f} is {f.stat().st_size} bytes, the run wrote {want} (truncated or "
                             "modified); rerun `raydistill teacher-logits` to rewrite it")
        metas.append(read_meta(f))
    if all(m is None for m in metas):
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        return CacheInfo(p, files, None, rows)
    if any(m is None for m in metas):
        bad = files[[m is None for m in metas].index(True)]
        raise CacheError(f"{key}: {bad} has no {META_KEY.decode()!r} metadata while other shards of {p} do "
                         "(a mix of caches)")
    first = metas[0]
    for f, m in zip(files, metas):
        if m.identity() != first.identity():
            diff = sorted(a for a, b in m.identity().items() if first.identity()[a] != b)
            raise CacheError(f"{key}: {f} differs from {files[0].name} in {diff} (shards of different runs in "
                             f"one directory)")
        if SHARD_RE.match(f.name) and f.name != shard_name(m.start, m.stop):
            raise CacheError(f"{key}: {f} holds rows [{m.start}, {m.stop}) but is named for another range")
    spans = sorted((m.start, m.stop) for m in metas)
    pos = 0
    for a, b in spans:
        if a != pos:
            what = "missing" if a > pos else "overlapping"
            raise CacheError(f"{key}: {p}: rows [{min(a, pos)}, {max(a, pos)}) {what} between shards (an "
                             "unfinished teacher-logits run? rerun it: finished shards are kept)")
        pos = b
    return CacheInfo(p, files, first, pos)


def check_cache(info: CacheInfo, *, k: int | None = None, teacher_hash: str | None = None,
                tokenizer_hash: str | None = None, vocab_size: int | None = None, task: str | None = None,
                key: str = "distill.teacher_outputs") -> None:
    """The cache matches what the config asks for; each mismatch names the config key and the cache's file."""
    m = info.meta
    f = info.files[0]
    if m is None:
        return
    checks = [(task, m.task, "data (task)"), (k, m.k, "distill.topk"), (vocab_size, m.vocab_size, "the vocabulary size"),
              (teacher_hash, m.teacher_hash, "the teacher (teacher.* / data.* / run.seed)"),
              (tokenizer_hash, m.tokenizer_hash, "the tokenizer (data.tokenizer / data.*)")]
    for want, have, what in checks:
        if want is not None and have is not None and want != have:
            raise CacheError(f"{key}: {f} was written for {what} = {have!r}, the config asks for {want!r}; "
                             "write a cache for this config with `raydistill teacher-logits`")


def decoded_bytes(info: CacheInfo, rows: int | None = None) -> int:
    """About what the cache's rows (``rows`` of them; None: all) take decoded in memory: per token (a
    classification row) k float32 values and int64 indices, the float32 tail and 8 bytes an input column;
    the parquet files' sizes for a cache of the format before metadata (raw values already)."""
    rows = info.rows if rows is None else rows
    m = info.meta
    if m is None:
        return sum(f.stat().st_size for f in info.files) * rows // max(1, info.rows)
    per_item = m.k * (4 + 8) + 4 + 8 * len(m.input_columns)
    return int(rows) * max(1, int(m.tokens_per_row)) * per_item


def read_ahead_bytes(info: CacheInfo) -> int:
    """The object-store budget of a streamed cache (:func:`read_dataset`): ``READ_AHEAD_SHARDS`` of its
    largest shards decoded, at least ``READ_AHEAD_MIN_BYTES``."""
    spans = [SHARD_RE.match(f.name) for f in info.files]
    largest = (max(int(m[2]) - int(m[1]) for m in spans) if all(spans)
               else -(-int(info.rows) // max(1, len(info.files))))
    return max(READ_AHEAD_MIN_BYTES, READ_AHEAD_SHARDS * decoded_bytes(info, largest))


def read_dataset(info: CacheInfo, *, tail: bool = True):
    """The cache as a lazy Ray dataset that streams the shards, one Ray Data task per shard reading and
    decoding it whole (:func:`read_shard`; in the tasks that feed the workers, not on the driver: nothing is
    read here), rows in shard order. The tasks take no CPU from Ray's scheduler: they run while the training
    workers hold the node's CPUs (and a Tune trial's driver a fraction of one), where a task asking for a CPU
    would wait forever on a small node (``read_parquet`` would, with its metadata tasks). At most
    ``READ_CONCURRENCY`` shards are read and decoded at once (tasks taking no CPU would otherwise all start
    together, every core decoding beside the training).

    The decoded rows wait in the object store until a worker reads them; how far they run ahead of the
    readers is bounded whatever the cache's length: a task hands its decoded shard out in blocks of at most
    ``READ_BLOCK_BYTES`` and the dataset's object-store budget (``ExecutionOptions.resource_limits``) is
    :func:`read_ahead_bytes`, so Ray Data's streaming backpressure pauses a task between blocks, and starts
    the next shard, as the readers catch up, instead of letting whole decoded shards queue up to its default
    budget (half the object store). Ray Train replaces a dataset's execution options with the ones it splits
    it with: ``raydistill.distill.stages.data_config`` carries the budget over.
    ``benchmarks/bench_offline_stream.py`` measures it."""
    import ray.data

    ds = ray.data.from_items([{"path": str(f)} for f in info.files], override_num_blocks=len(info.files))
    ds = ds.map_batches(_read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"tail": tail}, num_cpus=0,
                        concurrency=READ_CONCURRENCY)
    ctx = ds.context  # this dataset's own (a copy of the current DataContext)
    ctx.target_max_block_size = READ_BLOCK_BYTES
    limits = ctx.execution_options.resource_limits
    have = limits.object_store_memory
    cap = read_ahead_bytes(info)
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=cap if have is None or not have > 0
                                                        else min(have, cap))
    return ds


READ_CONCURRENCY = 2  # shards read and decoded at once by read_dataset (one decodes while another is read)
READ_BLOCK_BYTES = 8 << 20  # a read task hands its decoded shard to Ray Data in blocks of at most this size
READ_AHEAD_SHARDS = 4  # the object-store budget of a streamed cache, in decoded shards (read_ahead_bytes): the
# READ_CONCURRENCY being decoded (Ray Data counts their coming output against it) and as many queued ...
READ_AHEAD_MIN_BYTES = 32 << 20  # ... and at least this


def _read_shards(batch: dict, *, tail: bool) -> dict:
    parts = [read_shard(p, tail=tail) for p in batch["path"]]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def read_teacher_outputs(path: str, *, tail: bool = True):
    """The shards written by ``raydistill teacher-logits`` as a lazy Ray dataset, checked and decoded in Ray Data
    (``topk_values``, ``topk_indices`` and, with ``tail``, ``topk_tail``)."""
    return read_dataset(open_cache(path), tail=tail)
