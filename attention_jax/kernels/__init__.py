"""Pallas kernels (GPU Triton lowering, TPU Mosaic lowering), each beside a ``*_reference`` of the same signature."""
