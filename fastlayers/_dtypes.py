"""The compute dtype rule, stated once: every fused kernel and every reference formula of fastlayers
accumulates float64 data in float64 and everything else (float32, bfloat16, float16) in float32 --
as PyTorch's own CPU and CUDA kernels for these ops do (the 16-bit types are rounded once, at the end).
"""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
