"""SparseLinear vs dense vs torch.sparse benchmark: same as `raydistill bench spmm` (see --help)."""

import sys

from raydistill.bench.spmm import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
