"""The block geometry shared by the kernels and the plain-PyTorch reference path (no triton import).

Block sizes are part of a block mask's meaning: the same band lifted to 64 x 64
blocks and to 64 x 128 blocks keeps different pairs.  So every backend takes
its default sizes from :func:`default_block_sizes`, and a profile that runs on
the reference path on a CPU computes the mask the kernels compute on a GPU.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_BLOCK_SIZES", "default_block_sizes"]

#: Query and key block sizes the kernels are built for.
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def default_block_sizes(head_dim: int) -> tuple[int, int]:
    """``(block_m, block_n)`` the kernel runs fastest with on Hopper for ``head_dim``.

    Choose them before building indices: they are part of the index contract.
    64 x 128 for D <= 64, 128 x 64 for D 128: the fastest of the block shapes
    timed by ``scripts/bench_kernels.py --variants`` on an H200
    (benchmarks/results/kernels-h200.json).
    """
    if head_dim <= 64:
        return 64, 128
    return 128, 64
