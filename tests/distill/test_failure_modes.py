"""What a user sees when the machine or the cluster fails them (issue 19): an address where no Ray cluster
answers, a full disk, another Ray cluster (or a dead one's address file) on this machine, and corpus files
that turn out bad only past the head that preflight reads."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tune_configs" / "mnist1d_tiny.yaml")
LM_TINY = str(REPO / "tune_configs" / "lm_tiny.yaml")
SEARCH = str(REPO / "tests" / "tune" / "configs" / "tiny_search.yaml")
ENOSPC = errno.ENOSPC


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- an address where no Ray cluster answers --------------------------------------------------------------

@pytest.fixture
def no_ray_init(monkeypatch):
    """``ray.init`` is a tripwire (it would retry for minutes); the connect timeout is short."""
    import ray

    def tripwire(*a, **k):
        raise AssertionError("TRIPWIRE: ray.init was called")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setenv("RAYDISTILL_RAY_CONNECT_TIMEOUT_S", "2")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("command", ["distill", "teacher-logits", "tune"])
def test_unreachable_address_exits_2_naming_it(no_ray_init, tmp_path, capsys, command):
    from raydistill.cli import main

    addr = f"127.0.0.1:{_closed_port()}"
    argv = [command, SEARCH if command == "tune" else TINY, "--address", addr,
            "--storage-path", str(tmp_path / "runs"), *(["--no-progress"] if command == "distill" else [])]
    rc = main(argv)
    cap = capsys.readouterr()
    out = cap.err + cap.out
    assert rc == 2, out
    assert f"--address {addr}" in out and "no Ray cluster answered within 2 s" in out, out
    assert "TRIPWIRE" not in out and "Traceback" not in out


def test_address_probe_gives_up_within_its_timeout(no_ray_init, monkeypatch):
    from raydistill.config import ConfigError
    from raydistill.distill.session import probe_address, ray_session

    addr = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"--address 127\.0\.0\.1:\d+: no Ray cluster answered"):
        probe_address(addr, timeout_s=3)
    assert 2.5 < time.monotonic() - t0 < 15  # retried until the deadline, not for minutes
    with pytest.raises(ConfigError, match="not a Ray address"):
        probe_address("nohostport", timeout_s=1)
    monkeypatch.setenv("RAY_ADDRESS", addr)  # from the environment: the message names RAY_ADDRESS
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS {addr}: no Ray cluster answered"):
        with ray_session():
            pass


def test_address_of_something_that_is_not_ray(tmp_path):
    """A port that accepts connections but is no Ray GCS (e.g. the dashboard's): refused within the timeout.
    In a child process: Ray's GCS client keeps retrying in a thread that is left behind."""
    code = ("import socket, sys, time\n"
            "from raydistill.distill.session import probe_address\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n"
            "t0 = time.monotonic()\n"
            "try:\n"
            "    probe_address(f'127.0.0.1:{s.getsockname()[1]}', timeout_s=4)\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, round(time.monotonic() - t0, 1), e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    name, secs, msg = r.stdout.strip().split(" ", 2)
    assert name == "RayAddressError" and "accepts connections there but no Ray cluster answered" in msg, r.stdout
    assert float(secs) < 15


# ---- a full disk ---------------------------------------------------------------------------------------------

def _enospc(path=None) -> OSError:
    return OSError(ENOSPC, os.strerror(ENOSPC), *([str(path)] if path else []))


@pytest.fixture
def full_disk_run(monkeypatch, tmp_path, capsys):
    """Run ``raydistill distill`` where the job fails with ENOSPC (``how``) and the run's log cannot be
    appended to either (the disk is full); returns (rc, stderr, storage)."""
    import raydistill.distill.session as session
    from raydistill.distill import cli
    from raydistill.distill.pipeline import StageFailed

    storage = tmp_path / "runs"
    real_open = open

    def full_open(file, mode="r", *a, **k):
        if Path(str(file)).name == "distill.log" and any(c in mode for c in "aw+"):
            raise _enospc(file)
        return real_open(file, mode, *a, **k)

    def run(how: str):
        @contextlib.contextmanager
        def failing_session(*a, **k):
            if how == "driver":  # numpy's savez into a full disk: an OSError raised while handling another
                try:
                    raise _enospc()
                except OSError as exc:
                    raise _enospc() from exc
            # a Ray worker's error reaches the driver as text inside Ray's exception
            raise StageFailed("teacher", RuntimeError("ray::TrainWorker (pid=1)\nOSError: [Errno 28] No space "
                                                      "left on device"))
            yield  # pragma: no cover

        monkeypatch.setattr(session, "ray_session", failing_session)
        monkeypatch.setattr(cli, "open", full_open, raising=False)
        rc = cli.main([TINY, "--storage-path", str(storage), "--no-progress"])
        return rc, capsys.readouterr().err, storage

    return run


@pytest.mark.parametrize("how", ["driver", "worker"])
def test_full_disk_is_one_line_naming_the_path_and_keeps_what_was_written(full_disk_run, tmp_path, how):
    earlier = tmp_path / "runs" / "teachers" / "abc" / "final" / "model.safetensors"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"weights of an earlier run")
    rc, err, storage = full_disk_run(how)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert "no space left on device" in lines[0] and str(storage) in lines[0], err
    assert earlier.read_bytes() == b"weights of an earlier run"
    assert (storage / "tiny" / "config.yaml").is_file()  # written before the disk filled: still there


def test_full_storage_path_is_refused_before_ray(monkeypatch, tmp_path, capsys):
    import raydistill.distill.session as session
    from raydistill.distill import cli

    def fsync(fd):
        raise _enospc()

    @contextlib.contextmanager
    def tripwire(*a, **k):
        raise AssertionError("TRIPWIRE: Ray would start")
        yield  # pragma: no cover

    monkeypatch.setattr(session, "ray_session", tripwire)
    monkeypatch.setattr(os, "fsync", fsync)
    rc = cli.main([TINY, "--storage-path", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--storage-path: no space left on device" in err and "TRIPWIRE" not in err, err


def test_full_disk_during_a_search_is_one_line(monkeypatch, tmp_path, capsys):
    import raydistill.tune.runner as runner
    from raydistill.tune import cli as tune_cli

    def run_search(*a, exp_dir, **k):
        raise RuntimeError("trial failed") from _enospc(exp_dir / "trials.csv")

    monkeypatch.setattr(runner, "run_search", run_search)
    rc = tune_cli.main([SEARCH, "--storage-path", str(tmp_path / "runs"), "--name", "s"])
    cap = capsys.readouterr()
    out = [ln for ln in (cap.out + cap.err).splitlines() if ln.strip()]
    assert rc == 1 and len(out) == 1, out
    assert "no space left on device" in out[0] and str(tmp_path / "runs" / "s" / "trials.csv") in out[0]


# ---- a Ray cluster of someone else's (or a dead one's address file) on this machine --------------------------

@pytest.fixture(scope="module")
def local_ray_beside_a_stale_cluster_file():
    """Ray's temp dir (RAY_TMPDIR) is ours, holding the address file a `ray start` cluster that died without
    `ray stop` leaves behind; ray_session() with no address must start its own instance anyway."""
    import shutil
    import tempfile

    import ray

    from raydistill.distill.session import ray_session

    tmp = tempfile.mkdtemp(prefix="rd19-")  # short: Ray's socket paths live under it
    (Path(tmp) / "ray").mkdir()
    stale = f"127.0.0.1:{_closed_port()}"
    (Path(tmp) / "ray" / "ray_current_cluster").write_text(stale)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    try:
        with ray_session(num_cpus=1):
            yield ray, stale
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    assert not ray.is_initialized()


@pytest.mark.ray
def test_no_address_starts_our_own_instance_beside_a_stale_cluster_file(local_ray_beside_a_stale_cluster_file):
    from raydistill.distill.session import probe_address

    ray, stale = local_ray_beside_a_stale_cluster_file
    gcs = ray.get_runtime_context().gcs_address
    assert gcs != stale and ray.cluster_resources()["CPU"] == 1  # ours, sized as asked
    probe_address(gcs, timeout_s=30)  # a live GCS passes the address probe


def _late_bad_corpus(root: Path, rng, kind: str) -> Path:
    """A corpus whose bad part lies past the head that preflight reads."""
    import json

    from raydistill.data.text import HEAD_BYTES

    words = ["teacher", "student", "soft", "targets", "temperature", "alpha", "pruning", "weights", "the", "of"]
    root.mkdir()
    text = lambda n: " ".join(words[int(i)] for i in rng.integers(0, len(words), n))  # noqa: E731
    if kind == "text":
        (root / "a.txt").write_text(text(12000) + "\n")
        (root / "b.txt").write_bytes(text(HEAD_BYTES // 4).encode() + b"\n\xff\xfe binary tail\n")
    else:
        rows = [json.dumps({"text": text(40)}) for _ in range(3000)]
        rows[2500] = rows[2500][:-3]  # cut: not valid JSON
        (root / "a.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_bad_bytes_past_the_head_are_found_while_reading(local_ray_beside_a_stale_cluster_file, tmp_path, kind):
    import numpy as np

    from raydistill.config import ConfigError, load_config
    from raydistill.data.text import check_corpus_heads, corpus_files, prepare_text

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    corpus = _late_bad_corpus(tmp_path / "corpus", rng, kind)
    cfg = load_config(LM_TINY, [f"data.path={corpus}", "data.max_bytes=null"])
    assert check_corpus_heads(corpus_files(corpus)) == []  # preflight cannot see it
    want = "b.txt is not UTF-8 text (byte 0xff at line 2" if kind == "text" else \
        "a.jsonl line 2501 is not valid JSON"
    with pytest.raises(ConfigError, match=want.replace("(", r"\(")):
        prepare_text(cfg.data, tmp_path / "storage")
    if kind == "text":  # skipped on request: the same data as the good file alone
        td = prepare_text(cfg.data.model_copy(update={"skip_bad_files": True}), tmp_path / "storage")
        (corpus / "b.txt").unlink()
        alone = prepare_text(cfg.data, tmp_path / "storage2")
        assert td.num_tokens == alone.num_tokens and td.vocab_size == alone.vocab_size
