"""Int4-weight matmuls for Hopper in Pallas Mosaic GPU: W4A16 (bf16 activations, bf16 wgmma) and
W4A8 / W4A4 (int8-held activations, int8 wgmma into int32), the int4 weights converted in
registers and fed to wgmma as its A operand.

Decode and verify sizes are skinny (M = 1..256 tokens) and wgmma's M side is 64 rows, so the
product is computed transposed (swap-AB): out^T [N, M] = W [N, K] @ x^T [K, M]. The weights sit on
the 64-row side, read as int4 straight from HBM by TMA; the tokens, read in boxes of the MMA's N
size (8..256 rows: TMA fills the rows past M with zeros, so x needs no pad), are the B operand in
shared memory (x's rows are K-major, which wgmma reads transposed). Above 256 rows (a W4A8 prefill)
a third grid axis runs 256-row chunks of x.

Each program owns `rows` output channels and one K range (split-K). Per group of input channels
it converts the group's int4 tile in registers, runs one wgmma into a fresh accumulator, and adds
it times the group's per-channel weight scale (and, for int8 activations, each token's activation
scale) into the running f32 sum: the scales multiply rows x M partial sums, not every weight
element. A pipeline step holds `MosaicTiles.groups` groups, their wgmmas issued back to back with
one wait, so the step's fixed costs are shared (a decode-size program is bound by its serial step
chain, not by bandwidth: benchmarks/engine/README.md). K ranges are summed after the kernel. For wide token tiles
(128-256 tokens) a second W4A16 body (`MosaicTiles.carry`) puts the scales on the converted
weights instead and carries one accumulator across steps: half the accumulator registers.

From 64 tokens the programs are warp-specialized (`MosaicTiles.consumers`): a memory warpgroup
issues the TMA loads (`plgpu.emit_pipeline_warp_specialized`), and two consumer warpgroups each
convert and multiply 64 of the program's 128 rows against the one x tile in shared memory, so one
converts while the other's wgmma runs; each stores its rows in 64-column slabs. At those sizes a
program's x tile (up to 64 KB a step) outweighs its weights (8 KB), so `MosaicTiles.cluster` pairs
neighbouring programs into a cluster that loads each x tile once and multicasts it (at 256 tokens).
Both run on the GPU only: the interpreter has no warp-specialized pipelines, and tests run their
step math (the same functions) through the one-warpgroup pipeline. The uncarried body works on
column blocks of at most COLUMN_BLOCK tokens, so a 256-token int8 tile holds one accumulator pair
per block and converts its weights once.

Weights in this layout (`to_mosaic_layout`): {"w": int4 [N, K], "scales": f32 [G, N]}, the same
scales as the packed layout of packing.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from .packing import pack_block, pack_int4, unpack_int4, weight_layout

WGMMA_ROWS = 64  # wgmma's M side
TMA_ALIGN = 128  # bytes: a TMA copy's shared-memory destination must start on this boundary
MAX_TOKENS = 256  # wgmma's largest N
SMEM_BYTES = 227 * 1024  # per program on sm_90
# A warp-specialized program's consumers store their output in slabs of this many token columns
# through two shared-memory slots each, so 256-token f32 partial sums leave room for the pipeline.
EPILOGUE_TOKENS = 64
COLUMN_BLOCK = 128  # the uncarried body's accumulators hold at most this many tokens (_int4_matmul)
# The token-major epilogue: store the accumulator through a transposed shared-memory view and write
# y [M, N]. jax 0.10.2's Warpgroup layout inference refuses the transposed store; on jax 0.11.2 it
# lowers for bf16 tiles (the carried body at split 1 matched float64 on the H100:
# benchmarks/engine/h100_token_major_check.json) and not for f32 ones. So split-K's f32 partial
# sums leave as two 16-bit tiles, the upper and lower halves of each float's bits (`f32_halves`),
# joined again by XLA in the sum over K ranges: exact, and an elementwise sum that fuses into the
# output's consumer, where out^T needs a transpose kernel per projection. On the H100 (thirteenth
# session, benchmarks/engine/README.md) every kernel config matched float64 this way, and the
# batch-16 W4A16 step took 3.88 against 3.96 ms (524 kernels against 588); batch 1 3.29 / 3.27 ms.
# So it is the default wherever it lowers (jax >= 0.11); `scripts/bench_mosaic.py --token-major
# {on,off}` and `bench_engine.py --token-major {on,off}` override it.
TRANSPOSED_STORE = jax.__version_info__ >= (0, 11)


def f32_halves(x):
    """f32 -> (upper, lower) 16 bits of each float, as bf16 bit patterns (the upper half is x
    truncated to bf16): what the kernels store, since 16-bit tiles take the transposed store."""
    u = lax.bitcast_convert_type(x, jnp.uint32)
    return tuple(lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.bfloat16) for h in (u >> 16, u & 0xFFFF))


def join_f32_halves(upper, lower):
    """The f32 numbers whose bit halves f32_halves returned (as bf16 or as int16): exact. Signed
    32-bit arithmetic, which Pallas Triton lowers too (pallas_kernels/residual_norm.py joins them in
    its kernel)."""
    u, lo = ((h if h.dtype == jnp.int16 else lax.bitcast_convert_type(h, jnp.int16)).astype(jnp.int32)
             for h in (upper, lower))
    return lax.bitcast_convert_type((u << 16) | (lo & 0xFFFF), jnp.float32)


def sum_k_ranges(parts):
    """The sum of split-K's [split, ...] partials as chained adds: elementwise, so XLA fuses it into
    the consumer of the output (a reduce would be a kernel of its own)."""
    return functools.reduce(jnp.add, [parts[s] for s in range(parts.shape[0])])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["halves"], meta_fields=["rows"])
@dataclasses.dataclass(frozen=True)
class SplitKHalves:
    """A token-major split-K matmul's output [rows, N] left unsummed (`mosaic_matmul(...,
    unjoined=True)`), for a consumer kernel that sums it itself (residual_norm.py): halves
    [split, 2, >= rows, N], each K range's f32 partial sums as (upper, lower) 16-bit halves."""

    halves: jax.Array
    rows: int

    def join(self) -> jax.Array:
        """The f32 output [rows, N]: the K ranges' sums added in order. Sliced as int16: XLA's
        CPU computes bf16 ops in f32, which would flush lower halves that read as subnormals."""
        bits = lax.bitcast_convert_type(self.halves, jnp.int16)
        return sum_k_ranges(join_f32_halves(bits[:, 0], bits[:, 1]))[: self.rows]


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Launch configuration of one Mosaic int4 matmul.

    rows: output channels per program (a multiple of 64: the A operand's rows);
    split: number of K ranges (divides the number of pipeline steps, one weight group each);
    stages: pipeline depth (TMA loads in flight per program);
    carry: W4A16 only: multiply each group's scales onto the converted weights (rounded to bf16,
      as a dequantized bf16 weight is) and accumulate every step into one wgmma accumulator,
      instead of a fresh accumulator per step rescaled in f32 and added to a running sum. Half
      the accumulator registers (a 64 x 256 tile is 128 a thread): for wide token tiles.
    groups: weight groups per pipeline step (divides a K range's groups): each step issues one
      wgmma per group back to back and waits once, so a step's fixed costs (barrier waits, the
      wgmma wait, the pipeline's bookkeeping) are paid once per `groups` groups.
    max_tokens: the largest token tile (wgmma's N, a power of 2 from 8 to 256); more rows run in
      chunks of that many on a grid axis. Without `carry` a program holds two accumulators per
      column block of at most COLUMN_BLOCK tokens (each step's and the running sum).
    consumers: compute warpgroups per program. 1: one warpgroup issues the TMA loads, converts and
      multiplies (`plgpu.emit_pipeline`). 2: warp-specialized (`plgpu.emit_pipeline_warp_specialized`):
      a third warpgroup only issues the loads, and two consumer warpgroups each convert and multiply
      64 of the program's 128 rows against the shared x tile, so one converts while the other's
      wgmma runs. rows must then be 64 * consumers. The GPU only: the interpreter has no
      warp-specialized pipelines.
    cluster: warp-specialized programs only: 2 runs pairs of programs with neighbouring rows as one
      cluster that loads each x tile once and multicasts it to both (TMA multicast), halving the
      x tiles read from L2 (at 256 tokens a 128-row program reads 64 KB of x for 8 KB of weights).
    """

    rows: int = 64
    split: int = 1
    stages: int = 4
    carry: bool = False
    groups: int = 1
    max_tokens: int = 256
    consumers: int = 1
    cluster: int = 1


def is_mosaic_layout(w) -> bool:
    """A weight dict in this module's layout (int4 `w` [N, K]) rather than packing.py's."""
    return isinstance(w, dict) and "w" in w and "scales" in w


def to_mosaic_layout(qw) -> dict:
    """The Mosaic kernels' layout of a packed weight dict: int4 [N, K] (K contiguous), same scales."""
    K, N, G, gs, pb = weight_layout(qw)
    q = unpack_int4(qw["packed"], pb)  # int8 [K, N], values -8..7
    return {"w": q.T.astype(jnp.int4), "scales": qw["scales"].astype(jnp.float32)}


def from_mosaic_layout(mw) -> dict:
    """Inverse of to_mosaic_layout: packing.py's {"packed", "scales"}."""
    N, K = mw["w"].shape
    G = mw["scales"].shape[0]
    return {"packed": pack_int4(mw["w"].T.astype(jnp.int8), pack_block(K, G)),
            "scales": mw["scales"]}


def token_tile(M: int, max_tokens: int = MAX_TOKENS) -> int:
    """wgmma N size for M tokens: a power of 2 from 8 to `max_tokens` (<= 256; above it the
    kernels run chunks of that many rows)."""
    if M < 1:
        raise ValueError(f"the Mosaic int4 kernels take at least one row, got M={M}")
    return max(8, 1 << (min(M, max_tokens) - 1).bit_length())


def step_width(K: int, G: int) -> int:
    """Input channels per pipeline step: the weight's group size, or 128 (64) per channel."""
    if G > 1:
        return K // G
    return 128 if K % 128 == 0 else 64


def smem_bytes(tiles: MosaicTiles, tk: int, tm: int, x_bytes: int) -> int:
    """Shared memory of one program: pipeline stages of weights, x and scales, plus the output."""
    stage = tiles.groups * (tiles.rows * tk // 2 + tm * tk * x_bytes + 4 * (tiles.rows + tm))
    out_bytes = 4 if tiles.split > 1 else 2  # split-K's f32 partial sums, else bf16
    if tiles.consumers > 1:  # two slabs of EPILOGUE_TOKENS columns a consumer, and the barriers
        return tiles.stages * stage + tiles.rows * min(tm, 2 * EPILOGUE_TOKENS) * out_bytes + 1024
    return tiles.stages * stage + tiles.rows * tm * out_bytes


def supported(M: int, N: int, K: int, G: int, tiles: MosaicTiles, x_bytes: int = 2) -> str | None:
    """Why these shapes and tiles cannot run, or None when they can."""
    if M < 1:
        return f"M={M} has no rows"
    if tiles.max_tokens not in (8, 16, 32, 64, 128, 256):
        return f"max_tokens={tiles.max_tokens} is not a power of 2 from 8 to 256"
    tk = step_width(K, G)
    if tk not in (64, 128, 256) or K % tk:
        return f"a pipeline step of {tk} input channels (K={K}, {G} groups) is not 64, 128 or 256"
    if tiles.rows % WGMMA_ROWS or N % tiles.rows:
        return f"rows={tiles.rows} must be a multiple of 64 dividing N={N}"
    if tiles.consumers not in (1, 2):
        return f"consumers={tiles.consumers} is not 1 or 2"
    if tiles.consumers > 1 and tiles.rows != WGMMA_ROWS * tiles.consumers:
        return f"{tiles.consumers} consumer warpgroups take 64 rows each, not rows={tiles.rows}"
    if tiles.cluster not in (1, 2) or (tiles.cluster > 1 and tiles.consumers == 1):
        return f"cluster={tiles.cluster}: 1, or 2 with warp-specialized programs (consumers=2)"
    if (N // tiles.rows) % tiles.cluster:
        return f"the {N // tiles.rows} row blocks do not pair into clusters of {tiles.cluster}"
    if (K // tk) % tiles.split:
        return f"split={tiles.split} does not divide the {K // tk} weight groups"
    if (K // tk // tiles.split) % tiles.groups:
        return f"groups={tiles.groups} does not divide a K range's {K // tk // tiles.split} groups"
    if smem_bytes(tiles, tk, token_tile(M, tiles.max_tokens), x_bytes) > SMEM_BYTES:
        return "the pipeline stages do not fit in shared memory"
    return None


def _swizzled(block_minor_bytes: int, bits: int, kind: str):
    """SMEM tiling + swizzle for a tile whose rows are block_minor_bytes long (none under 32 B)."""
    if block_minor_bytes < 32:
        return ()
    swizzle = plgpu.find_swizzle(block_minor_bytes * 8, kind)
    return (
        plgpu.TilingTransform((8, swizzle * 8 // bits)),
        plgpu.SwizzleTransform(swizzle),
    )


def _int4_matmul(x, x_scales, mw, tiles: MosaicTiles, interpret: bool, token_major: bool | None = None,
                 unjoined: bool = False):
    """out [M, N] f32-accumulated; x [M, K] bf16 (x_scales None) or int8 with x_scales f32 [G', M]
    (one row per pipeline step). token_major: the kernel writes y [M, N] itself, through a
    transposed store of its out^T tile (default: under the interpreter, or TRANSPOSED_STORE); else it
    writes out^T [N, tm] and XLA transposes it after. unjoined: where split-K's partials leave as
    halves, return them as a SplitKHalves instead of their f32 sum."""
    if token_major is None:
        token_major = interpret or TRANSPOSED_STORE
    w, scales = mw["w"], mw["scales"]
    N, K = w.shape
    G = scales.shape[0]
    M = x.shape[0]
    int8 = x_scales is not None
    why = supported(M, N, K, G, tiles, x_bytes=1 if int8 else 2)
    if why:
        raise ValueError(why)
    tk = step_width(K, G)
    steps_total = K // tk
    if G == 1:  # per channel: the same scale every step (a small broadcast, per-channel weights only)
        scales = jnp.broadcast_to(scales, (steps_total, N))
    tm = token_tile(M, tiles.max_tokens)
    chunks = -(-M // tm)  # above max_tokens rows: one more grid axis over chunks of x
    rows, split, stages, g = tiles.rows, tiles.split, tiles.stages, tiles.groups
    if tiles.carry and int8:
        raise ValueError("carry is a W4A16 body: int8 codes cannot hold the scales")
    steps = steps_total // split  # weight groups per program (g per pipeline step)
    # x stays [M, K]: each step's TMA box of tm rows reads past row M, which TMA fills with zeros
    # (the interpreter with garbage); those tokens' output columns are dropped below. So no pad
    # kernel sits between x's producer and the matmul, except where Mosaic's shared-memory tiling
    # (8 rows) needs M <= 8 or a multiple of 8.
    if chunks > 1:
        x = jnp.pad(x, ((0, chunks * tm - M), (0, 0)))
    elif M > 8 and M % 8:
        x = jnp.pad(x, ((0, -M % 8), (0, 0)))
    if int8:  # one row of token scales per step, padded so each stage's row is TMA-aligned
        xs_cols = max(tm, TMA_ALIGN // 4)
        x_scales = jnp.pad(x_scales, ((0, 0), (0, chunks * xs_cols - M)), constant_values=1.0)
    op_dtype = jnp.int8 if int8 else jnp.bfloat16
    acc_dtype = jnp.int32 if int8 else jnp.float32

    ws = tiles.consumers > 1
    if ws and interpret:
        raise ValueError("the interpreter has no warp-specialized pipelines: consumers=1 there")
    wg_rows = rows // tiles.consumers  # each consumer warpgroup's rows
    token_major = token_major and not ws  # each consumer stores its rows of out^T

    def scaled_weights(w_tile, s_row):
        # carry: the group's scales on the converted weights (rounded to bf16, as a dequantized weight is)
        return w_tile.astype(jnp.bfloat16) * lax.broadcast_in_dim(
            s_row.astype(jnp.bfloat16), w_tile.shape, [0])

    def rescaled(part, s_row, xs_row):
        # no carry: one group's partial sums [r, c] times its weight (and token) scales
        part = part.astype(jnp.float32) * lax.broadcast_in_dim(s_row, part.shape, [0])
        if xs_row is not None:
            part = part * lax.broadcast_in_dim(xs_row, part.shape, [1])
        return part

    # The uncarried body multiplies, rescales and sums the token tile in column blocks of at most
    # COLUMN_BLOCK tokens, each with its own accumulator: at 256 tokens one block's int32 / f32
    # partial sums and the two blocks' running sums fit a thread's registers, where one 64 x 256 pair
    # of accumulators did not (so W4A8 need not split 256 tokens into chunks that convert the
    # weights twice).
    cols = tm if tiles.carry else min(tm, COLUMN_BLOCK)
    col_blocks = [pl.ds(c * cols, cols) for c in range(tm // cols)]

    # group j of step k is the K block g * k + j: the weight and x are passed once per group
    in_specs = (
        [plgpu.BlockSpec((rows, tk), lambda k, j=j: (0, g * k + j),
                         transforms=_swizzled(tk // 2, 4, "lhs")) for j in range(g)]
        + [plgpu.BlockSpec((tm, tk), lambda k, j=j: (0, g * k + j),
                           transforms=_swizzled(tk * (1 if int8 else 2), 8 if int8 else 16, "rhs"),
                           collective_axes=("cl",) if tiles.cluster > 1 else ())  # multicast
           for j in range(g)]
        + [plgpu.BlockSpec((g, rows), lambda k: (k, 0))])
    if int8:
        in_specs.append(plgpu.BlockSpec((g, xs_cols), lambda k: (k, 0)))

    def split_refs(refs):
        # a pipeline step's refs: g weight tiles, g x tiles, the scales [g, rows], the token scales
        # [g, xs_cols] (int8 only), then the carry
        w_smems, x_smems, (s_smem, *rest) = refs[:g], refs[g:2 * g], refs[2 * g:]
        xs_smem = rest.pop(0) if int8 else None
        return w_smems, x_smems, s_smem, xs_smem, rest[0]

    def body(w_gmem, x_gmem, s_gmem, *refs, out_smem, a_smem=None, b_smem=None):
        # w_gmem [N, K] int4; x_gmem [M, K]; s_gmem [steps_total, N] f32;
        # xs_gmem [steps_total, chunks * xs_cols] f32 (int8 x only);
        # out_gmem [split, out_rows, N] (token-major) or [split, N, chunks * tm]
        xs_gmem, out_gmem = refs if int8 else (None, *refs)
        n_block = lax.axis_index("n")
        if tiles.cluster > 1:  # grid axis n counts clusters; "cl" is the program within one
            n_block = n_block * tiles.cluster + lax.axis_index("cl")
        n_rows = pl.ds(n_block * rows, rows)
        c_idx = lax.axis_index("c")
        tokens = pl.ds(c_idx * tm, tm)
        s_idx = lax.axis_index("s")
        k_range = pl.ds(s_idx * steps * tk, steps * tk)
        step_range = pl.ds(s_idx * steps, steps)
        x_rows = tokens if chunks > 1 else slice(None)  # one chunk: a box past M, zero-filled
        operands = ([w_gmem.at[n_rows, k_range]] * g + [x_gmem.at[x_rows, k_range]] * g
                    + [s_gmem.at[step_range, n_rows]])
        if int8:
            operands.append(xs_gmem.at[step_range, pl.ds(c_idx * xs_cols, xs_cols)])

        def wgmma(acc_ref, w_reg, x_smem):
            # acc_ref += w_reg [r, tk] @ x_smem^T [tk, c] (x_smem: c of the tile's token rows)
            if a_smem is None:
                plgpu.wgmma(acc_ref, w_reg, plgpu.transpose_ref(x_smem, (1, 0)))
            else:  # the interpreter's wgmma reads A from SMEM and B untransposed
                a_smem[...] = w_reg
                b = b_smem.at[:, pl.ds(0, x_smem.shape[0])]
                b[...] = x_smem[...].T
                plgpu.wgmma(acc_ref, a_smem, b)

        def convert_and_multiply(refs, my_rows):
            # one pipeline step on this warpgroup's rows (my_rows: a slice of the program's rows)
            w_smems, x_smems, s_smem, xs_smem, acc = split_refs(refs)
            if tiles.carry:  # acc: the accumulator ref, carried across steps
                for j in range(g):
                    wgmma(acc, scaled_weights(w_smems[j][my_rows], s_smem[j, my_rows]), x_smems[j])
                # wait before the next step converts: A lives in registers the next step reuses
                plgpu.wgmma_wait(0)
                return acc
            # int4 -> bf16 / int8 in registers. (Inference's layout loads the tile a byte a thread at a
            # time; 32-bit loads, WGMMA_UPCAST_4X plus a shuffle, were no faster on the H100 at
            # b2b3e53: benchmarks/engine/README.md.)
            w_regs = [w[my_rows].astype(op_dtype) for w in w_smems]
            s_rows = [s_smem[j, my_rows] for j in range(g)]  # each group's weight scales, once a step
            acc = list(acc)  # acc: the f32 running sums, one value per column block
            for c, block in enumerate(col_blocks):
                def mma(*acc_refs):  # issue every group's wgmma, then wait once (reading them)
                    for acc_ref, w_reg, x_smem in zip(acc_refs, w_regs, x_smems):
                        wgmma(acc_ref, w_reg, x_smem.at[block])
                    return [acc_ref[...] for acc_ref in acc_refs]

                parts = pl.run_scoped(mma, *[plgpu.ACC((wg_rows, cols), acc_dtype)] * g)
                for j, part in enumerate(parts):
                    acc[c] = acc[c] + rescaled(part, s_rows[j], xs_smem[j, block] if int8 else None)
            return tuple(acc)

        def accumulate(run_pipeline):
            # run the pipeline from zero; its final sums as values [wg_rows, cols], one a column block
            if tiles.carry:
                def scoped(acc_ref):
                    run_pipeline(acc_ref)
                    return (acc_ref[...],)
                return pl.run_scoped(scoped, plgpu.ACC((wg_rows, tm), jnp.float32))
            acc0 = jnp.zeros((wg_rows, cols), jnp.float32)
            if not interpret:  # the interpreter has no layouts
                acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
            return run_pipeline((acc0,) * len(col_blocks))

        def store(blocks, out_tiles, dsts):
            # token-major split-K: out_tiles / dsts hold the upper and lower bit halves (f32_halves)
            for block, acc in zip(col_blocks, blocks):
                accs = f32_halves(acc) if halves else (acc.astype(out_tiles[0].dtype),)
                for out_tile, acc in zip(out_tiles, accs):
                    if not token_major:
                        out_tile.at[:, block][...] = acc
                    elif interpret:  # out_tile [tm, rows]; the interpreter has no transposed refs
                        out_tile.at[block][...] = acc.T
                    else:  # store the [rows, tm] tile through its transposed view
                        plgpu.transpose_ref(out_tile.at[block], (1, 0))[...] = acc
            plgpu.commit_smem()
            for out_tile, dst in zip(out_tiles, dsts):
                plgpu.copy_smem_to_gmem(out_tile, dst)
            plgpu.wait_smem_to_gmem(0)

        if not ws:
            def step(_, *refs):
                return convert_and_multiply(refs, slice(None))

            acc = accumulate(lambda carry: plgpu.emit_pipeline(
                step, grid=(steps // g,), in_specs=in_specs, max_concurrent_steps=stages,
                init_carry=carry)(*operands))
            # rows past the output's last token lie outside it: TMA skips them
            if halves:
                store(acc, out_smem, [out_gmem.at[s_idx, j, tokens, n_rows] for j in range(2)])
            else:
                store(acc, [out_smem], [out_gmem.at[s_idx, tokens, n_rows] if token_major
                                        else out_gmem.at[s_idx, n_rows, tokens]])
            return

        wg = lax.axis_index("wg")
        my_rows = pl.ds(wg * wg_rows, wg_rows)

        def compute_context(run_pipeline):  # the consumers only: accumulate, then store their rows
            blocks = [acc.astype(out_smem.dtype) for acc in accumulate(run_pipeline)]
            dst = out_gmem.at[s_idx, n_rows, tokens].at[my_rows]
            for e in range(tm // epi):  # slab e through slot e % 2, once that slot's last copy read it
                plgpu.wait_smem_to_gmem(out_slots - 1, wait_read_only=True)
                c, first = divmod(e * epi, cols)  # the slab's column block, its first column there
                out_smem[wg, e % out_slots] = blocks[c][:, first:first + epi]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg, e % out_slots], dst.at[:, pl.ds(e * epi, epi)])
            plgpu.wait_smem_to_gmem(0)

        plgpu.emit_pipeline_warp_specialized(
            lambda _, *refs: convert_and_multiply(refs, my_rows), grid=(steps // g,),
            memory_registers=40, in_specs=in_specs, max_concurrent_steps=stages, wg_axis="wg",
            num_compute_wgs=tiles.consumers, compute_context=compute_context)(*operands)

    halves = token_major and split > 1  # f32 partial sums stored as two 16-bit halves
    out_dtype = jnp.float32 if split > 1 and not halves else jnp.bfloat16
    bits = jnp.dtype(out_dtype).itemsize * 8
    # token-major output rows: x's (padded) rows; under the interpreter, which refuses writes past an
    # array's end, the whole token tile
    out_rows = chunks * tm if interpret else x.shape[0]
    epi = min(tm, EPILOGUE_TOKENS)  # warp-specialized: output slabs [wg_rows, epi]
    out_slots = min(2, tm // epi)
    out_tile = (tm, rows) if token_major else (wg_rows, epi) if ws else (rows, tm)
    out_smem = functools.partial(plgpu.SMEM, dtype=out_dtype,
                                 transforms=_swizzled(out_tile[1] * bits // 8, bits, "out"))
    scratch = dict(out_smem=out_smem((tiles.consumers, out_slots, *out_tile)) if ws
                   else [out_smem(out_tile) for _ in range(2)] if halves else out_smem(out_tile))
    if interpret:
        scratch.update(a_smem=plgpu.SMEM((rows, tk), op_dtype), b_smem=plgpu.SMEM((tk, tm), op_dtype))
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, 2, out_rows, N) if halves else (split, out_rows, N) if token_major
                                      else (split, N, chunks * tm), out_dtype),
        grid=(N // rows // tiles.cluster, split, chunks),
        grid_names=("n", "s", "c"),
        # a cluster of `cluster` programs along n (the axes of a cluster are aligned with the grid's)
        **(dict(cluster=(tiles.cluster, 1, 1), cluster_names=("cl", "cl_s", "cl_c")) if tiles.cluster > 1 else {}),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=scratch,
        interpret=InterpretGPUParams(out_of_bounds_reads="uninitialized") if interpret else None,
        kernel_name="w4a8_mosaic" if int8 else "w4a16_mosaic",
        **(dict(num_threads=tiles.consumers + 1, thread_name="wg") if ws else {}),
    )
    out = kernel(w, x, scales, *([x_scales] if int8 else []))
    if halves:  # split-K's sums as chained adds: they fuse into the consumer (no transpose follows)
        partials = SplitKHalves(out, M)
        return partials if unjoined else partials.join()
    y = out.sum(axis=0) if split > 1 else out[0]  # a reduce, fused with the transpose that follows
    return y[:M] if token_major else y[:, :M].T


def _in_dtype(y, dtype):
    return y if isinstance(y, SplitKHalves) else y.astype(dtype)


# Jitted with static tiles, so a model that calls a kernel at the same shape in every layer lowers
# it once: unjitted, each call site lowered its own Mosaic module (64 calls: 9.8 s against 0.2 s
# on the CPU, and a 53 s compile of the 32-layer step on the H100).
@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "unjoined"))
def w4a16_mosaic(x, mw, *, tiles: MosaicTiles = MosaicTiles(), interpret: bool = False, unjoined: bool = False):
    """y = x @ dequant(W) for x [M, K] (any float dtype; the MMA runs in bf16; above 256 rows in
    256-row chunks) and weights in the Mosaic layout. Returns [M, N] in x's dtype (f32 accumulation),
    or with `unjoined` and halved split-K partials, their SplitKHalves."""
    return _in_dtype(_int4_matmul(x.astype(jnp.bfloat16), None, mw, tiles, interpret, unjoined=unjoined), x.dtype)


@functools.partial(jax.jit, static_argnames=("act_bits", "tiles", "interpret", "unjoined"))
def w4a8_mosaic(x, mw, *, act_bits: int = 8, tiles: MosaicTiles = MosaicTiles(),
                interpret: bool = False, unjoined: bool = False):
    """W4A8 (act_bits 8) or W4A4 (act_bits 4): x [M, K] quantized per token over the weight's
    groups as w4a4.quantize_activations does, int8 x int8 MMAs, f32 rescale per group (`unjoined`:
    as w4a16_mosaic).

    The token scales' pipeline rows are padded to 128 bytes (`TMA_ALIGN`): at 8 floats (32 B) a
    row, three of every four TMA copies wrote off the shared-memory alignment TMA needs and the
    kernel faulted on the H100 with a CUDA misaligned address (benchmarks/engine/
    h100_mosaic_w4a8_fault.log); padded, it matches the integer reference there
    (h100_mosaic_gpu_check.log).
    """
    from .w4a4 import quantize_activations

    N, K = mw["w"].shape
    G = mw["scales"].shape[0]
    xq, xs = quantize_activations(x, K // G, act_bits)  # int8 [M, K], f32 [M, G]
    steps = K // step_width(K, G)
    xs_t = jnp.broadcast_to(xs.T, (steps, x.shape[0])) if G == 1 else xs.T  # [steps, M]
    return _in_dtype(_int4_matmul(xq, xs_t, mw, tiles, interpret, unjoined=unjoined), x.dtype)


NUM_SMS = 132  # H100 / H200 SXM
# Measured on the H100 (benchmarks/engine/hopper_kernels.json, the sweep's fastest configuration
# where it beat the rule below): (N, K, token tile, activation bytes) -> tiles.
# gate_up at decode sizes: two K ranges of two groups a step (896 programs of 8 steps) read the
# weights at 0.70-0.75 of copy bandwidth against 0.62-0.63 for the rule's (M = 1: 28.0 against
# 32.7 us, M = 16: 30.2 against 33.9); two groups a step did not help down, qkv or o
# (benchmarks/engine/h100_step_structure.json). W4A8 qkv at 64 tokens: one warpgroup (12.3 against
# 14.9 us warp-specialized); W4A8 o and qkv at 256 tokens: two 128-token chunks (21.3 against 21.9,
# 29.8 against 31.4 us for one 256-token tile; benchmarks/engine/h100_sweep_cluster_47411f8.json and
# h100_sweep_m64_47411f8.json).
MEASURED: dict[tuple[int, int, int, int], MosaicTiles] = {
    (28672, 4096, 8, 2): MosaicTiles(split=2, groups=2),
    (28672, 4096, 16, 2): MosaicTiles(split=2, groups=2),
    (28672, 4096, 8, 1): MosaicTiles(groups=2),  # W4A8: 28.5 against 30.9 us at M = 1
    (28672, 4096, 16, 1): MosaicTiles(groups=2),  # 29.0 against 31.9 at M = 16
    (6144, 4096, 64, 1): MosaicTiles(split=4),
    (4096, 4096, 256, 1): MosaicTiles(rows=128, split=2, max_tokens=128, consumers=2),
    (6144, 4096, 256, 1): MosaicTiles(rows=128, max_tokens=128, consumers=2),
}


# Weight groups per pipeline step in choose_tiles' rule (where they divide a K range);
# `bench_engine.py --mosaic-groups` sets it to time the step both ways.
GROUPS_PER_STEP = 1

# Token tiles from which the rule runs warp-specialized programs (two consumer warpgroups). From 128
# tokens they beat the one-warpgroup rule on every projection timed on the H100, best at about one
# wave of programs (benchmarks/engine/h100_sweep_ws_744a87a.json; W4A16 M = 256: gate_up 111.5
# against 139.4 us, down 55.9 / 84.5, o 22.5 / 42.5; M = 128: gate_up 67.2 / 77.5, down 32.7 / 44.4,
# o 14.1 / 20.5); at 64 tokens on down, o and qkv (W4A16 23.7 / 27.1, 10.6 / 13.2, 15.9 / 16.8 us),
# a tie on gate_up (46.9 / 47.3; h100_sweep_m64_47411f8.json). At 1 and 16 tokens they lost (gate_up
# 32.9 against 29.7 at M = 1).
WS_MIN_TOKENS = 64
# At 256 tokens W4A16 programs run in clusters of two that multicast each x tile: 1-5% faster in one
# H100 run (gate_up 106.0 against 111.1 us, down 52.9 / 55.2, qkv 31.7 / 32.3, o 22.1 / 22.3); at
# 128 tokens no faster (h100_sweep_cluster_47411f8.json).
CLUSTER_MIN_TOKENS = 256
# W4A8 / W4A4 run 256 tokens as one tile in two column blocks (the weights converted once): gate_up
# 101.0 against 115.8 us for two 128-token chunks, down 49.4 / 52.3 (same run). Until the column
# blocks, a 256-token int8 tile held two 64 x 256 accumulators and two chunks were 1.9-2.8x faster
# (h100_sweep_256_450eb50.json); MEASURED keeps chunks where they still win.


def _deepest(tiles: MosaicTiles, tk: int, tm: int, x_bytes: int) -> MosaicTiles:
    """tiles with as many pipeline stages as shared memory holds, up to 4 (at least 1)."""
    for stages in (4, 3, 2):
        deeper = dataclasses.replace(tiles, stages=stages)
        if smem_bytes(deeper, tk, tm, x_bytes) <= SMEM_BYTES:
            return deeper
    return dataclasses.replace(tiles, stages=1)


def _split_k(programs: int, steps: int, grow) -> int:
    """K ranges per output tile: doubled while grow(the programs launched) says so, each K range
    keeping >= 4 steps."""
    split = 1
    while steps % (2 * split) == 0 and steps // (2 * split) >= 4 and grow(programs * split):
        split *= 2
    return split


def choose_tiles(M: int, N: int, K: int, G: int, x_bytes: int = 2) -> MosaicTiles:
    """Tiles for an [M, K] x [K, N] int4 matmul: the sweep's winner where measured, else the rule:
    - token tiles of WS_MIN_TOKENS and more: warp-specialized 128-row programs (two consumer
      warpgroups), W4A16 carrying one accumulator from 128 tokens and running in clusters of two
      at CLUSTER_MIN_TOKENS, split-K to at most one wave of programs;
    - smaller tiles (or N not a multiple of 128): 64-row programs of one warpgroup (W4A16 carrying
      at 128 tokens and more), split-K to at least two waves (each K range >= 4 steps),
      GROUPS_PER_STEP groups a step;
    above 256 rows, chunks of 256 (counted in the programs); as many pipeline stages as shared
    memory holds, up to 4."""
    tm = token_tile(M)
    if (N, K, tm, x_bytes) in MEASURED:
        return MEASURED[(N, K, tm, x_bytes)]
    tk = step_width(K, G)
    steps = K // tk
    chunks = -(-M // tm)
    carry = x_bytes == 2 and tm >= 128
    if tm >= WS_MIN_TOKENS and N % (2 * WGMMA_ROWS) == 0:
        cluster = 2 if x_bytes == 2 and tm >= CLUSTER_MIN_TOKENS and (N // 128) % 2 == 0 else 1
        split = _split_k((N // 128) * chunks, steps, lambda n: 2 * n <= NUM_SMS)  # at most one wave
        tiles = MosaicTiles(rows=128, split=split, carry=carry, consumers=2, cluster=cluster)
        return _deepest(tiles, tk, tm, x_bytes)
    split = _split_k((N // 64) * chunks, steps, lambda n: n < 2 * NUM_SMS)  # at least two waves
    groups = GROUPS_PER_STEP if (steps // split) % GROUPS_PER_STEP == 0 else 1
    return _deepest(MosaicTiles(split=split, groups=groups, carry=carry), tk, tm, x_bytes)


def dequantize_mosaic(mw, dtype=jnp.bfloat16):
    """[K, N] weights in `dtype` from the Mosaic layout (q * scale, rounded once)."""
    N, K = mw["w"].shape
    G = mw["scales"].shape[0]
    q = mw["w"].astype(jnp.float32).reshape(N, G, K // G)
    return (q * mw["scales"].T[:, :, None]).reshape(N, K).T.astype(dtype)


def mosaic_matmul(x, mw, mode: str, *, interpret: bool = False, unjoined: bool = False):
    """`x @ W` in a quantized mode ("w4a16", "w4a8", "w4a4") for weights in the Mosaic layout.

    With `unjoined`, where the kernel leaves split-K's partials as halves (token-major, split > 1),
    returns them as a SplitKHalves over x's rows flattened, for a kernel that sums them itself
    (pallas_kernels.residual_norm); every other call returns y as without it.

    x [..., K]. On the GPU (or under the interpreter) the Mosaic kernels run every W4A8/W4A4 call
    (above 256 rows, prefill, in 256-row chunks on one more grid axis: the reference's per-group
    products would hold an [M, G, N] f32 array, 28 GiB for 16k tokens of down_proj) and W4A16 up
    to 256 rows; larger W4A16 calls run a 16-bit XLA dot on the dequantized weight, faster there
    than the kernels (benchmarks/engine/README.md). On the CPU every mode runs the XLA math:
    W4A8/W4A4 as w4a4_reference (exact integer dots).
    """
    from .w4a4 import w4a4_reference

    if mode not in ("w4a16", "w4a8", "w4a4"):
        raise ValueError(f"mode must be w4a16, w4a8 or w4a4, got {mode!r}")
    N, K = mw["w"].shape
    G = mw["scales"].shape[0]
    lead, x2 = x.shape[:-1], x.reshape(-1, K)
    M = x2.shape[0]
    x_bytes = 2 if mode == "w4a16" else 1
    tiles = choose_tiles(M, N, K, G, x_bytes)
    if interpret:  # the interpreter has no warp-specialized pipelines: the same tiles on one warpgroup
        tiles = dataclasses.replace(tiles, consumers=1, cluster=1)
    kernel = ((interpret or jax.default_backend() == "gpu") and (mode != "w4a16" or M <= MAX_TOKENS)
              and supported(M, N, K, G, tiles, x_bytes) is None)
    if mode == "w4a16":
        if kernel:
            y = w4a16_mosaic(x2, mw, tiles=tiles, interpret=interpret, unjoined=unjoined)
        else:
            y = jnp.dot(x2, dequantize_mosaic(mw, x2.dtype), preferred_element_type=jnp.float32)
    else:
        bits = 8 if mode == "w4a8" else 4
        if kernel:
            y = w4a8_mosaic(x2, mw, act_bits=bits, tiles=tiles, interpret=interpret, unjoined=unjoined)
        else:
            y = w4a4_reference(x2, from_mosaic_layout(mw), act_bits=bits)
    if isinstance(y, SplitKHalves):
        return y
    return y.astype(x.dtype).reshape(*lead, N)
