"""Decode attention partials in Pallas Mosaic GPU (Hopper wgmma) over a bf16 cache or QuantSpec's
hierarchical INT8/INT4 planes: the contract of decode_attention.attention_partials, so
decode_attention.merge_partials combines its partials with any other launch's.

One program (one warpgroup) per (batch row, kv head, context split), as in the Triton kernel. The
M query rows of one kv head (rep heads x T positions) are few and wgmma's M side is 64 rows, so every
product is computed transposed: KV on the 64-row side, the query rows on the N side, padded to
tm = a power of 2 >= 16 (`row_tile`).

- Scores: S^T [64 tokens, tm] = K_tile [64, hd] @ Q^T. Q^T is B read K-major (Q [tm, hd] in SMEM
  through a transposed view): with a 64-row accumulator and 16 columns, Mosaic's layout inference
  accepts no N-major B (it cannot split 16 bf16 columns into two lane groups of one swizzle).
- Values: O^T [hd, tm] += V^T [hd, 64] @ P^T [64, tm], one 128-row MMA. P^T, the softmax of S^T in
  registers, is stored to SMEM as it lies (N-major). wgmma takes one swizzle for A and B and 16
  bf16 columns allow only 32 B, so the value MMA's A tiles are 32B-swizzled.
- Online softmax in f32 per query row across the tiles: m, l are [tm] vectors (reductions over the
  64 token rows of S^T), and O^T is rescaled per column.

Quantized planes (format: decode_attention's module docstring). Byte i of a plane row holds channel
i in its low nibble and channel i + hd/2 in its high nibble; the codes come out of registers with
integer masks and shifts (on int16: Mosaic GPU has no 8-bit shifts): the INT4 view's code is u
(0..15), value u * s + m; the INT8 view's code is 16 u + l (0..255), value (16 u + l - 8) * s / 16 + m.

- Keys (s, m per channel per group of G tokens, G a multiple of the 64-token tile, so one scale row
  per tile): the two nibble halves of a [64, hd/2] byte tile are dequantized in registers, one f32
  multiply-add per element with the channel's (s * cs, m - 8 s cs), rounded to bf16 and fed to wgmma
  as A from registers: two MMAs, one per channel half of Q. (Folding the scale into Q instead, as the
  Triton kernel does, needs the scaled [tm, hd/2] tile stored to a swizzled B buffer from registers,
  which the layout inference of jax 0.10.2 refused for 16 rows; it is a candidate once tm >= 32.)
- Values (s, m per token): s * cs is folded into P^T (one [64, tm] multiply), the minimum and the
  INT8 offset enter per column as sum_t p m - 8 sum_t ps, so the MMA runs on exact codes. The
  [hd/2, 64] byte tile (value planes are stored transposed, [hd/2, S]) unpacks into the low-nibble
  channels (rows 0..hd/2-1 of V^T) and the high ones (rows hd/2..hd-1), written to one [hd, 64] SMEM
  A operand. (A from registers would need two 64-row MMAs, hence an N-major P^T of >= 32 columns.)

v2 (`version=2`, quantized variants): the per-element work is reduced to an unpack and no
arithmetic conversion. The query rows are padded to tm >= 32, which lets Q'^T and P'^T be N-major B
operands (64-byte swizzle) written from registers in the WGMMA layout.
- Codes: a byte tile is widened to int16 (no 8-bit shifts in Mosaic GPU), a nibble is taken with a
  mask or shift and OR-ed with 0x4300; bitcast to bf16 that is exactly 128 + u (bf16 holds the
  integers 128..255), so no convert instruction. The INT8 view's two planes are two such MMAs each,
  combined as 16 acc_upper + acc_lower on the [64, tm] accumulators.
- Keys: Q'^T [2, hd/2, tm] = Q^T * (s cs) per channel row, computed into SMEM once per key group (a
  `pl.when` at a group's first tile or a split's first tile), is the B operand; the nibble tiles
  [64 tokens, 64 channels] are A from registers. The rest of the score, q . m - (offset + 128 W)
  sum_c Q'_c (W = 1 for INT4, 17 for INT8's 16 + 1), depends only on the key group and the query row:
  the wrapper computes it ([B, KV, S/G, tm] f32, a small XLA op outside the kernel) with Q' rounded
  to bf16 exactly as the kernel rounds it, so the 128 offset cancels to f32 rounding; the kernel
  adds its row of the tile's group. The key minimums are not read by the kernel.
- Values: P' = bf16(P * s cs) per token is B [64, tm] in SMEM; the value tile's two nibble halves
  are two 64-row A operands from registers (channels 0..hd/2-1 and hd/2..hd-1, two accumulators),
  so V^T never goes through SMEM; the minimum and the offsets enter per column as
  sum_t p m - (offset + 128 W) sum_t p'.
v3 (`version=3`): v2 with the key planes read as int4: the wrapper bitcasts each [S, hd/2] uint8
plane to int4 [S, hd] (XLA's packing: element 2i is byte i's low nibble, so the channels come
interleaved [c0, c64, c1, c65, ...]; Q^T and the key scales are interleaved to match), TMA loads the
int4 tile, and the registers get `(tile ^ int4(-8)).astype(bf16)`: the xor makes the signed view of
a nibble u equal to u - 8 (a constant, folded into the bias as -8 W), and the int4 -> bf16 cast is
Mosaic's CUTLASS-style sequence (prmt / lop3 / sub.bf16x2, several nibbles per instruction). One
K = hd MMA per plane. Whether XLA makes the uint8 -> int4 bitcast free on the GPU (it should be a
no-op on packed int4) shows in the benchmark as an extra kernel outside the attention kernel. The
values keep v2's path (an int4 view of the transposed value planes interleaves two channels along
the token axis, which needs a B operand with interleaved rows).
v4 (`version=4`, quantized variants): v1's body (tm = 16, the keys dequantized in registers, V^T
codes through SMEM) in f16, with the codes built from bits instead of converted. The CUDA
programming guide's throughput table gives 16 type conversions a clock per SM on compute capability
9.0, an eighth of the f32 FMA rate, and v1 converts every code twice (to f32, then the dequantized
key or the value code to bf16): a bound to test, not a measured one. In v4 a
nibble code c (0..15, or 16 u + l = 0..255 for INT8) is OR-ed with 0x6400 and bitcast to f16, which is
exactly 1024 + c; subtracting 1024 in f16 leaves c exactly. The keys are then c * (s cs) + (m - 8 s
cs) in f16 arithmetic (the scale and shift rounded to f16, an error of 2^-11 relative, against v1's
bf16 rounding of the key at 2^-8), the value codes go to SMEM as they are, P^T is rounded to f16,
and Q is f16 (a bf16 query converts exactly unless it is below f16's normal range, 6e-5). f16 holds
every INT8 code exactly; bf16 (8 significant bits) could not hold 1024-style offsets of 0..255.

v5 (`version=5`, quantized variants): v4 with the codes unpacked a 32-bit word at a time
(packed_codes.py). The ninth session's PTX of v4 showed its per-code work as 16-bit scalar integer
ops on codes loaded two bytes a thread (wgmma's register layout). v5 loads each plane tile in
WGMMA_UPCAST_2X (four consecutive bytes a thread), builds four code bytes per word with masks and
shifts (INT8: 16 u + l from both planes' words) and each f16 pair 1024 + code with one `prmt`. The
keys are dequantized in that layout by packed f16 ops, then relabelled as wgmma's A operand without
moving data, which permutes each 16-channel block (packed_codes.column_order), so the wrapper
permutes Q's channels to match. The value codes go to SMEM as 1024 + code (no subtraction): the
deferred shift term takes 1024 sum_t ps more. The key scale s cs and shift m - 8 s cs are computed
in f16 from the cache's f16 scales (v4 too): cs and 8 cs are powers of two, so the shift is rounded
once, as the f32 path rounds it, and the step has no f16 <-> f32 conversions of scales (the H100's
PTX of a step: 941 -> 843 instructions on INT8, 795 -> 677 on INT4).

v6 (`version=6`, quantized variants): v5 with the mask paid only where it cuts. The H100's PTX of a
v5 step spends about 50 of its 677 (INT4) / 843 (INT8) instructions on the mask: an iota, two
compares and two selects per score. A tile every real query row sees in full (from the highest
lo to the lowest hi over the real rows, a [first, end) tile range per batch row that the wrapper
passes beside each split's tiles) needs none, so a uniform `lax.cond` on the tile index takes an
unmasked path there; in decode only the last tile of a row's context (and, in verify, the tile of
the last gamma positions) is masked. Without a "from" cut every row's lo is 0, so the masked path
compares with hi only. Padding rows (zero queries) are left unmasked on interior tiles: their
partials are finite and dropped by the caller.
v7 (`version=7`, quantized variants): v6 with `approx_math` (exp as one multiply and `ex2.approx`).
The same PTX shows jnp.exp's accurate sequence, about 8 instructions for each of a step's 12
exponentials a thread (INT4, 64-token steps); ex2.approx's relative error (about 2^-22) is far
below P's f16 rounding. Measured on the H100 (batch 16, decode_attention's call): INT4 at
128-token steps 92.8 -> 84.8 (v6) -> 82.7 us (v7) at 8k, 324.5 -> 290.8 -> 285.7 at 32k; INT8 at
64-token steps 134.7 -> 133.9 -> 132.1 at 8k, where the mask and exp were a smaller share.

v8 (`version=8`, quantized variants): v7 with the query rows padded to 8 columns, not 16 (wgmma's
N side can be 8; a decode step has rep = 4 real rows a kv head, so v7 spent 3/4 of every softmax
operation on padding, v8 1/2). A bf16 B tile N-major needs rows of at least 32 bytes, which 8
columns are not, so P^T is written K-major: stored through a transposed view of a [tm, kv_tile]
buffer (rows of 128 / 256 bytes, a 128-byte swizzle, so the V^T codes' A buffer takes the same
swizzle) and read by the value MMA through a transposed view, as the weight kernels read x^T.
Transposed stores of 16-bit register tiles lower on jax 0.11.2, not on jax 0.10.2 (int4_mosaic.py's
token-major epilogue), so v8 is lowered on the GPU only; the interpreter runs the same math with P^T
stored as it lies. decode_attention passes the real query rows (rep x T), not rows padded to 16.

kv_tile (v1, v4 to v8, bf16): tokens per pipeline step, 64 (one MMA row group) or 128 (two). A step
carries work that does not grow with its tokens (the TMA wait, the score and value MMAs' waits, the
softmax reductions across the warpgroup's four warps, the SMEM fences before the value MMA); 128
pays it half as often, for twice the registers of the key tiles.

Deferred sums (v1, v4 to v8, bf16): a step's only reduction across the warpgroup's four warps is the
running maximum over the tile's tokens; the softmax denominators l and the values' per-column
minimum and offset term (sum_t p m - offset sum_t ps) are linear in p, so each thread keeps its own
rows' share in a [kv_tile, tm] tile rescaled with o, and the warps combine them once, after the
last step. (v2 / v3 reduce them every step.)

Masking: every query row r sees the slots [lo_r, hi_r), computed by the wrapper from its position,
the cache length n, the offset of slot 0 and its cut c(p) (kv_cut.py); the kernel compares an iota
with two [tm] vectors. Padding rows see nothing.

Splits are dynamic, as in the Triton kernel: the tiles any query row of a batch row can see (from
the lowest lo to the highest hi) are divided evenly among the `splits` programs (`_tile_ranges`, a
[first, count] pair per program that the kernel reads from SMEM), so a short row reads only its own
tiles. Pipeline: `plgpu.emit_pipeline` over that dynamic count TMA-loads each tile's planes and scale
rows into a `stages`-deep SMEM ring.

Interpreter (`interpret=True`: jax 0.10.2's Mosaic GPU interpreter on CPU): its wgmma reads A from
SMEM and B untransposed only, and it has no layouts, so there the dequantized keys and V^T are staged
through SMEM scratch and Q comes pre-transposed; the rest of the body is the same code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from .common import is_hopper
from .decode_attention import NEG, VARIANTS, QuantKV, pick_splits, plane_names
from .kv_cut import cut_position
from .packed_codes import F16_BASE, as_wgmma, in_column_order, unpack_bytes

TILE = 64  # KV tokens per pipeline step by default: wgmma's M side for the scores
KV_TILES = (64, 128)  # v1 / v4 to v8 / bf16 may take 128 tokens a step (two 64-row MMA groups), v2 / v3 64 only
MAX_ROWS = 256  # wgmma's largest N: query rows per kv head
SMEM_BYTES = 227 * 1024  # per program
SM_SMEM_BYTES = 228 * 1024  # per SM
MAGIC = 128  # v2: bf16 bits 0x4300 | u (u = 0..15) are the number 128 + u
K_MAGIC_V3 = -8  # v3's keys: the int4 view's (u ^ 8) converts to u - 8


VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
NARROW = 8  # from this version, 8 query columns (module docstring, "v8")
FOLDED = (2, 3)  # the bodies that fold the scales into Q and P (tm >= 32, 64-token steps); 1, 4 to 8 share v1's
F16_MAGIC = 0x6400  # v4: f16 bits 0x6400 | c (c = 0..1023) are the number 1024 + c


def row_tile(M: int, version: int = 1) -> int:
    """Query rows on the MMA's N side: M padded to a power of 2 >= 16 (16-bit N-major B tiles need
    32-byte rows); >= 32 on the quantized v2 path (module docstring, "v2"), >= 8 from v8 ("v8")."""
    least = 32 if version in FOLDED else 8 if version >= NARROW else 16
    return max(least, 1 << (M - 1).bit_length())


def int4_view(planes):
    """[..., n] uint8 -> [..., 2n] int4, element 2i the low nibble of byte i (XLA's packing): channels
    interleaved [c0, c_n, c1, c_n+1, ...] for the key planes (v3)."""
    return lax.bitcast_convert_type(planes, jnp.int4).reshape(*planes.shape[:-1], 2 * planes.shape[-1])


def interleave(x):
    """[..., hd] with channels reordered as int4_view's: [c0, c_hd/2, c1, c_hd/2+1, ...]."""
    h = x.shape[-1] // 2
    return jnp.stack([x[..., :h], x[..., h:]], axis=-1).reshape(x.shape)


def _kib(nbytes: int) -> int:
    """A shared-memory buffer's footprint: Mosaic GPU aligns every buffer to 1 KiB."""
    return -(-nbytes // 1024) * 1024


def smem_bytes(variant: str, M: int, hd: int, stages: int, version: int = 1, kv_tile: int = TILE) -> int:
    """Dynamic shared memory of one program, each buffer 1 KiB-aligned as Mosaic GPU allocates it:
    the larger of the pipeline phase (the ring of `stages` copies of every block, its barriers, the
    kernel's scratch) and the epilogue (the scratch and the output's buffers, which take the ring's
    space once the pipeline has returned). The H100's Nsight Compute read 66 / 50 KiB (INT8 / INT4,
    64-token steps, 2 stages; 67.61 / 51.22 KB with 16 B of barriers), as this model says, and
    75 / 59 KiB before the output's buffers left the scratch."""
    quant = variant != "bf16"
    folded = quant and version in FOLDED
    tm = row_tile(M, version if quant else 1)
    planes = 2 if variant == "int8" else 1
    if quant:  # key planes, key scale rows (+ minimums, or v2's bias), value planes, value scales / minimums
        k_extra = tm * 4 if folded else hd * 4
        blocks = [kv_tile * hd // 2] * 2 * planes + [hd * 4, k_extra] + [kv_tile * 4] * 2
    else:
        blocks = [kv_tile * hd * 2] * 2
    blocks.append(tm * hd * 2)  # Q
    ring = sum(_kib(stages * b) for b in blocks) + 1024  # + the pipeline's barriers
    scratch = [kv_tile * tm * 2, 16, 2 * tm * 4, 16]  # P^T, the split's tile range, the rows' bounds, barriers
    if folded:
        scratch.append(tm * hd * 2)  # Q'
    elif quant:
        scratch.append(hd * kv_tile * 2)  # V^T codes, the value MMA's A operand
    scratch = sum(_kib(b) for b in scratch)
    epilogue = _kib(hd * tm * 4) + _kib(2 * tm * 4)  # O^T, m and l
    return scratch + max(ring, epilogue)


def resident_programs(variant: str, M: int, hd: int, stages: int, version: int = 1, kv_tile: int = TILE) -> int:
    """Programs an SM holds at once by shared memory (228 KiB, 1 KiB of it reserved per program):
    what a config's programs_per_sm may ask for. (Registers allow 4: 128 a thread, 128 threads.)"""
    return min(4, SM_SMEM_BYTES // (smem_bytes(variant, M, hd, stages, version, kv_tile) + 1024))


def supported(variant: str, M: int, hd: int, S: int, group: int | None, splits: int, stages: int = 2,
              version: int = 1, kv_tile: int = TILE) -> str | None:
    """Why these shapes cannot run on the Mosaic kernel, or None when they can."""
    if version not in VERSIONS:
        return f"version must be one of {VERSIONS}, got {version!r}"
    if kv_tile not in KV_TILES or (kv_tile != 64 and version in FOLDED and variant != "bf16"):
        return f"kv_tile must be one of {KV_TILES} (64 on the v2 / v3 paths), got {kv_tile!r}"
    if variant not in VARIANTS:
        return f"variant must be one of {VARIANTS}, got {variant!r}"
    if not 1 <= M <= MAX_ROWS:
        return f"{M} query rows per kv head is outside 1..{MAX_ROWS}"
    if hd != 128:  # the value MMA's 128 rows (module docstring); the key halves' 64 channels
        return f"head_dim must be 128, got {hd}"
    if S % kv_tile:
        return f"the cache length {S} is not a multiple of the {kv_tile}-token tile"
    if group is not None and group % kv_tile:
        return f"the key group {group} is not a multiple of the {kv_tile}-token tile"
    if not 1 <= splits <= S // kv_tile:
        return f"splits={splits} is outside 1..{S // kv_tile} (the cache's tiles)"
    if stages < 1 or smem_bytes(variant, M, hd, stages, version, kv_tile) > SMEM_BYTES:
        return f"{stages} pipeline stages do not fit in shared memory"
    return None


# Programs an SM is taken to hold at once, for the split count where a config names none: 2, what
# shared memory allowed every quantized body until the output's buffers moved past the pipeline
# (resident_programs: since then 3 at INT8's 64-token steps, 4 at INT4's, 2 at 128-token steps).
PROGRAMS_PER_SM = 2


def choose_splits(batch: int, kv_heads: int, S: int, kv_tile: int = TILE,
                  programs_per_sm: float = PROGRAMS_PER_SM) -> int:
    """Context splits for a cache of S slots: decode_attention.pick_splits over kv_tile-token tiles."""
    return pick_splits(batch, kv_heads, S // kv_tile, programs_per_sm)


KERNELS = ("auto", "mosaic", "triton")  # decode_attention's `kernel`
# Variant -> the config of this kernel that measured faster than the Triton kernel on sm_90, at batch
# 16 x 8k and 32k, timed as decode_attention calls it (the partials merged): what
# kernel="auto" runs there. H100, twelfth session (benchmarks/kv/README.md, h100_attention_v6_sweep_1a33f15):
# INT8 v7 132.1 / 509.1 us against Triton's 168.3 / 599.4 (1.27x / 1.18x; v5 134.7 / 513.1), INT4 v7
# at 128-token steps 82.7 / 285.7 against 113.8 / 405.4 (1.38x / 1.42x; v5 92.8 / 324.5). bf16 stays
# on Triton (v1 measured slower). Thirteenth session (h100_attention_residency_sweep_11b02c4): INT8 at
# 3 programs an SM (3 splits at 16 x 8k) 129.1 / 475.2 against 129.9 / 494.7 at 2.
# Fourteenth session (h100_attention_v8_*_2e69c5f), the model's 4 real rows a kv head: v8 INT4 at
# 128-token steps 73.6 / 252.9 us against v7's 82.4 / 285.3 and Triton's 113.2 / 408.6; INT8 at
# 3 splits 130.7 / 482.7 against v7's 131.1 / 489.4 and Triton's 168.4 / 602.3.
FASTER: dict[str, dict] = {"int8": dict(version=8, stages=2, programs_per_sm=3),
                           "int4": dict(version=8, stages=2, kv_tile=128)}
# "auto" takes FASTER's configs only for caches of at least this many slots (batch x slots), the
# measured win (16 x 8k). End to end on the H100 at 1 x 8k, QuantSpec ran 2.5% slower with them
# (5.64 against 5.50 ms a token): a small launch is dominated by the wrapper's few small XLA ops.
MIN_CACHE_TOKENS = 16 * 8192
FORCED = dict(version=7)  # kernel="mosaic" where no measured config runs the launch (bf16 runs v1)
# decode_attention calls the jitted attention_partials (True) or its body inline (False). An A/B
# switch: after the jit, QSpec on the INT8 cache measured 0.99x W4A16 at 16 x 8k on two H100 hosts,
# against 1.04x before it on a third (benchmarks/kv/README.md, twelfth session).
JIT = True


def cache_dims(variant: str, kv) -> tuple:
    """(B, KV, S, hd, group) of a launch's cache: bf16 (k, v) [B, KV, S, hd] or a QuantKV (group None
    for bf16)."""
    if variant == "bf16":
        B, KV, S, hd = kv[0].shape
        return B, KV, S, hd, None
    if not isinstance(kv, QuantKV):
        raise ValueError(f"variant {variant!r} takes QuantKV planes")
    B, KV, S, half = kv.k_upper.shape
    return B, KV, S, 2 * half, S // kv.k_scale.shape[2]


def choose(kernel: str, variant: str, M: int, kv, splits=None, interpret: bool = False) -> dict | None:
    """The config decode_attention runs this kernel with, or None for the Triton kernel. kernel:
    "triton"; "mosaic" (FASTER's config where the shapes allow it, else FORCED; a ValueError if
    neither runs them); "auto" (FASTER's config on sm_90 for caches of MIN_CACHE_TOKENS slots or more
    where the shapes allow it, else None)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "triton" or (kernel == "auto" and (interpret or variant not in FASTER or not is_hopper())):
        return None
    B, KV, S, hd, group = cache_dims(variant, kv)
    if kernel == "auto" and B * S < MIN_CACHE_TOKENS:
        return None
    configs = [FASTER[variant]] if variant in FASTER else []
    if kernel == "mosaic":  # bf16's forced config is v1 (nothing to unpack)
        configs.append({} if variant == "bf16" else FORCED)
    why = None
    for config in configs:
        kv_tile = config.get("kv_tile", TILE)
        per_sm = config.get("programs_per_sm", PROGRAMS_PER_SM)
        n_splits = splits or (choose_splits(B, KV, S, kv_tile, per_sm) if S >= kv_tile else 1)
        why = supported(variant, M, hd, S, group, n_splits, config.get("stages", 2), config.get("version", 1), kv_tile)
        if why is None:
            return config
    if kernel == "mosaic":
        raise ValueError(f"the Mosaic attention cannot run this launch: {why}")
    return None


def _swizzled(minor_bytes: int, bits: int, kind: str):
    """SMEM tiling + swizzle for a tile whose rows are minor_bytes long (none under 32 B)."""
    if minor_bytes < 32:
        return ()
    swizzle = plgpu.find_swizzle(minor_bytes * 8, kind)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def _bounds(row_pos, n, off, tm, cut, cut_side):
    """[B, 2, tm] int32: the visible slot range [lo, hi) of each query row (module docstring)."""
    B, M = row_pos.shape
    pos = jnp.pad(row_pos.astype(jnp.int32), ((0, 0), (0, tm - M)), constant_values=-1)
    off = off.astype(jnp.int32)[:, None]
    hi = jnp.minimum(n.astype(jnp.int32)[:, None], pos - off + 1)
    lo = jnp.zeros_like(hi)
    if cut_side is not None:
        c = cut_position(pos, int(cut[0]), int(cut[1])) - off
        hi = jnp.minimum(hi, c) if cut_side == "below" else hi
        lo = jnp.maximum(c, 0) if cut_side == "from" else lo  # >= 0: the first tile read is in the cache
    hi = jnp.where(pos < 0, 0, hi)  # padding rows see nothing
    return jnp.stack([lo, hi], axis=1)


def _tile_ranges(bounds, real, S, P, kv_tile):
    """[B, P, 4] int32: (first tile, tile count, first full tile, end of the full tiles) of each
    split, in tiles of kv_tile tokens. The tiles any query row of a batch row can see are divided
    evenly among the P splits, as in the Triton kernel; the full tiles [first, end) are those every
    real row (`real` [B, tm] bool) sees in full (v6; empty where a real row sees nothing)."""
    lo, hi = bounds[:, 0], bounds[:, 1]  # [B, tm]
    seen = hi > lo
    start = jnp.min(jnp.where(seen, lo, S), axis=1) // kv_tile  # [B]
    end = (jnp.max(jnp.where(seen, hi, 0), axis=1) + kv_tile - 1) // kv_tile
    total = jnp.maximum(end - start, 0)
    per = (total + P - 1) // P
    split = jnp.arange(P, dtype=jnp.int32)
    first = start[:, None] + split * per[:, None]
    count = jnp.clip(total[:, None] - split * per[:, None], 0, per[:, None])
    full_first = -(-jnp.max(jnp.where(real, lo, 0), axis=1) // kv_tile)  # ceil
    full_end = jnp.maximum(jnp.min(jnp.where(real, hi, S), axis=1) // kv_tile, full_first)
    per_split = lambda x: jnp.broadcast_to(x[:, None], first.shape)  # noqa: E731  the same for every split
    return jnp.stack([first, count, per_split(full_first), per_split(full_end)], axis=-1).astype(jnp.int32)


# Jitted with its static knobs so that a model whose layers are unrolled lowers the kernel once per
# shape, not once per call site (each Mosaic GPU lowering takes about a second on the host).
@functools.partial(jax.jit, static_argnames=("variant", "sm_scale", "splits", "stages", "interpret", "cut",
                                             "cut_side", "version", "kv_tile", "programs_per_sm"))
def attention_partials(q_rows, row_pos, kv, n, off, *, variant, sm_scale, splits=None, stages=2,
                       interpret=False, cut=None, cut_side=None, version=1, kv_tile=TILE,
                       programs_per_sm=PROGRAMS_PER_SM):
    """One launch: unnormalized partials over the slots [0, n) of `kv`, slot j at position off + j
    (decode_attention.attention_partials' contract; merge with decode_attention.merge_partials).
    With cut=(G, D) and cut_side "below" / "from", a query row at position p reads only the positions
    below / from its cut c(p).

    q_rows: [B, KV, M, hd] query blocks; row_pos: [B, M] int32 query positions (-1 for padding);
    kv: (k, v) [B, KV, S, hd] for "bf16" or a QuantKV (value planes [B, KV, hd/2, S]); n, off: [B] int32;
    splits: context splits (programs per row and kv head), None for choose_splits (with
    programs_per_sm: the programs an SM is taken to hold at once);
    stages: pipeline depth (TMA loads in flight per program);
    kv_tile: KV tokens per pipeline step (KV_TILES; 128 on the v1, v4 to v8 and bf16 paths halves the steps,
    so each step's fixed work, the softmax reductions across the warpgroup and the MMA waits, is
    spread over twice the tokens);
    version: 1 (dequantize the keys in registers, values through SMEM), 2 (raw codes into the MMAs,
    scales folded into Q and P: module docstring, "v2"), 3 (v2, keys through an int4 view), 4 (v1
    in f16, the codes built from bits: "v4"), 5 (v4 unpacking 32-bit words: "v5"), 6 (v5 with
    the mask only on tiles some real row sees in part: "v6"), 7 (v6 with exp as ex2.approx:
    "v7") or 8 (v7 on 8 query columns: "v8"); the bf16 variant runs version 1 either way.
    Returns o [B, KV, P, M, hd] f32 (unnormalized), m and l [B, KV, P, M] f32.
    """
    B, KV, M, hd = q_rows.shape
    S, group = cache_dims(variant, kv)[2::2]
    if variant == "bf16":
        operands = [x.astype(jnp.bfloat16) for x in kv]  # the MMA's type (no copy if bf16)
    else:
        names = plane_names(variant)
        operands = [getattr(kv, x) for x in names]
    if splits is None:
        splits = choose_splits(B, KV, S, kv_tile, programs_per_sm) if S >= kv_tile else 1
    if variant == "bf16":
        version = 1  # nothing to fold: v2 is the quantized path
    why = supported(variant, M, hd, S, group, splits, stages, version, kv_tile)
    if why:
        raise ValueError(why)
    if (cut is None) != (cut_side is None) or cut_side not in (None, "below", "from"):
        raise ValueError(f"cut (G, D) and cut_side ('below' / 'from') go together, got {cut}, {cut_side!r}")
    tm = row_tile(M, version)
    v2 = version in FOLDED  # v3 is v2 with the keys read through an int4 view
    v3 = version == 3
    # v4 to v8 each add one change to the version before (module docstring)
    f16_codes = version >= 4  # v1's body in f16, the codes from bits
    packed = version >= 5  # the codes unpacked a 32-bit word at a time (packed_codes.py)
    interior = version >= 6  # the mask only on tiles some real row sees in part
    approx_exp = version >= 7  # exp as ex2.approx
    narrow = version >= NARROW  # 8 query columns, P^T stored K-major
    p_kmajor = narrow and not interpret  # the interpreter has no transposed views: P^T as it lies
    hi_only = interior and cut_side != "from"  # every row's lo is 0: the mask compares with hi only
    cdt = jnp.float16 if f16_codes else jnp.bfloat16  # the MMAs' operand type
    P = splits
    hd2 = hd // 2
    quant = variant != "bf16"
    cs = 1.0 if variant == "int4" else 1.0 / 16  # code scale: value = code * cs * s + m
    offset = 8.0 if variant == "int8" else 0.0  # INT8 codes are 16u + l; the value's code is 16u + l - 8
    bf16, f32 = jnp.bfloat16, jnp.float32
    parts = 2 if quant else 1  # channel halves: one MMA per nibble half of the key planes
    q = jnp.pad(q_rows, ((0, 0), (0, 0), (0, tm - M), (0, 0))).astype(cdt)
    q = q.reshape(B, KV, tm, parts, hd // parts).transpose(0, 1, 3, 2, 4)  # [B, KV, parts, tm, hd/parts]
    if packed:  # the keys' channels come out of packed_codes.as_wgmma in column_order: Q's to match
        q = in_column_order(q)
    if interpret or v2:  # Q^T: the interpreter's wgmma takes B untransposed; v2 scales it per channel row
        q = q.swapaxes(-1, -2)
    bounds = _bounds(row_pos, n, off, tm, cut, cut_side)
    weights = (1,) if variant == "int4" else (16, 1)  # per plane: code = sum_p w_p * nibble_p
    if v2:
        # The key term that Q' = bf16(Q * s cs) and the raw codes leave out, per key group and query
        # row: q . m - (offset + MAGIC sum_p w_p) sum_c Q'_c (module docstring, "v2"). Q' is rounded
        # here exactly as in the kernel, so the MAGIC offset cancels to f32 rounding.
        qf = q.swapaxes(-1, -2).transpose(0, 1, 3, 2, 4).reshape(B, KV, tm, hd).astype(f32)  # [B, KV, tm, hd]
        ksf = kv.k_scale.astype(f32) * cs  # [B, KV, S/G, hd]
        # rounded to bf16 by reduce_precision: under jit XLA may drop an f32 -> bf16 -> f32 round trip
        # (excess precision allowed), which would break the MAGIC cancellation
        q_scaled = lax.reduce_precision(qf[:, :, None] * ksf[:, :, :, None, :], 8, 7)  # [B, KV, S/G, tm, hd]
        bias = jnp.einsum("bhrc,bhgc->bhgr", qf, kv.k_min.astype(f32), precision=lax.Precision.HIGHEST) \
            - (offset + (K_MAGIC_V3 if v3 else MAGIC) * sum(weights)) * q_scaled.sum(-1)  # [B, KV, S/G, tm]
        names = [x for x in names if x != "k_min"]
        operands = [getattr(kv, x) for x in names]
        operands.insert(names.index("k_scale") + 1, bias)
        if v3:  # key planes as int4 [S, hd] (interleaved channels); Q^T and the key scales to match
            for x in ("k_upper", "k_lower"):
                if x in names:
                    operands[names.index(x)] = int4_view(operands[names.index(x)])
            operands[names.index("k_scale")] = interleave(kv.k_scale)
            q = interleave(qf.astype(bf16)).swapaxes(-1, -2)[:, :, None]  # [B, KV, 1, hd, tm] (exact: qf is bf16)

    def mma(shape, pairs):
        """A fresh f32 accumulator of `shape` holding the sum of a @ b over the (a, b) pairs."""

        def run(acc_ref):
            for a, b in pairs:
                plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(run, plgpu.ACC(shape, f32))

    def body(q_gmem, bnd_gmem, rng_gmem, *refs, p_smem, rng_smem, bnd_smem, barriers, a_smem=None,
             ka_smem=None, qs_smem=None, kf_smem=None):
        # q_gmem [B, KV, parts, tm, hd/parts] bf16 ([B, KV, parts, hd/parts, tm] under the
        # interpreter); bnd_gmem [B, 2, tm] int32; then the cache operands (bf16: k, v
        # [B, KV, S, hd]; int8: ku, kl [B, KV, S, hd/2] u8, ks, km [B, KV, S/G, hd] f32, vu, vl
        # [B, KV, hd/2, S] u8, vs, vm [B, KV, S] f32; int4 without kl, vl); then o_gmem
        # [B, KV, P, hd, tm], m_gmem, l_gmem [B, KV, P, tm].
        *cache, o_gmem, m_gmem, l_gmem = refs
        b, h, s = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("s")
        # this split's tiles and the rows' bounds, once: a pipeline block of bounds would be
        # 2 x tm int32 a stage, 64 bytes at v8's tm = 8, off TMA's 128-byte alignment at stage 1
        plgpu.copy_gmem_to_smem(rng_gmem.at[b, s], rng_smem, barriers.at[0])
        plgpu.copy_gmem_to_smem(bnd_gmem.at[b], bnd_smem, barriers.at[1])
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        first, count = rng_smem[0], rng_smem[1]
        full_first, full_end = rng_smem[2], rng_smem[3]  # v6: the tiles every real row sees in full

        def tile(i):  # clamped into the cache: a split with no visible tile reads one, all masked
            return jnp.minimum(first + i, S // kv_tile - 1)

        def q_operand(q_s, j):  # Q^T [hd/parts, tm] of channel part j as wgmma's B
            return q_s.at[j] if interpret else plgpu.transpose_ref(q_s.at[j], (1, 0))

        def probs(i, scores, bnd, m_prev):
            """This tile's masked probabilities P^T [kv_tile, tm] f32 from the scaled scores S^T,
            the rescale of earlier columns [tm] and the new running maximum m."""
            def unmasked(scores):  # v6 takes it alone on a tile every real row sees in full
                m_next = jnp.maximum(m_prev, jnp.max(scores, axis=0))  # the step's one cross-warp reduction
                return jnp.exp(scores - lax.broadcast_in_dim(m_next, (kv_tile, tm), (1,))), m_next

            def masked(scores):
                slots = (first + i) * kv_tile + lax.broadcasted_iota(jnp.int32, (kv_tile, tm), 0)
                mask = slots < lax.broadcast_in_dim(bnd[1], (kv_tile, tm), (1,))
                if not hi_only:
                    mask = mask & (slots >= lax.broadcast_in_dim(bnd[0], (kv_tile, tm), (1,)))
                p, m_next = unmasked(jnp.where(mask, scores, NEG))
                return jnp.where(mask, p, 0.0), m_next

            if interior:
                full = (first + i >= full_first) & (first + i < full_end)
                p, m_next = lax.cond(full, unmasked, masked, scores)
            else:
                p, m_next = masked(scores)
            return p, jnp.exp(m_prev - m_next), m_next

        def softmax_probs(i, scores, bnd, m_prev, l_prev):
            """v2 / v3: P^T, the rescale, the new m and the row sums l, reduced every step."""
            p, corr, m_next = probs(i, scores, bnd, m_prev)
            return p, corr, m_next, l_prev * corr + jnp.sum(p, axis=0)

        def softmax_step(i, scores, bnd, carry):
            """v1 / v4 to v8 / bf16: P^T and the carry (o, m, l_acc, s_acc) with o rescaled, the new m and
            the deferred sums rescaled, p added to l_acc (the caller adds the values' shift to s_acc):
            each thread keeps its own rows' sums, reduced across the warpgroup once at the end
            (module docstring, "Deferred sums")."""
            o, m_prev, l_acc, s_acc = carry
            p, corr, m_next = probs(i, scores, bnd, m_prev)
            corr_t = lax.broadcast_in_dim(corr, (kv_tile, tm), (1,))
            return p, (o * lax.broadcast_in_dim(corr, (hd, tm), (1,)), m_next, l_acc * corr_t + p, s_acc * corr_t)

        def unpack(planes):
            """Codes of a tile of packed bytes (one or two planes) as two register tiles, f32 (v1) or
            f16 (v4, from bits: no conversion instruction): the low-nibble channels and the
            high-nibble channels (module docstring)."""
            planes = [x.astype(jnp.int16) for x in planes]  # Mosaic has no 8-bit shifts
            if len(planes) == 1:
                x = planes[0]
                lo, hi = x & 15, x >> 4
            else:
                u, l = planes
                lo, hi = ((u & 15) << 4) | (l & 15), (u & 0xF0) | (l >> 4)
            if f16_codes:  # 1024 + c from bits, minus 1024: exact (c < 256), two packed ops per pair
                return tuple(lax.bitcast_convert_type(y | jnp.int16(F16_MAGIC), cdt) - jnp.asarray(1024, cdt)
                             for y in (lo, hi))
            return lo.astype(f32), hi.astype(f32)

        def step_bf16(idx, q_s, bnd_s, k_s, v_s, carry):
            # q_s [1, tm, hd] bf16; bnd_s [2, tm]; k_s, v_s [64, hd] bf16
            (i,) = idx
            with jax.named_scope("scores"):
                scores = mma((kv_tile, tm), [(k_s, q_operand(q_s, 0))]) * sm_scale
            p, (o, m, l_acc, s_acc) = softmax_step(i, scores, bnd_s, carry)
            with jax.named_scope("values"):
                p_smem[...] = p.astype(bf16)
                if interpret:  # no transposed views in the interpreter: stage V^T
                    a_smem[...] = v_s[...].T
                    v_t = a_smem
                else:
                    v_t = plgpu.transpose_ref(v_s, (1, 0))  # [hd, 64]
                plgpu.commit_smem()
                o = o + mma((hd, tm), [(v_t, p_smem)])
            return o, m, l_acc, s_acc

        def packed_codes(refs):
            """v5: (lo, hi) codes of a tile's planes, f16 in cdt (1024 + code: F16_BASE), WGMMA_UPCAST_2X
            on the GPU; the interpreter (no layouts) builds the same numbers with v4's jnp path."""
            if interpret:
                return tuple(c + jnp.asarray(F16_BASE, cdt) for c in unpack([r[...] for r in refs]))
            up = plgpu.Layout.WGMMA_UPCAST_2X  # four consecutive bytes a thread: 32-bit loads
            return unpack_bytes([plgpu.load(r, (), layout=up, optimized=True) for r in refs])

        def step_quant(idx, q_s, bnd_s, *tiles_and_carry):
            # q_s [2, tm, hd/2] bf16; bnd_s [2, tm]; key planes [64, hd/2] u8; ks, km [1, hd] f32;
            # value planes [hd/2, 64] u8; vs, vm [64] f32
            *tiles, carry = tiles_and_carry
            if variant == "int8":
                ku, kl, ks, km, vu, vl, vs, vm = tiles
                k_refs, v_refs = (ku, kl), (vu, vl)
            else:
                ku, ks, km, vu, vs, vm = tiles
                k_refs, v_refs = (ku,), (vu,)
            (i,) = idx
            with jax.named_scope("dequant_keys"):
                keys = []
                if packed:
                    k_codes = [c - jnp.asarray(F16_BASE, cdt) for c in packed_codes(k_refs)]  # exact
                else:
                    k_codes = unpack([r[...] for r in k_refs])
                for j, codes in enumerate(k_codes):  # [64 tokens, 64 channels] each
                    chans = pl.ds(j * hd2, hd2)
                    # f32 (v1) or f16 (v4, v5: the cache's f16 scales need no conversion; cs and
                    # offset * cs are powers of two, so the shift is rounded once, as in f32)
                    scale = ks[0, chans].astype(codes.dtype)
                    scale = scale * cs if cs != 1 else scale
                    shift = km[0, chans].astype(codes.dtype)
                    shift = shift - offset * scale if offset else shift
                    k = codes * lax.broadcast_in_dim(scale, (kv_tile, hd2), (1,)) \
                        + lax.broadcast_in_dim(shift, (kv_tile, hd2), (1,))
                    k = k.astype(cdt)
                    if packed:  # channels in column_order, as Q's (the interpreter reorders them)
                        k = in_column_order(k) if interpret else as_wgmma(k)
                    if interpret:  # the interpreter's wgmma reads A from SMEM
                        ka_smem[j] = k
                        k = ka_smem.at[j]
                    keys.append(k)
            with jax.named_scope("scores"):
                scores = mma((kv_tile, tm), [(keys[j], q_operand(q_s, j)) for j in range(2)]) * sm_scale
            p, (o, m, l_acc, s_acc) = softmax_step(i, scores, bnd_s, carry)
            with jax.named_scope("values"):
                ps = (p * lax.broadcast_in_dim(vs[...].astype(f32) * cs, (kv_tile, tm), (0,))).astype(cdt)
                p_t = plgpu.transpose_ref(p_smem, (1, 0)) if p_kmajor else p_smem  # P^T [kv_tile, tm]
                p_t[...] = ps
                # each column's sum_t p m - offset sum_t ps, kept per thread (deferred); v5's value
                # codes enter the MMA as 1024 + code, so its offset has F16_BASE more
                s_acc = s_acc + p * lax.broadcast_in_dim(vm[...].astype(f32), (kv_tile, tm), (0,))
                if offset or packed:
                    s_acc = s_acc - (offset + (F16_BASE if packed else 0.0)) * ps.astype(f32)
                # V^T codes [hd, 64]: low-nibble channels on rows 0..hd/2-1, high on the rest,
                # staged through SMEM into one 128-row A operand
                v_codes = packed_codes(v_refs) if packed else unpack([r[...] for r in v_refs])
                for j, codes in enumerate(v_codes):
                    a_smem[pl.ds(j * hd2, hd2), :] = codes.astype(cdt)
                plgpu.commit_smem()
                o = o + mma((hd, tm), [(a_smem, p_t)])
            return o, m, l_acc, s_acc

        def nibbles(plane):
            """A [rows, cols] tile of packed bytes as two bf16 register tiles MAGIC + nibble (low
            nibble, high nibble): a widening, a mask or shift and an OR per element, and a free
            bitcast (no conversion instruction: module docstring, "v2")."""
            x = plane[...].astype(jnp.int16)  # zero-extended; Mosaic has no 8-bit shifts
            magic = jnp.int16(0x4300)
            return [lax.bitcast_convert_type(y | magic, bf16) for y in (x & 15, x >> 4)]

        def a_operand(x, j):  # a register tile as wgmma's A (the interpreter's reads SMEM)
            if not interpret:
                return x
            ka_smem[j] = x
            return ka_smem.at[j]

        def combine(accs):  # sum_p w_p acc_p over the planes' MMAs
            out = accs[0] * weights[0] if weights[0] != 1 else accs[0]
            for acc, w in zip(accs[1:], weights[1:]):
                out = out + (acc * w if w != 1 else acc)
            return out

        def step_quant_v2(idx, q_s, bnd_s, *tiles_and_carry):
            # q_s [2, tm, hd/2] bf16; bnd_s [2, tm]; key planes [64, hd/2] u8; ks [1, hd];
            # bias [1, tm] f32; value planes [hd/2, 64] u8; vs, vm [64]
            *tiles, carry = tiles_and_carry
            if variant == "int8":
                ku, kl, ks, kb, vu, vl, vs, vm = tiles
                k_planes, v_planes = (ku, kl), (vu, vl)
            else:
                ku, ks, kb, vu, vs, vm = tiles
                k_planes, v_planes = (ku,), (vu,)
            (i,) = idx
            o_lo, o_hi, m_prev, l_prev = carry

            @pl.when((i == 0) | (tile(i) % (group // kv_tile) == 0))
            def _():  # a new key group: Q' = Q * s cs per channel, B of the score MMAs
                with jax.named_scope("fold_q"):
                    rows = hd if v3 else hd2  # v3: one [hd, tm] Q'^T, channels interleaved
                    for j in range(1 if v3 else 2):
                        scale = ks[0, pl.ds(j * rows, rows)].astype(f32) * cs
                        scale = lax.broadcast_in_dim(scale, (rows, tm), (0,))
                        qs_smem[j] = (q_s[j].astype(f32) * scale).astype(bf16)  # Q'^T [hd/2, tm]
                    plgpu.commit_smem()

            with jax.named_scope("scores"):
                accs = []
                for plane in k_planes:
                    if v3:  # [64 tokens, hd interleaved channels] int4: xor 8 per nibble, convert
                        a = (plane[...] ^ jnp.int4(-8)).astype(bf16)
                        if interpret:
                            kf_smem[...] = a
                            a = kf_smem
                        accs.append(mma((kv_tile, tm), [(a, qs_smem.at[0])]))
                        continue
                    lo, hi = nibbles(plane)  # [64 tokens, 64 channels] per nibble half
                    accs.append(mma((kv_tile, tm), [(a_operand(lo, 0), qs_smem.at[0]),
                                                 (a_operand(hi, 1), qs_smem.at[1])]))
                scores = (combine(accs) + lax.broadcast_in_dim(kb[0], (kv_tile, tm), (1,))) * sm_scale
            p, corr, m, l = softmax_probs(i, scores, bnd_s, m_prev, l_prev)
            with jax.named_scope("values"):
                ps = (p * lax.broadcast_in_dim(vs[...].astype(f32) * cs, (kv_tile, tm), (0,))).astype(bf16)
                p_smem[...] = ps
                shift = jnp.sum(p * lax.broadcast_in_dim(vm[...].astype(f32), (kv_tile, tm), (0,))  # one reduction
                                - (offset + MAGIC * sum(weights)) * ps.astype(f32), axis=0)
                shift = lax.broadcast_in_dim(shift, (hd2, tm), (1,))
                corr = lax.broadcast_in_dim(corr, (hd2, tm), (1,))
                plgpu.commit_smem()
                halves = [nibbles(plane) for plane in v_planes]  # [64 channels, 64 tokens] each
                o = []
                for j, o_j in enumerate((o_lo, o_hi)):  # V^T rows 0..hd/2-1 (low nibbles), the rest
                    accs = [mma((hd2, tm), [(a_operand(h[j], 0), p_smem)]) for h in halves]
                    o.append(o_j * corr + combine(accs) + shift)
            return (*o, m, l)

        parts = 1 if variant == "bf16" or v3 else 2
        fixed = lambda i: (0, 0, 0)  # noqa: E731
        if interpret:
            q_spec = plgpu.BlockSpec((parts, hd // parts, tm), fixed)
        elif v2:  # Q^T [2, hd/2, tm]: N-major, as P^T
            q_spec = plgpu.BlockSpec((parts, hd // parts, tm), fixed, transforms=_swizzled(tm * 2, 16, "rhs"))
        else:
            q_spec = plgpu.BlockSpec((parts, tm, hd // parts), fixed, transforms=_swizzled(hd // parts * 2, 16, "rhs"))
        in_specs = [q_spec]
        gmem = [q_gmem.at[b, h]]
        if variant == "bf16":
            in_specs += [plgpu.BlockSpec((kv_tile, hd), lambda i: (tile(i), 0),
                                         transforms=_swizzled(hd * 2, 16, "lhs")),
                         plgpu.BlockSpec((kv_tile, hd), lambda i: (tile(i), 0),  # A of a 32B-swizzled MMA
                                         transforms=_swizzled(32, 16, "lhs"))]
        else:
            if v3:  # int4 [64, hd]: 64-byte rows, swizzled as the wgmma A's load expects
                k_spec = plgpu.BlockSpec((kv_tile, hd), lambda i: (tile(i), 0),
                                         transforms=() if interpret else _swizzled(hd // 2, 4, "lhs"))
            else:
                k_spec = plgpu.BlockSpec((kv_tile, hd2), lambda i: (tile(i), 0))
            ks_spec = plgpu.BlockSpec((1, hd), lambda i: (tile(i) * kv_tile // group, 0))
            kb_spec = plgpu.BlockSpec((1, tm), lambda i: (tile(i) * kv_tile // group, 0))  # v2's bias
            v_spec = plgpu.BlockSpec((hd2, kv_tile), lambda i: (0, tile(i)))
            vs_spec = plgpu.BlockSpec((kv_tile,), lambda i: (tile(i),))
            planes = 1 if variant == "int4" else 2
            in_specs += [k_spec] * planes + [ks_spec, kb_spec if v2 else ks_spec] + [v_spec] * planes \
                + [vs_spec] * 2
        gmem += [r.at[b, h] for r in cache]
        def zeros(shape):
            z = jnp.zeros(shape, f32)
            return z if interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)  # the interpreter has no layouts

        m0 = jnp.full((tm,), NEG, f32)
        if v2:  # carry (o_lo, o_hi, m, l)
            init = (zeros((hd2, tm)), zeros((hd2, tm)), m0, jnp.zeros((tm,), f32))
        else:  # carry (o, m, l_acc, s_acc): the sums deferred (softmax_step)
            init = (zeros((hd, tm)), m0, zeros((kv_tile, tm)), zeros((kv_tile, tm)))
        step = step_bf16 if variant == "bf16" else step_quant_v2 if v2 else step_quant

        def pipeline_step(idx, q_s, *rest):  # the rows' bounds come from bnd_smem, loaded once
            return step(idx, q_s, bnd_smem, *rest)

        out = plgpu.emit_pipeline(pipeline_step, grid=(jnp.maximum(count, 1),), in_specs=in_specs,
                                  max_concurrent_steps=stages, init_carry=init)(*gmem)
        if v2:
            o_lo, o_hi, m, l = out
            o = [o_lo, o_hi]
        else:
            o, m, l_acc, s_acc = out
            l = jnp.sum(l_acc, axis=0)
            if quant:  # the values' minimum and offset terms, one per column
                o = o + lax.broadcast_in_dim(jnp.sum(s_acc, axis=0), (hd, tm), (1,))
            o = [o]

        def epilogue(o_smem, ml_smem):
            for j, o_j in enumerate(o):
                o_smem[pl.ds(j * hd // len(o), hd // len(o)), :] = o_j
            ml_smem[0] = m
            ml_smem[1] = l
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, h, s])
            plgpu.copy_smem_to_gmem(ml_smem.at[0], m_gmem.at[b, h, s])
            plgpu.copy_smem_to_gmem(ml_smem.at[1], l_gmem.at[b, h, s])
            plgpu.wait_smem_to_gmem(0)

        # the output's buffers take the pipeline's shared memory once it has returned (smem_bytes)
        pl.run_scoped(epilogue, plgpu.SMEM((hd, tm), f32), plgpu.SMEM((2, tm), f32))

    # P^T [64, tm] is B with its N (query) axis minor: wgmma takes one swizzle for A and B, and
    # tm = 16 bf16 columns allow only 32 B; so the value MMA's A tiles are 32B-swizzled too.
    scratch = dict(
        p_smem=plgpu.SMEM((kv_tile, tm), cdt, transforms=_swizzled(32, 16, "rhs")),
        rng_smem=plgpu.SMEM((4,), jnp.int32),
        bnd_smem=plgpu.SMEM((2, tm), jnp.int32),
        barriers=plgpu.Barrier(num_arrivals=1, num_barriers=2),
    )
    if p_kmajor:  # v8: P [tm, kv_tile] K-major, 128B-swizzled, and so the V^T codes' A buffer
        scratch["p_smem"] = plgpu.SMEM((tm, kv_tile), cdt, transforms=_swizzled(kv_tile * 2, 16, "rhs"))
    elif narrow:  # v8 under the interpreter: P^T as it lies (8 columns take no swizzle)
        scratch["p_smem"] = plgpu.SMEM((kv_tile, tm), cdt)
    if v2:  # P'^T [64, tm] N-major B (tm >= 32: a 64B+ swizzle); Q' [2, tm, hd/2] K-major B
        scratch["p_smem"] = plgpu.SMEM((kv_tile, tm), bf16, transforms=_swizzled(tm * 2, 16, "rhs"))
        q_rows = (1, hd, tm) if v3 else (2, hd2, tm)
        scratch["qs_smem"] = plgpu.SMEM(q_rows, bf16, transforms=() if interpret else _swizzled(tm * 2, 16, "rhs"))
        if interpret:
            scratch["ka_smem"] = plgpu.SMEM((2, kv_tile, kv_tile), bf16)
            if v3:
                scratch["kf_smem"] = plgpu.SMEM((kv_tile, hd), bf16)
    else:
        if quant or interpret:  # the value tile's A operand staged in SMEM: V^T [hd, 64]
            a_swizzle = kv_tile * 2 if p_kmajor else 32  # the swizzle of P's buffer
            scratch["a_smem"] = plgpu.SMEM((hd, kv_tile), cdt, transforms=_swizzled(a_swizzle, 16, "lhs"))
        if quant and interpret:
            scratch["ka_smem"] = plgpu.SMEM((2, kv_tile, hd2), cdt)
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, KV, P, hd, tm), f32),) + (jax.ShapeDtypeStruct((B, KV, P, tm), f32),) * 2,
        grid=(B, KV, P),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             approx_math=approx_exp),
        scratch_types=scratch,
        interpret=InterpretGPUParams() if interpret else None,
        kernel_name=f"attention_mosaic_{variant}" + (f"_v{version}" if version > 1 else ""),
    )
    real = jnp.pad(row_pos >= 0, ((0, 0), (0, tm - M)))
    o_t, m, l = kernel(q, bounds, _tile_ranges(bounds, real, S, P, kv_tile), *operands)
    return o_t.swapaxes(-1, -2)[:, :, :, :M], m[..., :M], l[..., :M]  # no slices when M == tm (decode_attention)
