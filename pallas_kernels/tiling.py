"""Per-shape tile choice for the int4 matmul kernels (H100: 132 SMs).

Decode (M = 1..64) and verify (M up to ~512) are skinny: the (M, N) grid alone often has far fewer
programs than the GPU has SMs, and the kernel is bound by reading the weights. Split-K then gives
several programs disjoint K ranges of the same output tile; their f32 partial sums are added after
the kernel. The numbers below are first guesses, partly checked with `scripts/bench_kernels.py
--sweep` on an H100 (llama3-8b o and down projections, M = 1 and 64).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from .common import check_inputs, pow2_at_least

NUM_SMS = 132  # H100 SXM
TARGET_PROGRAMS = 256  # about two per SM (sweep, llama3-8b down M=1: split 8 beat split 14)
MIN_BLOCKS_PER_SPLIT = 4  # below this a program's K loop is too short to pipeline
# W4A16 up to this M: the GEMV kernel (no tensor cores; w4a16_gemv.py). On the H200 it beat the
# tensor-core kernel at M = 1 on gate_up and down (50.9 vs 77.9, 33.5 vs 39.4 us) and lost from
# M = 4 on (gate_up 164 vs 73 us): its FMAs grow with M, the MMA's do not.
GEMV_MAX_M = 1
# W4A16 MMA sizes up to ASM_DEQUANT_MAX_M: convert nibbles with inline PTX (Tiles.asm_dequant)
# instead of jnp bit ops. H200 (benchmarks/engine/h200_step_asm.json): the batch-16 decode step
# 5.78 -> 5.51 ms; at M = 64 the kernel table was mixed (gate_up 91.8 -> 82.5 us, o 21.0 -> 37.1),
# so verify sizes keep the jnp path.
ASM_DEQUANT = True
ASM_DEQUANT_MAX_M = 32
DEQUANT_MIN_M = 256  # W4A16 at this M and above: dequantize, then XLA's 16-bit dot (prefill, big verify)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Static launch configuration of one kernel call.

    bm, bn: output tile (powers of 2, bm >= 16 because tt.dot needs 16 rows);
    split: number of K ranges (divides the number of packing blocks);
    unroll: packing blocks per K-loop iteration (divides the blocks of a K range): more weight
      bytes in flight per iteration and fewer loop trips;
    swap: W4A16 only, compute y^T = W^T x^T so the unpacked weights are the MMA's first operand
      (Hopper's wgmma can read it from registers; the second operand must come from shared memory);
    bias_dequant: W4A16 with 16-bit x only, build the dequantized weights from bits (integer ops)
      instead of int -> float conversions, and subtract the resulting offset (w4a16.py);
    asm_dequant: bias_dequant with the conversion done by inline PTX (w4a16.py), 16-bit x only;
    dequant: W4A16 only, for prefill-size M: a Pallas kernel writes the dequantized weight in
      x's dtype and XLA's 16-bit dot (cuBLAS) multiplies; bm, bn and split are then unused.
    """

    bm: int
    bn: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1
    swap: bool = False
    bias_dequant: bool = False
    asm_dequant: bool = False
    dequant: bool = False


def _split(grid_mn: int, nblocks: int) -> int:
    """Smallest divisor of nblocks giving TARGET_PROGRAMS programs, keeping each K range long
    enough to pipeline."""
    split = 1
    for d in range(1, nblocks + 1):
        if nblocks % d:
            continue
        if nblocks // d < MIN_BLOCKS_PER_SPLIT:
            break
        split = d
        if grid_mn * d >= TARGET_PROGRAMS:
            break
    return split


