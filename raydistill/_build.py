"""Build and load raydistill's C++/CUDA extension.

The sources under ``csrc/`` are compiled on first use with ``torch.utils.cpp_extension`` and ninja into
a per-user cache, keyed by a hash of the sources, the build flags, the torch version and the CUDA arch
list. A file lock makes concurrent first uses (several Ray workers on one node) build once and load
the same library. ``raydistill build-ext`` prebuilds.

File naming in ``csrc/``:

* ``*.cpp``            -- always compiled (CPU kernels, schemas, argument checks)
* ``*_cuda_glue.cpp``  -- torch-facing CUDA glue, compiled only with CUDA
* ``*.cu``             -- plain CUDA C++ kernels + launchers (no torch headers), compiled only with CUDA

Environment variables:

* ``RAYDISTILL_DISABLE_EXT=1``  -- never build/load; every op uses its PyTorch reference.
* ``RAYDISTILL_CACHE_DIR``      -- cache root (default ``$XDG_CACHE_HOME/raydistill`` or ``~/.cache/raydistill``).
* ``RAYDISTILL_CSRC``           -- location of the ``csrc`` folder (default: next to the package).
* ``RAYDISTILL_BUILD_VERBOSE=1`` -- show compiler output.
* ``RAYDISTILL_DISABLE_CUDA_EXT=1`` -- build the CPU kernels only, even when CUDA is available.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXT_NAME = "raydistill_C"
_ENV_DISABLE = "RAYDISTILL_DISABLE_EXT"

_lock = threading.Lock()
_state: "ExtState | None" = None


@dataclass
class ExtState:
    loaded: bool
    with_cuda: bool = False
    path: str | None = None
    reason: str | None = None  # why the extension is not loaded
    key: str | None = None
    warned: bool = field(default=False, repr=False)


def csrc_dir() -> Path:
    env = os.environ.get("RAYDISTILL_CSRC")
    if env:
        return Path(env)
    pkg = Path(__file__).resolve().parent
    bundled = pkg / "csrc"  # a wheel install (setup.py copies csrc/ into the package)
    return bundled if bundled.is_dir() else pkg.parent / "csrc"  # a checkout / editable install


def cache_root() -> Path:
    env = os.environ.get("RAYDISTILL_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "raydistill"


def _cuda_wanted() -> bool:
    if os.environ.get("RAYDISTILL_DISABLE_CUDA_EXT") == "1":
        return False
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return bool(nvcc and os.path.exists(nvcc))


def _cuda_archs() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return "8.0;9.0"


def _sources(with_cuda: bool) -> list[Path]:
    root = csrc_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        if p.suffix == ".cpp":
            if p.name.endswith("_cuda_glue.cpp") and not with_cuda:
                continue
            out.append(p)
        elif p.suffix == ".cu" and with_cuda:
            out.append(p)
    return out


def _headers() -> list[Path]:
    root = csrc_dir()
    return sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh", ".hpp"))


def _cpu_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fno-math-errno"]
    if platform.system() == "Linux":
        # at::parallel_for is an inline template over OpenMP (torch's AT_PARALLEL_OPENMP build): without
        # -fopenmp it silently runs on one thread. Linking with -fopenmp records libgomp.so.1, which the
        # loader resolves to the copy torch already loaded, so there is one OpenMP runtime per process.
        flags.append("-fopenmp")
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec picks its widest implementation from CPU_CAPABILITY_*; the extension is built for the
        # host it first runs on (the capability is part of the cache key).
        cap = torch.backends.cpu.get_cpu_capability()
        if cap in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _cuda_flags() -> list[str]:
    return ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-Xptxas=-v" if os.environ.get(
        "RAYDISTILL_BUILD_VERBOSE") == "1" else "-Xptxas=-O3"]


def build_key(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for p in _sources(with_cuda) + _headers():
        h.update(str(p.relative_to(csrc_dir())).encode())
        h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(str(with_cuda).encode())
    if with_cuda:
        h.update(_cuda_archs().encode())
        h.update(" ".join(_cuda_flags()).encode())
    h.update(" ".join(_cpu_flags()).encode())
    h.update(torch.backends.cpu.get_cpu_capability().encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def _lib_path(build_dir: Path, name: str) -> Path:
    return build_dir / f"{name}.so"


def _build(with_cuda: bool, verbose: bool) -> ExtState:
    from filelock import FileLock
    from torch.utils import cpp_extension

    key = build_key(with_cuda)
    name = f"{EXT_NAME}_{key}"
    build_dir = cache_root() / "ext" / key
    lib = _lib_path(build_dir, name)
    if not lib.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(build_dir) + ".lock"):
            if not lib.exists():  # another process may have built it while we waited
                # torch's own build baton: a build killed mid-way (Ctrl-C, a timeout) leaves it behind and
                # every later build would wait on it forever. We hold the lock, so nobody else is building.
                (build_dir / "lock").unlink(missing_ok=True)
                if with_cuda:
                    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_archs())
                cpp_extension.load(
                    name=name,
                    sources=[str(p) for p in _sources(with_cuda)],
                    extra_cflags=_cpu_flags() + (["-DRAYDISTILL_WITH_CUDA"] if with_cuda else []),
                    extra_cuda_cflags=_cuda_flags() if with_cuda else None,
                    extra_ldflags=["-fopenmp"] if platform.system() == "Linux" else None,
                    extra_include_paths=[str(csrc_dir())],
                    build_directory=str(build_dir),
                    verbose=verbose,
                    with_cuda=with_cuda,
                    is_python_module=False,
                )
                return ExtState(loaded=True, with_cuda=with_cuda, path=str(lib), key=key)
    torch.ops.load_library(str(lib))
    return ExtState(loaded=True, with_cuda=with_cuda, path=str(lib), key=key)


def load_extension(*, verbose: bool | None = None, force: bool = False) -> ExtState:
    """Build (if needed) and load the extension once per process; never raises.

    On failure the state records the reason, and ops use their PyTorch reference implementations.
    """
    global _state
    with _lock:
        if _state is not None and not force:
            return _state
        if verbose is None:
            verbose = os.environ.get("RAYDISTILL_BUILD_VERBOSE") == "1"
        if os.environ.get(_ENV_DISABLE, "0") not in ("", "0"):
            _state = ExtState(loaded=False, reason=f"disabled by {_ENV_DISABLE}={os.environ[_ENV_DISABLE]}")
        elif not _sources(False):
            _state = ExtState(loaded=False, reason=f"no C++ sources found under {csrc_dir()}")
        else:
            with_cuda = _cuda_wanted()
            try:
                _state = _build(with_cuda, verbose)
            except Exception as e:  # noqa: BLE001 - any build failure means: fall back
                msg = str(e).strip().splitlines()
                _state = ExtState(loaded=False, reason=f"build failed: {msg[-1] if msg else type(e).__name__}")
        return _state


def extension_available() -> bool:
    """True when the compiled ops are loaded; warns once (per process) when falling back."""
    st = load_extension()
    if not st.loaded and not st.warned:
        st.warned = True
        warnings.warn(
            f"raydistill: compiled ops unavailable ({st.reason}); using the PyTorch reference "
            "implementations (slower, more memory). Run `raydistill build-ext` to see the build log.",
            RuntimeWarning,
            stacklevel=3,
        )
    return st.loaded


def op_backend(op: str, device_type: str) -> str:
    """'compiled' if ``raydistill::<op>`` has a kernel for the device, else 'reference'."""
    if not load_extension().loaded:
        return "reference"
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"raydistill::{op}", key)
    except RuntimeError:
        has = False
    return "compiled" if has else "reference"
