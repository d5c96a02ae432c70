"""The launch heuristics (kernels/_tiles.py)."""

import pytest
import triton

from kernels._tiles import kd_ce_tiles, register_cap, row_tiles, sparse_kd_tiles
from tests.kernels.tolerances import DTYPES


@pytest.mark.parametrize("v", [1, 7, 2048, 2049, 4096, 4097, 30522, 262144])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launch_heuristic_is_a_pure_function(v, dtype):
    block_n, block, num_warps = row_tiles(v, dtype)
    assert (block_n, block, num_warps) == row_tiles(v, dtype)
    assert block & (block - 1) == 0 and block_n & (block_n - 1) == 0 and num_warps in (1, 2, 4, 8, 16)
    assert block_n * block * dtype.itemsize <= 8192 and block_n <= 64
    assert block >= min(v, 8192 // dtype.itemsize)  # rows wider than the block loop, narrower ones fit in one


@pytest.mark.parametrize("tiles", [kd_ce_tiles, sparse_kd_tiles], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_ce_tiles_hold_what_compiles_without_spills(tiles, dtype):
    """The KD+CE kernels' tiles (tests/kernels/test_compile_sm90.py measures them): a tile of several rows holds at
    most 2048 values at 4 a thread (16-bit tiles of 4096 values spilled), 1024 on at most 8 warps in the sparse
    kernel, whose single rows hold at most 2048; a dense single row as wide as `row_tiles`' tile. Each depends on the
    width only through its next power of two, so the compile test's one width per power of two reaches every tile."""
    for v in [1, 2, 3, 5, 7, 9, 17, 33, 65, 129, 257, 513, 1025, 2049, 4097, 30522, 262144]:
        block_n, block, num_warps = tiles(v, dtype)
        assert block & (block - 1) == 0 and block_n & (block_n - 1) == 0 and num_warps in (1, 2, 4, 8, 16)
        assert (block_n, block, num_warps) == tiles(triton.next_power_of_2(v), dtype)
        assert block >= min(v, 2048) and block_n <= 64
        if tiles is sparse_kd_tiles:
            assert block_n * block <= (1024 if block_n > 1 else 2048) and block == min(triton.next_power_of_2(v), 2048)
            assert num_warps == min(8, max(1, block_n * block // 128))
        elif block_n > 1:
            assert block_n * block <= 2048 and num_warps == max(1, block_n * block // 128)
        else:  # as wide as `row_tiles`' tiles, one warp per 128 values
            assert block == min(triton.next_power_of_2(v), 8192 // dtype.itemsize)
            assert num_warps == min(16, max(1, block // 128))


@pytest.mark.parametrize("num_warps", [1, 2, 4, 8, 16, 32])
def test_register_cap_is_one_programs_share_of_the_register_file(num_warps):
    cap = register_cap(num_warps)
    assert cap <= 255 and cap * 32 * num_warps <= 65536
    assert cap == 255 or (cap + 1) * 32 * num_warps > 65536
