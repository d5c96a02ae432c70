"""What the row kernels share: their launch heuristic and their rounding store.

Every kernel in `kernels/` walks 2-D row-major tensors row by row (or a few narrow rows per program),
so one pure function of (row width, dtype) picks their tiles for all of them.
"""

import torch
import triton
import triton.language as tl


def row_tiles(width: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK, num_warps) for rows of `width` elements stored as `dtype`.

    A tile holds at most 8 KB per input (4096 bf16/fp16 or 2048 fp32 values): with 16 warps each thread issues one
    16-byte vector load per tile and keeps 8 fp32 values per operand, far from spilling. Rows wider than a tile
    loop; narrower rows share a program (BLOCK_N ≤ 64 rows: each row carries ~12 fp32 running statistics in the
    KD+CE kernel, and 4096 rows of width 1 in one program spill registers).
    """
    elems = 8192 // dtype.itemsize
    block = min(triton.next_power_of_2(max(width, 1)), elems)
    block_n = min(elems // block, 64)
    num_warps = min(16, max(1, block_n * block * dtype.itemsize // 512))
    return block_n, block, num_warps


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Cast fp32 `x` to DTYPE, rounding to nearest-even; the kernel files share it for every 16-bit store.

    GPUs round fp32 → bf16 to nearest-even (cvt.rn), but Triton's CPU interpreter truncates (its cast applies no
    rounding mode), a full bf16 ulp of error that would make the tests check something the GPU never computes. The
    integer form (c10's `round_to_nearest_even`) gives the same bits on both, for a few integer ops per element in
    kernels bound by memory: add 0x7FFF plus the lowest kept bit (ties to even), drop the low 16 bits. NaN is passed
    through: a NaN payload in the low bits could round to inf.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(DTYPE)
