"""The shared launch heuristic (kernels/_tiles.py)."""

import pytest

from kernels._tiles import row_tiles
from tests.kernels.tolerances import DTYPES


@pytest.mark.parametrize("v", [1, 7, 2048, 2049, 4096, 4097, 30522, 262144])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launch_heuristic_is_a_pure_function(v, dtype):
    block_n, block, num_warps = row_tiles(v, dtype)
    assert (block_n, block, num_warps) == row_tiles(v, dtype)
    assert block & (block - 1) == 0 and block_n & (block_n - 1) == 0 and num_warps in (1, 2, 4, 8, 16)
    assert block_n * block * dtype.itemsize <= 8192 and block_n <= 64
    assert block >= min(v, 8192 // dtype.itemsize)  # rows wider than the block loop, narrower ones fit in one
