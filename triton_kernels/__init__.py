"""Triton kernels of fastopt, installed as ``fastopt.triton_kernels``.

No kernel is here yet: the ``triton`` backend reports itself unavailable until they land.
"""
