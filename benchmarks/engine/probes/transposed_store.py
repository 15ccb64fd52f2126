"""Probe (device call of 2026-12-06): can a Mosaic GPU kernel store its wgmma accumulator through a
transposed shared-memory view and TMA-write y [M, N], reading x past its M rows?

    PYTHONPATH=. python benchmarks/engine/probes/transposed_store.py gpu t   # Warpgroup lowering
    PYTHONPATH=. python benchmarks/engine/probes/transposed_store.py gpu L   # Lane lowering
    PYTHONPATH=. python benchmarks/engine/probes/transposed_store.py export L  # lower for CUDA on a CPU
    (a third variant, T, transposes the value instead: no lowering rule for it)

Result on the H100, jax 0.11.2: both lowerings compile and match float64 (../h100_transposed_store_probe.log).
"""
import jax, jax.numpy as jnp, numpy as np, sys
from jax import lax, export
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from pallas_kernels.int4_mosaic import _swizzled
M, K, tm, rows, N = 3, 64, 16, 64, 128
def run(interpret):
    def body(w_gmem, x_gmem, o_gmem, w_smem, x_smem, o_smem, bar, *scr):
        n = lax.axis_index("n")
        plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(n * rows, rows)], w_smem, bar)
        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(0, tm)], x_smem, bar)
        plgpu.barrier_wait(bar)
        def mma(acc_ref):
            if interpret:
                a_smem, b_smem = scr
                a_smem[...] = w_smem[...]
                b_smem[...] = x_smem[...].T
                plgpu.wgmma(acc_ref, a_smem, b_smem)
            else:
                plgpu.wgmma(acc_ref, w_smem[...], plgpu.transpose_ref(x_smem, (1, 0)))
            return acc_ref[...]
        acc = pl.run_scoped(mma, plgpu.ACC((rows, tm), jnp.float32))
        if sys.argv[2] == "t":
            plgpu.transpose_ref(o_smem, (1, 0))[...] = acc.astype(jnp.bfloat16)
        elif sys.argv[2] == "L":
            a = plgpu.layout_cast(acc.astype(jnp.bfloat16), plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.transpose_ref(o_smem, (1, 0))[...] = a
        else:
            o_smem[...] = acc.astype(jnp.bfloat16).T
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(0, tm), pl.ds(n * rows, rows)])
        plgpu.wait_smem_to_gmem(0)
    scratch = [plgpu.SMEM((rows, K), jnp.bfloat16, transforms=_swizzled(K * 2, 16, "lhs")),
               plgpu.SMEM((tm, K), jnp.bfloat16, transforms=_swizzled(K * 2, 16, "rhs")),
               plgpu.SMEM((tm, rows), jnp.bfloat16, transforms=_swizzled(rows * 2, 16, "out")),
               plgpu.Barrier(num_arrivals=2)]
    if interpret:
        scratch += [plgpu.SMEM((rows, K), jnp.bfloat16), plgpu.SMEM((K, tm), jnp.bfloat16)]
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, N), jnp.bfloat16), grid=(N // rows,), grid_names=("n",),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane if sys.argv[2] == "L" else plgpu.LoweringSemantics.Warpgroup),
                     scratch_types=scratch,
                     interpret=InterpretGPUParams(out_of_bounds_reads="uninitialized") if interpret else None)
k1, k2 = jax.random.split(jax.random.key(0))
w = jax.random.normal(k1, (N, K), jnp.float32).astype(jnp.bfloat16)
x = jax.random.normal(k2, (M, K), jnp.float32).astype(jnp.bfloat16)
if sys.argv[1] in ("interp", "gpu"):
    y = run(sys.argv[1] == "interp")(w, x)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    print(sys.argv[1:], 'max abs err', np.abs(np.asarray(y, np.float64) - ref).max(), 'ref max', np.abs(ref).max())
else:
    m = export.export(jax.jit(run(False)), platforms=["cuda"])(w, x).mlir_module()
    print("lowered", len(m))
