"""What the row kernels share: their launch heuristics and their rounding store.

Every kernel in `kernels/` walks 2-D row-major tensors row by row (or a few narrow rows per program), so two pure
functions of (row width, dtype) pick their tiles: `row_tiles` for the light kernels (softmax, cosine, the gradient
scaling), `kd_ce_tiles` and `sparse_kd_tiles` for the two KD+CE kernels, which hold more per value and per row.
"""

import torch
import triton
import triton.language as tl


def _tiles(width: int, one_row: int, many_rows: int, values_per_warp: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK, num_warps): BLOCK the row's power of two up to `one_row` values (wider rows loop); narrower
    rows share a program up to `many_rows` values in all and 64 rows; one warp per `values_per_warp` values, 1 to 16."""
    block = min(triton.next_power_of_2(max(width, 1)), one_row)
    block_n = max(1, min(many_rows // block, 64))
    num_warps = min(16, max(1, block_n * block // values_per_warp))
    return block_n, block, num_warps


def row_tiles(width: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK, num_warps) for rows of `width` elements stored as `dtype` (softmax, cosine, `_grad`).

    A tile holds at most 8 KB per input (4096 bf16/fp16 or 2048 fp32 values): with 16 warps each thread issues one
    16-byte vector load per tile and keeps 8 fp32 values per operand, far from spilling. Rows wider than a tile
    loop; narrower rows share a program (BLOCK_N ≤ 64 rows: 4096 rows of width 1 in one program spill registers).
    """
    elems = 8192 // dtype.itemsize
    return _tiles(width, elems, elems, 512 // dtype.itemsize)


def kd_ce_tiles(width: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK, num_warps) for the KD+CE kernels (`kernels.distill`, `kernels.sparse_kd`).

    One row: as `row_tiles` (4096 16-bit or 2048 fp32 values, 16 warps). Several rows: at most 2048 values in any
    dtype, and one warp per 128 values (4 a thread at 16 warps), which is what fp32 tiles always were. Why: these
    kernels keep each value of both operands and of the gradient in fp32 (~3 registers per value) beside 12 to 20
    fp32 statistics per row (the sparse kernel's three fp64 sums count twice), and at 16 warps a thread has 128
    registers. `row_tiles`' 16-bit multi-row tile (4096 values, 8 a thread) spilled there when the row stride is
    odd (no vector loads: every value its own address): up to 48 B of local memory a thread in `_kd_ce_fwd_kernel`
    and 400 B in `_sparse_kd_ce_fwd_kernel` on sm_90 (Triton 3.6.0, ptxas 12.8); fewer warps spill more, since the
    values a thread holds grow as fast as its registers (tests/kernels/test_compile_sm90.py, whose table is
    benchmarks/results/sm90_resources.md). A single-row tile keeps one set of row statistics per program, and the
    same 8 values a thread do not spill there. Multi-row tiles hold narrow rows (V ≤ 2048, classes and QA spans),
    where a program is short either way: halving its rows doubles the programs, not the traffic.
    """
    one_row = 8192 // dtype.itemsize
    return _tiles(width, one_row, 2048, 128)


def sparse_kd_tiles(width: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK, num_warps) for the sparse-target KD+CE kernel (`kernels.sparse_kd`), launched with
    `maxnreg=register_cap(num_warps)`: at most 2048 values in a tile of one row, 1024 in a tile of several rows, one
    warp per 128 values up to 8 warps (so up to 255 registers a thread; 4 values a thread, 8 in a row of 2048).

    That kernel carries more than the dense one: fp64 sums, and the kept entries' walks over (BLOCK_N, BLOCK_K)
    blocks of 64-bit ids, gathered logits and targets. On sm_90 its tiles of several rows at 2048 values on 16 warps
    sat at the 128-register cap with both Triton versions and spilled 8 B with 3.6.0 (fp32, 8 rows of 256, K = V);
    1024 values on 8 warps take 138 registers and spill nothing. A single bf16 row of 4096 values on 16 warps needs
    90 registers a thread (one program per SM), 2048 on 8 warps 64 (four). The kernel has no one-tile path (it walks
    every row twice whatever its width), so narrower tiles cost no traffic: narrow rows (V ≤ 1024: classes, QA
    spans) just take more, shorter programs.
    """
    block_n, block, num_warps = _tiles(width, 2048, 1024, 128)
    return block_n, block, min(num_warps, 8)


def register_cap(num_warps: int) -> int:
    """Registers a thread may take when one program of `num_warps` warps has the SM's whole register file (65536 on
    sm_80 to sm_90): at most 255. Passed as `maxnreg` to the sparse KD kernel.

    Why. Without a cap ptxas picks its own register target for a program, apparently aiming at more than one
    resident program, and meets it by spilling a few long-lived values to local memory far below the register file
    (4-40 B a thread in 15 of the sparse kernel's configurations at 40-160 registers, Triton 3.6.0; one of them a
    value saved across the subroutine call of the fp64 division's slow path). Given the register file's share as
    `.maxnreg`, it allocates about as many registers (the same ±4 where the program is large; 128 → 160 for 64
    narrow rows on 4-8 warps) and spills nothing (tests/kernels/test_compile_sm90.py,
    benchmarks/results/sm90_resources.md).
    """
    return min(255, 65536 // (32 * num_warps))


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
