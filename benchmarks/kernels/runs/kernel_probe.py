"""What bounds the int4 kernels at decode sizes? (device experiment, run 3)

(A run record: it needs the kernels of commit 09cc211 or earlier, whose Tiles still had `atomic` and
`fuse_quant`; both are gone since.)

(A `split_loads` kernel option, one load per nibble half, was also probed: h100_probe_3.json. It
made no difference and was removed from the kernels.)

Same timing harness as bench_kernels.py (compiled loop over weight copies larger than L2). Besides
the library kernels (w4a16 with/without bias_dequant and swap, w4a4 fused/unfused) it times
stripped kernels over the same packed int8 weights and grid:
  load_only     stream the packed tiles, add them up as int32 (no dot): the access pattern's bandwidth
  i8dot_direct  int8 x (packed int8 used as-is) -> int32 dot: loads feed the MMA with no ALU between
  bf16dot_cvt   bf16 x times packed.astype(bf16): one conversion between load and dot
"""
import dataclasses, functools, json, math, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))  # bench_kernels
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import bench_kernels as bk
from pallas_kernels import choose_tiles

def raw_call(kind, x, qw, bm, bn, split, warps=4, stages=4):
    packed = qw["packed"]; Kh, N = packed.shape; M = x.shape[0]; half = 64
    nb = Kh // half; blocks = nb // split
    def kernel(x_ref, w_ref, o_ref):
        first = pl.program_id(2) * blocks
        def body(t, acc):
            b = first + t
            p = w_ref[pl.ds(b * half, half), :]
            if kind == "load_only":
                return acc + jnp.sum(p.astype(jnp.int32), axis=0, keepdims=True).astype(jnp.float32)
            xs = x_ref[:, pl.ds(b * half, half)]
            if kind == "i8dot_direct":
                return acc + jnp.dot(xs.astype(jnp.int8), p, preferred_element_type=jnp.int32).astype(jnp.float32)
            return acc + jnp.dot(xs, p.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        acc = lax.fori_loop(0, blocks, body, jnp.zeros((1 if kind == "load_only" else bm, bn), jnp.float32))
        o_ref[...] = jnp.broadcast_to(acc, (bm, bn))
    out = pl.pallas_call(kernel, grid=(pl.cdiv(M, bm), N // bn, split),
        in_specs=[pl.BlockSpec((bm, x.shape[1]), lambda i, j, s: (i, 0)), pl.BlockSpec((Kh, bn), lambda i, j, s: (0, j))],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, pl.cdiv(M, bm) * bm, N), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages))(
        jnp.pad(x, ((0, pl.cdiv(M, bm) * bm - M), (0, 0))), packed)
    return out.sum(0)[:M].astype(x.dtype)

def main():
    out_path = sys.argv[1]
    key = jax.random.key(0)
    rows = []
    for proj, K, N in [("qkv", 4096, 6144), ("gate_up", 4096, 28672), ("down", 14336, 4096)]:
        G = K // 128
        wbytes = bk.int4_bytes(K, N, G)
        ws = bk.make_weights(jax.random.fold_in(key, N), K, N, 128, max(2, math.ceil(bk.ROTATE_BYTES / wbytes)), True)
        for M in (16, 64, 128):
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            a16 = choose_tiles(M, N, K, 128, "w4a16"); a4 = choose_tiles(M, N, K, 128, "w4a4")
            rep = dataclasses.replace
            fns = {
                "noop": bk.method_fn("noop", "auto"),
                "w4a16": bk.method_fn("w4a16", "auto", a16),
                "w4a16_bias": bk.method_fn("w4a16", "auto", rep(a16, bias_dequant=True)),
                "w4a16_bias_swap": bk.method_fn("w4a16", "auto", rep(a16, bias_dequant=True, swap=True)),
                "w4a16_bias_atomic": bk.method_fn("w4a16", "auto", rep(a16, bias_dequant=True, atomic=True)),
                "w4a4": bk.method_fn("w4a4", "auto", a4),
                "w4a4_fused": bk.method_fn("w4a4", "auto", rep(a4, fuse_quant=True)),
            }
            for kind in ("load_only", "i8dot_direct", "bf16dot_cvt"):
                fns[kind] = functools.partial(lambda x, w, kind: raw_call(kind, x, w, max(16, a16.bm), a16.bn, a16.split), kind=kind)
            for name, fn in fns.items():
                try:
                    us = 1e6 * bk.time_loop(fn, x, ws, 40, 3)
                except Exception as e:
                    print(proj, M, name, type(e).__name__, str(e)[:300], flush=True); continue
                rows.append({"proj": proj, "K": K, "N": N, "M": M, "method": name, "us": us, "gbps": wbytes / us / 1e3})
                print(f"{proj} M={M} {name}: {us:.1f} us  ({wbytes / us / 1e3:.0f} GB/s of int4 weights)", flush=True)
                json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, open(out_path, "w"), indent=1)
        del ws


if __name__ == "__main__":
    main()
