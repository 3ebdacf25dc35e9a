"""A regular (non-editable) wheel must carry the C++/CUDA sources and the shipped YAML configs, which a
checkout reads from the repository root (setup.py's build_py bundles them into the package)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # pip wheel gets 600 s of its own
def test_wheel_bundles_csrc_and_configs(tmp_path):
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("raydistill-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    sources = {f"raydistill/csrc/{p.relative_to(ROOT / 'csrc').as_posix()}"
               for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")}
    configs = {f"raydistill/tune_configs/{p.name}" for p in (ROOT / "tune_configs").glob("*.yaml")}
    assert sources and "raydistill/tune_configs/mnist1d_default.yaml" in configs
    assert sources <= names, sorted(sources - names)
    assert configs <= names, sorted(configs - names)
    assert "raydistill/cli.py" in names
    # the bundled copies are byte-identical to the repository's
    with zipfile.ZipFile(whl) as z:
        for name in sorted(sources | configs):
            rel = name.split("/", 2)[2]
            folder = "csrc" if name.startswith("raydistill/csrc/") else "tune_configs"
            assert z.read(name) == (ROOT / folder / rel).read_bytes(), name


def test_shipped_config_lookup():
    from raydistill import config

    assert config.default_config_path() == (ROOT / "tune_configs" / "mnist1d_default.yaml").resolve()
    assert config.shipped_config_path("mnist1d_search.yaml").name == "mnist1d_search.yaml"
    with pytest.raises(config.ConfigError, match="tune_configs/nope.yaml"):
        config.shipped_config_path("nope.yaml")


def test_info_lists_every_compiled_op():
    """`raydistill info` names every op the extension defines (the schemas in csrc/)."""
    import re
    from pathlib import Path

    from raydistill.info import OPS

    root = Path(__file__).resolve().parents[1] / "csrc"
    defined = set()
    for f in root.rglob("*.cpp"):
        defined |= set(re.findall(r'm\.def\(\s*"([a-z_0-9]+)\(', f.read_text()))
    assert defined and defined == set(OPS)
