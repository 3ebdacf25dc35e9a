"""int8 SparseLinear vs fp32 SparseLinear vs torch.ao dynamic int8 dense: same as `raydistill bench spmm-int8`."""

import sys

from raydistill.bench.spmm_int8 import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
