"""``raydistill bench <name>``: dispatch to the benchmark modules (also run by benchmarks/*.py)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "kd-loss": "raydistill.bench.kd_loss",
    "kd-loss-linear": "raydistill.bench.kd_loss_linear",
    "spmm": "raydistill.bench.spmm",
    "spmm-int8": "raydistill.bench.spmm_int8",
    "distill-throughput": "raydistill.bench.distill_throughput",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: raydistill bench {" + ",".join(BENCHES) + "} [options]\n"
              "Run `raydistill bench <name> --help` for a benchmark's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"raydistill bench: unknown benchmark {name!r}; choose one of: {', '.join(BENCHES)}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[name]).main(rest) or 0)
