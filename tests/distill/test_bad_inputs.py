"""`raydistill distill` on bad inputs: rc 2 and a message naming the key or argument, before Ray starts.

The CLI runs in-process with ``ray_session`` replaced by a tripwire: if validation let a case through, the
job would try to start Ray and the test sees rc 1 and the tripwire's message instead of rc 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raydistill.distill import cli

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tune_configs" / "mnist1d_tiny.yaml")


@pytest.fixture
def run_cli(monkeypatch, capsys, tmp_path):
    import contextlib

    import raydistill.distill.session as session

    @contextlib.contextmanager
    def tripwire(*a, **k):
        raise AssertionError("TRIPWIRE: Ray would start")
        yield  # pragma: no cover

    monkeypatch.setattr(session, "ray_session", tripwire)
    storage = tmp_path / "runs"

    def run(*args, storage_arg=True):
        argv = ["--no-progress", *args]
        if storage_arg and "--storage-path" not in args:
            argv += ["--storage-path", str(storage)]
        rc = cli.main(argv)
        cap = capsys.readouterr()
        return rc, cap.err

    run.storage = storage
    return run


def _file(tmp_path, name="f.txt", text="x"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", [
    "storage_is_file", "storage_not_writable", "storage_key_is_file", "empty_yaml", "unimportable_model",
    "bad_factory_kwargs", "inf_temperature", "huge_temperature", "bool_epochs", "exclude_matches_nothing",
    "bad_assistant_model", "steps_and_epochs", "steps_and_tokens", "fp16_on_cpu", "tokens_for_mnist",
    "checkpointing_mlp_student", "checkpointing_mlp_teacher", "tracking_uri_not_writable", "tracking_dir_is_file",
])
def test_bad_input_exits_2_naming_the_key(run_cli, tmp_path, case):
    f = _file(tmp_path)
    args, words = {
        "storage_is_file": ([TINY, "--storage-path", str(f)], ["--storage-path", "is a file"]),
        "storage_not_writable": ([TINY, "--storage-path", str(f / "sub")], ["--storage-path", "not a writable"]),
        "storage_key_is_file": ([TINY, "--set", f"run.storage_path={f}"], ["run.storage_path", "is a file"]),
        "empty_yaml": ([str(_file(tmp_path, "empty.yaml", "\n# nothing\n"))], ["empty.yaml", "is empty"]),
        "unimportable_model": ([TINY, "--set", "student.model=nosuchpkg.mod:factory"],
                               ["student.model", "nosuchpkg"]),
        "bad_factory_kwargs": ([TINY, "--set", "student.kwargs={hidden: 8, widht: 3}"],
                               ["student.model", "widht"]),
        "inf_temperature": ([TINY, "--set", "distill.temperature=.inf"], ["distill.temperature", "finite"]),
        "huge_temperature": ([TINY, "--set", "distill.temperature=1e4"], ["distill.temperature", "100"]),
        "bool_epochs": ([TINY, "--set", "distill.epochs=true"], ["distill.epochs", "boolean"]),
        "exclude_matches_nothing": ([TINY, "--set", "compression.exclude=[haed]"],
                                    ["compression.exclude", "'haed'", "matches no"]),
        "bad_assistant_model": ([TINY, "--set", "assistants=[{model: mlp, kwargs: {nope: 1}}]"],
                                ["assistants[0].model", "nope"]),
        # issue 22: budgets that contradict each other, fp16 on a CPU, checkpointing a model without it, a
        # tracking store that cannot be written
        "steps_and_epochs": ([TINY, "--set", "distill.max_steps=100"], ["distill", "epochs (4)", "max_steps (100)"]),
        "steps_and_tokens": ([TINY, "--set", "teacher.training.max_steps=5", "--set", "teacher.training.max_tokens=9",
                              "--set", "teacher.training.epochs=null"], ["teacher.training", "max_tokens (9)"]),
        "fp16_on_cpu": ([TINY, "--set", "distill.precision=fp16"], ["distill.precision", "fp16 needs a GPU"]),
        "tokens_for_mnist": ([TINY, "--set", "distill.epochs=null", "--set", "distill.max_tokens=1000"],
                             ["distill.max_tokens", "causal LM"]),
        "checkpointing_mlp_student": ([TINY, "--set", "distill.gradient_checkpointing=true"],
                                      ["distill.gradient_checkpointing", "student", "'mlp'"]),
        "checkpointing_mlp_teacher": ([TINY, "--set", "teacher.training.gradient_checkpointing=true"],
                                      ["teacher.training.gradient_checkpointing", "teacher"]),
        "tracking_uri_not_writable": ([TINY, "--set", "run.tracking=mlflow", "--set",
                                       f"run.tracking_uri=sqlite:///{f}/mlflow.db"], ["run.tracking_uri", str(f)]),
        "tracking_dir_is_file": ([TINY, "--set", "run.tracking=tensorboard", "--set", f"run.tracking_uri={f}"],
                                 ["run.tracking_uri", "is a file"]),
    }[case]
    if case.startswith("storage"):
        rc, err = run_cli(*args, storage_arg=False)
    else:
        rc, err = run_cli(*args)
    assert rc == 2, err
    for w in words:
        assert w in err, (w, err)
    assert "TRIPWIRE" not in err and "Traceback" not in err


@pytest.mark.parametrize("how, bad", [("--name", "../escape"), ("--name", "a/b"), ("--name", ".."),
                                      ("--name", "/tmp/abs"), ("--set", ".."), ("--set", "../escape"),
                                      ("--set", "x/../../escape")])
def test_run_name_is_a_name_not_a_path(run_cli, tmp_path, how, bad):
    args = [TINY, "--name", bad] if how == "--name" else [TINY, "--set", f"run.name={bad}"]
    rc, err = run_cli(*args)
    assert rc == 2, err
    assert ("--name" if how == "--name" else "run.name") in err and "not a valid run name" in err
    assert not (tmp_path / "escape").exists() and not run_cli.storage.exists()


def test_run_name_rule_is_the_same_in_config_and_api(tmp_path):
    from raydistill.config import ConfigError, load_config
    from raydistill.distill.pipeline import run_distill

    with pytest.raises(ConfigError, match="run.name"):
        load_config(TINY, ["run.name=.."])
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match="not a valid run name"):
        run_distill(cfg, storage_path=tmp_path, name="../escape", progress=False)
    assert not (tmp_path.parent / "escape").exists()
    assert load_config(TINY, ["run.name=my-run_2.v1"]).run.name == "my-run_2.v1"


def test_second_run_with_the_same_name_fails_at_once(run_cli):
    from raydistill.distill.runlock import run_lock

    with run_lock(run_cli.storage / "tiny"):  # a live run holds the directory
        rc, err = run_cli(TINY)
    assert rc == 2 and "in use by another raydistill run" in err and "TRIPWIRE" not in err, err
    # once the holder is gone, the lock is free again (the run proceeds to starting Ray: the tripwire)
    rc, err = run_cli(TINY)
    assert rc == 1 and "TRIPWIRE" in err
    assert not (run_cli.storage / "tiny" / ".run.owner").exists()


def test_run_lock_is_released_when_its_holder_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from raydistill.distill.runlock import RunInUse, run_lock

    code = ("import sys, time; from raydistill.distill.runlock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True,
                         cwd=str(REPO), env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"process {p.pid}"):
            with run_lock(tmp_path / "r"):
                pass
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        t0 = time.time()
        with run_lock(tmp_path / "r"):  # no stale lock after a SIGKILL
            pass
        assert time.time() - t0 < 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
