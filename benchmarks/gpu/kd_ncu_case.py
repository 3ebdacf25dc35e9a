"""One fwd+bwd of the fused kd_loss at 8192 x 128256 bf16, for ncu (benchmarks/gpu/h200_check.sh)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from raydistill.ops import kd_loss  # noqa: E402

N, V = 8192, 128256
s = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
t = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16)
y = torch.randint(0, V, (N,), device="cuda")
for _ in range(2):
    s.grad = None
    kd_loss(s, t, y, temperature=2.0, alpha=0.5).backward()
torch.cuda.synchronize()
