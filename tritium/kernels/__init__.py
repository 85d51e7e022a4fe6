"""Triton kernels, one file per family: jit kernels, launchers, autograd, validation."""
