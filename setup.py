"""Wheel builds carry the C++/CUDA sources and the YAML configs inside the package.

In a checkout (and an editable install) ``raydistill`` reads ``csrc/`` and ``tune_configs/`` from the
repository root. A regular wheel has no repository root, so ``build_py`` copies both into the package
(``raydistill/csrc``, ``raydistill/tune_configs``), where ``raydistill._build.csrc_dir`` and
``raydistill.config`` look next. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"csrc": ("*.cpp", "*.cu", "*.h", "*.cuh"), "tune_configs": ("*.yaml",)}


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs read the repository's folders directly
        for folder, patterns in BUNDLED.items():
            src_root = ROOT / folder
            for pattern in patterns:
                for src in sorted(src_root.rglob(pattern)):
                    dest = Path(self.build_lib) / "raydistill" / folder / src.relative_to(src_root)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)


setup(cmdclass={"build_py": build_py_with_data})
