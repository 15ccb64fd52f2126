"""packed_codes' column order against Mosaic GPU's own register layouts: a NumPy model of
TiledLayout's thread -> element map (from the layout's tiling, warp, lane and vector dimensions, as
fragmented_array.TiledLayout.thread_idxs computes it) says which element each register of
WGMMA_UPCAST_2X and WGMMA holds; as_wgmma's relabelling must move every element to the column
column_order says, in the same row, for every thread. The unpacking itself runs only compiled:
the GPU check of attention_mosaic v5 (scripts/bench_attention_mosaic.py) covers it."""

import numpy as np
import pytest
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils

from pallas_kernels.packed_codes import column_order, in_column_order, source_register
from conftest import TEST_SEED


def element_map(layout, shape):
    """[128 threads, *registers_shape, vector] -> the flat index of the element held there."""
    contig = tuple(utils.get_contiguous_strides(shape))
    tile_strides = layout.tiling.tile_strides(contig)
    lane_strides = tile_strides[-layout.tiled_tiling_rank:]
    tiled = layout.tiled_tiling_shape

    def offsets(index, dims):  # a warp or lane index spread over its tiled dimensions
        sizes = tuple(d.times if isinstance(d, fa.Replicated) else tiled[d] for d in dims)
        out = [0] * len(tiled)
        for d, stride, size in zip(dims, utils.get_contiguous_strides(sizes), sizes):
            if not isinstance(d, fa.Replicated):
                out[d] = (index // stride) % size
        return sum(o * s for o, s in zip(out, lane_strides))

    regs = layout.registers_shape(shape)
    vec = layout.vector_length
    out = np.zeros((128, *regs, vec), np.int64)
    for t in range(128):
        base = offsets((t // 32) % 4, layout.warp_dims) + offsets(t % 32, layout.lane_dims)
        for idx in np.ndindex(regs):
            lin = base + sum(i * s for i, s in zip(idx, tile_strides))
            out[(t, *idx)] = lin + np.arange(vec) * lane_strides[layout.vector_dim]
    return out


def test_element_maps_cover_the_tile():
    for layout in (fa.WGMMA_LAYOUT, fa.WGMMA_LAYOUT_UPCAST_2X):
        m = element_map(layout, (64, 32))
        assert sorted(m.ravel().tolist()) == list(range(64 * 32))


@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 64), (64, 32)])
def test_as_wgmma_relabelling_is_the_column_order(rows, cols):
    wgmma = element_map(fa.WGMMA_LAYOUT, (rows, cols))
    upcast = element_map(fa.WGMMA_LAYOUT_UPCAST_2X, (rows, cols))
    order = column_order(cols)
    for t in range(128):
        for idx in np.ndindex(wgmma.shape[1:-1]):
            src, first = source_register(idx, upcast.ndim - 2)
            at = wgmma[(t, *idx)]  # where wgmma reads these two elements
            held = upcast[(t, *src)][first:first + 2]  # what the UPCAST_2X register holds there
            np.testing.assert_array_equal(held // cols, at // cols)  # same rows
            np.testing.assert_array_equal(held % cols, order[at % cols])


def test_column_order_is_an_involution_and_in_column_order_matches():
    rng = np.random.default_rng(TEST_SEED)
    order = column_order(64)
    np.testing.assert_array_equal(order[order], np.arange(64))
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(in_column_order(x)), x[..., order])
    with pytest.raises(ValueError, match="16 columns"):
        column_order(24)
