"""fastmerge kernel sources: Triton kernels (Python) and the C CPU backend (kernels/c)."""
