"""Directories written for the user (the exported student, teacher-logits output) never replace anything of
the user's: a file, a symbolic link or a non-empty directory that is not an earlier output of ours is refused
with an error naming the argument, before any work (for teacher-logits: before Ray starts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raydistill.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tune_configs" / "mnist1d_tiny.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    import contextlib

    import raydistill.distill.session as session

    @contextlib.contextmanager
    def tripwire(*a, **k):
        raise AssertionError("TRIPWIRE: Ray would start")
        yield  # pragma: no cover

    monkeypatch.setattr(session, "ray_session", tripwire)


@pytest.fixture
def user_dirs(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("keep me too")
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    return {"mine": (mine, "is not empty (notes.txt) and is not an earlier raydistill output"),
            "afile": (tmp_path / "afile", "is an existing file"), "link": (tmp_path / "link", "is a symbolic link")}


def _intact(tmp_path):
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "afile").read_text() == "keep me too"


def test_teacher_logits_output_is_checked_before_ray_starts(tmp_path, no_ray, user_dirs, capsys):
    from raydistill.distill.cli import teacher_logits_main
    from raydistill.distill.teacher_logits import write_teacher_outputs

    cfg = load_config(TINY)
    for path, words in user_dirs.values():
        with pytest.raises(ConfigError, match=f"--output: .*{re.escape(words)}"):
            write_teacher_outputs(cfg, storage_path=tmp_path / "runs", output=str(path))
        rc = teacher_logits_main([TINY, "--storage-path", str(tmp_path / "runs"), "--output", str(path)])
        assert rc == 2 and words in capsys.readouterr().err.replace("\n", "")
    _intact(tmp_path)


def test_export_student_refuses_before_loading_the_checkpoint(tmp_path, user_dirs):
    from raydistill.distill.export import export_student

    cfg = load_config("lm_tiny")
    for path, words in user_dirs.values():
        # the checkpoint does not even exist: the output path is checked first
        with pytest.raises(ValueError, match=f"out_dir: .*{re.escape(words)}"):
            export_student(cfg, tmp_path / "no-checkpoint", path)
    _intact(tmp_path)
