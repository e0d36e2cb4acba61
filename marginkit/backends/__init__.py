"""Backends: torch_chunked (pure PyTorch), triton (fused kernels), cuda (csrc ops)."""
