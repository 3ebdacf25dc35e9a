"""``raydistill info`` and ``raydistill build-ext``."""

from __future__ import annotations

import argparse
import os
import platform

# Every compiled op: (schema name, what it is). Each op family adds its ops here.
OPS: dict[str, str] = {
    "kd_loss_fwd": "fused distillation loss (full teacher)",
    "kd_loss_topk_fwd": "fused distillation loss (top-k teacher)",
    "kd_loss_fwd_out": "fused distillation loss into a caller's gradient buffer (kd_loss_linear)",
    "kd_loss_topk_fwd_out": "the same with a top-k teacher",
    "spmm": "sparse linear forward and input grad (CSR SpMM)",
    "sddmm": "sparse linear weight-values grad (SDDMM)",
    "spmm_int8": "int8 sparse linear, inputs as they are (fp32 math)",
    "spmm_int8_a16": "int8 sparse linear, int16 dynamic activations (int32 sums)",
    "topk_cm_encode": "offline top-k cache: a shard's cm (version 2) stream",
    "topk_cm_decode": "offline top-k cache: decode a cm (version 2) stream",
}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raydistill info", description="Versions, op backends and devices.")
    p.parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    import raydistill
    from raydistill._build import load_extension, op_backend

    st = load_extension()
    con = Console()
    t = Table(title="raydistill", show_header=False)
    t.add_row("raydistill", raydistill.__version__)
    t.add_row("python", platform.python_version())
    t.add_row("torch", torch.__version__)
    t.add_row("ray", _version("ray"))
    t.add_row("CUDA (torch build)", str(torch.version.cuda))
    t.add_row("extension", f"loaded ({'CPU+CUDA' if st.with_cuda else 'CPU'}) from {st.path}" if st.loaded
              else f"not loaded: {st.reason}")
    con.print(t)

    ops = Table(title="op backends")
    ops.add_column("op")
    ops.add_column("cpu")
    ops.add_column("cuda")
    ops.add_column("what")
    for op, what in OPS.items():
        cuda = op_backend(op, "cuda") if torch.cuda.is_available() or st.with_cuda else "no CUDA"
        ops.add_row(op, op_backend(op, "cpu"), cuda, what)
    con.print(ops)

    dev = Table(title="devices")
    dev.add_column("device")
    dev.add_column("name")
    dev.add_row("cpu", f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads "
                f"({torch.backends.cpu.get_cpu_capability()})")
    for i in range(torch.cuda.device_count()):
        pr = torch.cuda.get_device_properties(i)
        dev.add_row(f"cuda:{i}", f"{pr.name}, {pr.total_memory / 2**30:.0f} GiB, sm_{pr.major}{pr.minor}")
    con.print(dev)

    from raydistill.ops.sparse_dispatch import PATH_ENV, cache_file, cached_decisions

    decisions = cached_decisions()
    sp = Table(title=f"SparseLinear CUDA path per (GPU, dtype, shape, sparsity, batch): measured crossover "
                     f"({cache_file()}; {PATH_ENV}={os.environ.get(PATH_ENV, 'auto')})")
    sp.add_column("key")
    sp.add_column("path")
    for k, v in sorted(decisions.items()):
        sp.add_row(k, v)
    if not decisions:
        sp.add_row("(none measured yet: the first CUDA call of each combination measures it)", "")
    con.print(sp)
    return 0


def build_ext_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raydistill build-ext",
                                description="Build the C++/CUDA extension into the per-user cache now.")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    p.add_argument("--force", action="store_true", help="reload even if this process already tried")
    a = p.parse_args(argv)
    from raydistill._build import load_extension

    st = load_extension(verbose=a.verbose, force=a.force)
    if st.loaded:
        print(f"raydistill extension ready ({'CPU+CUDA' if st.with_cuda else 'CPU'}): {st.path}")
        return 0
    print(f"raydistill extension not built: {st.reason}")
    return 0 if (st.reason or "").startswith("disabled") else 1
