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
