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
