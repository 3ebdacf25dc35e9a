"""raydistill: Ray-distributed knowledge distillation with fused C++/CUDA kernels."""

__version__ = "0.1.0"
