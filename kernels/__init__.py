"""Triton kernels of fastfuse, installed as ``fastfuse.kernels``."""
