"""Benchmark the fused kd_loss op (same as `raydistill bench kd-loss`; see raydistill/bench/kd_loss.py)."""

import sys

from raydistill.bench.kd_loss import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
