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


# ---- files the config names: refused before Ray starts (issue 19) ----------------------------------------

LM_TINY = str(REPO / "tune_configs" / "lm_tiny.yaml")


def _prose(rng, n_words=3000) -> str:
    words = ["the", "teacher", "student", "learns", "from", "soft", "targets", "of", "a", "larger", "model",
             "with", "temperature", "and", "alpha", "while", "pruning", "weights", "café", "naïve", "→"]
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), n_words)) + "\n"


@pytest.fixture
def corpus(tmp_path):
    import numpy as np

    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(int.from_bytes(__import__("os").urandom(4), "little"))
    (d / "a_good.txt").write_text(_prose(rng), encoding="utf-8")
    return d, rng


def test_binary_and_non_utf8_corpus_files_are_refused_by_name(run_cli, corpus):
    import shutil

    d, rng = corpus
    shutil.copyfile("/bin/ls", d / "ls.txt")
    (d / "random.txt").write_bytes(b"\xff\xfe" + rng.bytes(5000))  # 0xff is never valid UTF-8
    (d / "latin1.md").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "nul.py").write_bytes(b"x = 1\n\x00\x00\n")  # valid UTF-8, but binary
    rc, err = run_cli(LM_TINY, "--set", f"data.path={d}", "--set", "data.max_bytes=null")
    assert rc == 2, err
    assert "TRIPWIRE" not in err and "Traceback" not in err
    for name in ("ls.txt", "random.txt", "latin1.md", "nul.py"):
        assert name in err, (name, err)
    assert "a_good.txt" not in err and "data.path" in err and "data.skip_bad_files" in err
    assert "4 corpus file(s)" in err and "line 2" in err  # nul.py: the NUL byte's line


def test_skip_bad_files_leaves_them_out_and_goes_on(run_cli, corpus, caplog):
    import shutil

    d, _ = corpus
    shutil.copyfile("/bin/ls", d / "ls.txt")
    with caplog.at_level("WARNING", logger="raydistill"):
        rc, err = run_cli(LM_TINY, "--set", f"data.path={d}", "--set", "data.skip_bad_files=true")
    assert rc == 1 and "TRIPWIRE" in err, err  # accepted: the run went on to start Ray
    assert any("ls.txt" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    # a corpus of bad files only is still refused
    (d / "a_good.txt").unlink()
    rc, err = run_cli(LM_TINY, "--set", f"data.path={d}", "--set", "data.skip_bad_files=true")
    assert rc == 2 and "no file of the corpus" in err and "ls.txt" in err, err


def test_malformed_jsonl_line_names_file_and_line(run_cli, tmp_path, corpus):
    import json

    _, rng = corpus
    f = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": _prose(rng, 50)}) for _ in range(6)]
    lines[3] = lines[3][:-5] + "oops}"
    f.write_text("\n".join(lines) + "\n")
    rc, err = run_cli(LM_TINY, "--set", f"data.path={f}")
    assert rc == 2, err
    assert "docs.jsonl line 4 is not valid JSON" in err and "teacher" not in err and "Traceback" not in err
    lines[3] = json.dumps({"body": "no text key"})
    f.write_text("\n".join(lines) + "\n")
    rc, err = run_cli(LM_TINY, "--set", f"data.path={f}")
    assert rc == 2 and "data.text_column" in err and "line 4" in err and "'text'" in err, err


def test_tokenizer_json_that_is_not_json_names_the_key(run_cli, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{ this is not json")
    rc, err = run_cli(LM_TINY, "--set", f"data.tokenizer={tok}")
    assert rc == 2, err
    assert "data.tokenizer" in err and str(tok / "tokenizer.json") in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["outputs_missing", "outputs_empty_dir", "checkpoint_missing",
                                  "checkpoint_dir_without_weights"])
def test_teacher_files_are_checked_before_ray(run_cli, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    key, value = {"outputs_missing": ("distill.teacher_outputs", tmp_path / "nope"),
                  "outputs_empty_dir": ("distill.teacher_outputs", empty),
                  "checkpoint_missing": ("teacher.checkpoint", tmp_path / "nope.safetensors"),
                  "checkpoint_dir_without_weights": ("teacher.checkpoint", empty)}[case]
    rc, err = run_cli(TINY, "--set", f"{key}={value}")
    assert rc == 2 and key in err and str(value) in err and "TRIPWIRE" not in err, err
