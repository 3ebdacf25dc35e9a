"""raydistill.utils: benchmark output never goes into an installed package's tree; atomic JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import raydistill.utils as utils


def _load_copy(root: Path):
    pkg = root / "raydistill"
    pkg.mkdir(parents=True)
    shutil.copy(utils.__file__, pkg / "utils.py")
    spec = importlib.util.spec_from_file_location("rd_utils_copy", pkg / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_dir_checkout_vs_installed(tmp_path, monkeypatch):
    repo = Path(utils.__file__).resolve().parents[1]
    assert utils.results_dir() == repo / "benchmarks" / "results"  # this checkout (editable install)
    installed = _load_copy(tmp_path / "site-packages")  # a wheel install: no pyproject / benchmarks beside it
    monkeypatch.chdir(tmp_path)
    assert installed.results_dir() == tmp_path / "benchmarks" / "results"
    assert "site-packages" not in str(installed.results_dir())


def test_write_json_atomic_leaves_no_temp(tmp_path):
    p = utils.write_json_atomic(tmp_path / "a" / "r.json", {"x": 1, "p": Path("/q")})
    assert json.loads(p.read_text()) == {"x": 1, "p": "/q"}
    assert sorted(f.name for f in p.parent.iterdir()) == ["r.json"]
    info = utils.machine_info("cpu")
    assert info["cpu_count"] and info["torch"] and "loadavg_at_start" in info


def test_unwrap_model_peels_every_wrapper():
    import torch

    net = torch.nn.Linear(3, 2)
    assert utils.unwrap_model(net) is net
    wrapped = torch.compile(torch.nn.DataParallel(net))  # compile's _orig_mod around DataParallel's .module
    assert wrapped is not net and utils.unwrap_model(wrapped) is net
    assert utils.unwrap_model(torch.nn.DataParallel(torch.nn.DataParallel(net))) is net


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_replace_dir_atomically_replaces_only_its_own_output(tmp_path):
    import pytest

    def write(files):
        def fn(tmp: Path):
            for name, text in files.items():
                (tmp / name).write_text(text)
        return fn

    out = tmp_path / "out"
    assert utils.replace_dir_atomically(out, write({"a.txt": "1"})) == out
    assert _names(out) == [utils.EXPORT_MARKER, "a.txt"]
    utils.replace_dir_atomically(out, write({"b.txt": "2"}))  # an earlier output of ours: replaced whole
    assert _names(out) == [utils.EXPORT_MARKER, "b.txt"] and _names(tmp_path) == ["out"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"dest: .*mine is not empty \(notes.txt\) and is not an earlier raydistill"):
        utils.replace_dir_atomically(mine, write({"x": "1"}), key="dest")
    (tmp_path / "f").write_text("file")
    with pytest.raises(KeyError, match="is an existing file"):
        utils.replace_dir_atomically(tmp_path / "f", write({"x": "1"}), error=KeyError)
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symbolic link"):
        utils.replace_dir_atomically(tmp_path / "link", write({"x": "1"}))
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "f").read_text() == "file"
    empty = tmp_path / "empty"
    empty.mkdir()
    utils.replace_dir_atomically(empty, write({"c": "3"}))  # an empty directory holds nothing to lose
    assert _names(empty) == [utils.EXPORT_MARKER, "c"]
    nested = utils.replace_dir_atomically(tmp_path / "new" / "deep", write({"d": "4"}))
    assert (nested / "d").read_text() == "4"
    assert _names(tmp_path) == ["empty", "f", "link", "mine", "new", "out"]  # nothing temporary left


def test_replace_dir_atomically_leaves_nothing_on_error(tmp_path):
    import pytest

    out = tmp_path / "out"
    utils.replace_dir_atomically(out, lambda tmp: (tmp / "old.txt").write_text("old"))
    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def fail(tmp: Path, exc=exc):
            (tmp / "half.txt").write_text("half")
            raise exc

        with pytest.raises(type(exc)):
            utils.replace_dir_atomically(out, fail)
        assert _names(out) == [utils.EXPORT_MARKER, "old.txt"]  # the earlier output is untouched
        assert _names(tmp_path) == ["out"]  # and no temporary directory is left beside it


def test_memory_mib_follows_the_resident_set_and_its_peak():
    import numpy as np

    before = utils.memory_mib()
    assert 0 < before["now"] <= before["peak"]
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = utils.memory_mib()
    assert during["now"] >= before["now"] + 56, (before, during)
    del block
    after = utils.memory_mib()
    assert after["peak"] >= during["now"] - 1 and after["now"] < during["now"] - 32, (during, after)


def test_new_jsonl_lines_reads_complete_lines_once(tmp_path):
    p = tmp_path / "steps.jsonl"
    assert utils.new_jsonl_lines(p, 0) == ([], 0)  # no file yet
    first = json.dumps({"stage": "Schüler", "global_step": 1}, ensure_ascii=False) + "\n"
    p.write_text(first + "not json\n" + '{"global_step": 2', encoding="utf-8")  # the last line still being written
    lines, off = utils.new_jsonl_lines(p, 0)
    assert lines == [{"stage": "Schüler", "global_step": 1}]
    assert off == len((first + "not json\n").encode())  # bytes, not characters: the next read starts right
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(', "loss": 0.5}\n{"global_step": 3}\n')
    lines, off2 = utils.new_jsonl_lines(p, off)
    assert [m["global_step"] for m in lines] == [2, 3] and lines[0]["loss"] == 0.5
    assert off2 == p.stat().st_size and utils.new_jsonl_lines(p, off2) == ([], off2)


def test_error_line_names_the_error_of_a_wrapped_traceback():
    text = ("ray::TrainWorker.run() (pid=7)\n  File \"x.py\", line 3, in f\n    raise OSError(28)\n"
            "OSError: [Errno 28] No space left on device\n\nduring handling, the worker exited\n")
    assert utils.error_line(text) == "OSError: [Errno 28] No space left on device"
    assert utils.error_line(text, 7) == "OSError"
    assert utils.error_line("\n  just a message \n\n") == "just a message"  # nothing names an error: the last line
    assert utils.error_line("") == ""
