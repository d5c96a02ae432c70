"""Fused Triton loss kernels for distillation, usable by any training stack (no dependency on `engine`)."""
