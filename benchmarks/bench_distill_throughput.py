"""Thin wrapper: `python benchmarks/bench_distill_throughput.py [options]` == `raydistill bench distill-throughput`."""

import sys

from raydistill.bench.distill_throughput import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
