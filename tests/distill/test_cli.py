"""`raydistill distill` / `teacher-logits` on bad arguments: exit code 2, one clear line, no traceback.
These never get as far as starting Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raydistill.cli import main as cli_main


def _run(*args):
    p = subprocess.run([sys.executable, "-m", "raydistill", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("args, words", [
    (["distill", "--bogus"], "unrecognized arguments: --bogus"),
    (["distill", "/nonexistent/x.yaml"], "config file not found: /nonexistent/x.yaml"),
    (["distill", "--set", "distill.alpha=5"], "distill.alpha"),
    (["distill", "--set", "nonsense"], "expected key.path=value"),
    (["distill", "--set", "distill.tempreture=2"], "distill.tempreture: unknown key"),
    (["distill", "--num-workers", "0"], "--num-workers must be >= 1"),
    (["distill", "--num-workers", "two"], "invalid int value"),
    (["teacher-logits", "--topk", "11"], "--topk must be in 1..10"),
    (["teacher-logits", "--value-levels", "300"], "--value-levels: value_levels must be an int in [2, 256]"),
    (["teacher-logits", "--shard-rows", "0"], "--shard-rows must be >= 1"),
    (["teacher-logits", "--tail-temperature", "0"], "--tail-temperature must be in (0, 100]"),
    (["teacher-logits", "--codec", "zip"], "invalid choice: 'zip'"),
    (["distill", "--set", "distill.teacher_outputs=/nonexistent/cache"],
     "distill.teacher_outputs: /nonexistent/cache does not exist"),
])
def test_bad_arguments_exit_2_without_traceback(args, words):
    rc, out, err = _run(*args)
    assert rc == 2, (rc, out, err)
    assert words in err, err
    assert "Traceback" not in err + out


def test_help_exits_0_in_process(capsys):
    with pytest.raises(SystemExit) as ei:
        cli_main(["distill", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--storage-path", "--name", "--num-workers", "--use-gpu", "--address", "--set"):
        assert flag in out


def test_damaged_teacher_outputs_fail_before_ray(tmp_path):
    """A truncated shard in distill.teacher_outputs: exit 2 naming the file, before Ray starts."""
    import numpy as np
    import torch

    from raydistill.data.topk_cache import CacheMeta, shard_name, shard_table, write_shard
    from raydistill.data.topk_codec import CodecSpec, topk_from_logits

    v, i, t = (a.numpy() for a in topk_from_logits(torch.randn(20, 10), 4, 4.0))
    meta = CacheMeta(codec=CodecSpec().resolved(4, 10).to_dict(), k=4, vocab_size=10, task="classification",
                     tokens_per_row=1, rows=20, start=0, stop=20, input_columns=["x", "y"], tail_temperature=4.0)
    path = tmp_path / shard_name(0, 20)
    write_shard(path, shard_table(meta, {"x": np.zeros((20, 40), np.float32), "y": np.zeros(20, np.int64)}, v, i, t))
    path.write_bytes(path.read_bytes()[:-100])
    rc, out, err = _run("distill", "--storage-path", str(tmp_path / "runs"), "--set",
                        f"distill.teacher_outputs={tmp_path}", "--set", "distill.topk=4")
    assert rc == 2, (rc, out, err)
    assert f"{path.name}: not a readable parquet file" in err and "Traceback" not in err + out