def choose_tiles(M: int, N: int, K: int, pb: int, kind: str = "w4a16") -> Tiles:
    """Tiles for an [M, K] x [K, N] int4 matmul whose weight is packed in blocks of pb rows."""
    # W4A4's int8 path ran fastest with bm <= 32 on the H100 (M=64: 33 us at bm 32, 44 at 64).
    bm_max = 32 if kind != "w4a16" else 128 if M > 64 else 64
    bm = min(max(16, pow2_at_least(M)), bm_max)
    bn = 128 if N >= 128 else max(16, pow2_at_least(N))
    # Prefer a bn that divides N (no masks); N not a multiple of 32 keeps 128 and masks the edge.
    for cand in (bn, bn // 2, bn // 4):
        if cand >= 32 and N % cand == 0:
            bn = cand
            break
    nblocks = K // pb
    split = _split(-(-M // bm) * -(-N // bn), nblocks)
    # K with few divisors (Llama-2 down: 11008 = 86 blocks of 128) can leave the grid short of
    # one program per SM: narrower N tiles make more programs instead.
    while -(-M // bm) * -(-N // bn) * split < NUM_SMS and bn > 32 and N % (bn // 2) == 0:
        bn //= 2
        split = _split(-(-M // bm) * -(-N // bn), nblocks)
    wide = bm * bn >= 128 * 128
    w4a16 = kind == "w4a16"
    return Tiles(
        bm=bm,
        bn=bn,
        split=split,
        num_warps=8 if wide else 4,
        num_stages=3 if wide else 4,
        # H100 probe (benchmarks/kernels/h100_probe_*.json, llama3-8b qkv/gate_up/down): bit-built
        # dequantization is 10-25% faster at M = 64 and slower at M = 128; the transposed product
        # is 3-6% faster at M = 128; quantizing activations in a separate pass beat the fused
        # quantizer (gone since commit 09cc211) at every M measured (gate_up M = 16: 56 vs 75 us, M = 64: 112 vs 171 us).
        # H200 sweep (benchmarks/engine/h200_sweep.json): bit-built dequantization also wins at
        # M = 16 (qkv 28.0 -> 23.4 us, down 42.8 -> 40.2 us); at M = 4 on gate_up it lost (H200 run 4:
        # 90.9 us against 72.9 without it in run 1).
        bias_dequant=w4a16 and 16 <= M <= 64,
        asm_dequant=w4a16 and ASM_DEQUANT and M <= ASM_DEQUANT_MAX_M,
        swap=w4a16 and M > 64,
        # H100 (benchmarks/kernels/h100_dequant.json, llama3-8b): from M = 256 on, dequantizing to
        # bf16 and calling XLA's dot beats the matmul kernel on every projection (1.1-1.3x at 256,
        # 1.6-1.7x at 512, 2.5-2.9x at 4096); at M = 128 the kernel wins on three of four.
        dequant=w4a16 and M >= DEQUANT_MIN_M,
    )


class CallPlan(NamedTuple):
    """The shapes of one int4 matmul call and its tiles (plan_call)."""

    K: int  # input features
    N: int  # output features
    G: int  # scale groups of the weight (1: per channel)
    gs: int  # group size (K when per channel)
    pb: int  # packing block: weight rows per nibble block (the group, or 128 per channel)
    lead: tuple  # x's leading dimensions
    x2: jax.Array  # [M, K]: x with its leading dimensions flattened
    M: int  # rows of x2
    tiles: Tiles
    nblocks: int  # K // pb packing blocks


def plan_call(x, qw, tiles: Tiles | None, kind: str) -> CallPlan:
    """Check a kernel call's shapes and pick its tiles (choose_tiles unless given)."""
    K, N, G, gs, pb = check_inputs(x, qw, kernel=True)
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    M = x2.shape[0]
    tiles = tiles or choose_tiles(M, N, K, pb, kind)
    nblocks = K // pb
    if nblocks % tiles.split:
        raise ValueError(f"split={tiles.split} does not divide the {nblocks} packing blocks")
    if (nblocks // tiles.split) % tiles.unroll:
        raise ValueError(f"unroll={tiles.unroll} does not divide the {nblocks // tiles.split} "
                         "packing blocks of a K range")
    return CallPlan(K, N, G, gs, pb, lead, x2, M, tiles, nblocks)
