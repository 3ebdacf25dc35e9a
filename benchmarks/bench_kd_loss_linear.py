"""Benchmark the fused linear + kd_loss op (same as `raydistill bench kd-loss-linear`; see
raydistill/bench/kd_loss_linear.py)."""

import sys

from raydistill.bench.kd_loss_linear import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
