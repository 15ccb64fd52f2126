"""Does a column-paired int4 layout take the unpacking off the critical path? (device experiment 4)

The library packs two K rows per byte, so every byte is unpacked with three shifts before two dots.
Here a byte holds two output columns of the same K row instead, the low column offset by 8:

    byte[k, t*bn/2 + j] = (q[k, t*bn + bn/2 + j] << 4) | (q[k, t*bn + j] + 8)

Read as a signed int8 the byte *is* 16*hi + (lo + 8), so with u = byte & 15 = lo + 8:

    x @ hi = (x @ byte - x @ u) / 16        x @ lo = x @ u - 8 * sum(x)

Two dots per byte as before, but one feeds the loaded byte straight to the MMA (the fast
`bf16dot_cvt` / `i8dot_direct` path of probe 2) and the other needs one AND. For W4A4 all of it is
exact integer math. Each variant is checked against float64 NumPy, then timed with the library
kernels on the same int4 values (bench_kernels.py harness).

    python benchmarks/kernels/runs/paired_probe.py --check           # CPU, interpret mode
    python benchmarks/kernels/runs/paired_probe.py $OUT/probe.json   # GPU
"""
import dataclasses, functools, json, math, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))  # bench_kernels
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from pallas_kernels import choose_tiles, w4a16_matmul, w4a4_matmul
from pallas_kernels.packing import pack_int4
from pallas_kernels.w4a4 import quantize_activations

PB = 128  # group size = K block of one loop step


def pack_paired(q, bn):
    """int4 q [K, N] (-8..7) -> int8 [K, N/2] in the column-paired layout for N tiles of bn."""
    K, N = q.shape
    q = jnp.asarray(q, jnp.int8).reshape(K, N // bn, 2, bn // 2)
    lo, hi = q[:, :, 0], q[:, :, 1]
    return ((hi << jnp.int8(4)) | (lo + jnp.int8(8))).reshape(K, N // 2)


def paired_call(x, packed, scales, xs, *, bm, bn, split, warps, stages, variant, interpret=False):
    """y [M, N] f32 for the paired layout; xs: per-token group scales (w4a4) or None (w4a16)."""
    M, K = x.shape
    N, G, h = 2 * packed.shape[1], scales.shape[0], bn // 2
    nb = K // PB
    blocks = nb // split
    int_path = xs is not None
    cdt = x.dtype

    def kernel(*refs):
        if int_path:
            x_ref, xs_ref, w_ref, s_ref, o_ref = refs
        else:
            x_ref, w_ref, s_ref, o_ref = refs
        first = pl.program_id(2) * blocks

        def body(t, acc):
            a_lo, a_hi = acc
            b = first + t
            xb = x_ref[:, pl.ds(b * PB, PB)]
            p = w_ref[pl.ds(b * PB, PB), :]
            if int_path:
                dot = lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.int32)
                d_b = dot(xb, p)
                if variant == "shift":  # hi by an arithmetic shift, lo from the byte
                    d_hi = dot(xb, p >> jnp.int8(4))
                    d_u = d_b - 16 * d_hi
                else:
                    d_u = dot(xb, p & jnp.int8(15))
                    d_hi = (d_b - d_u) >> 4  # exact: d_b - d_u = 16 * (x @ hi)
                sx = jnp.sum(xb.astype(jnp.int32), axis=1, keepdims=True)
                lo, hi = (d_u - 8 * sx).astype(jnp.float32), d_hi.astype(jnp.float32)
                a_s = xs_ref[:, pl.ds(b, 1)]
            else:
                prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None
                dot = lambda a, w: jnp.dot(a, w.astype(cdt), preferred_element_type=jnp.float32,
                                           precision=prec)
                d_b = dot(xb, p)
                if variant == "shift":
                    hi = dot(xb, p >> jnp.int8(4))
                    d_u = d_b - 16.0 * hi
                else:
                    d_u = dot(xb, p & jnp.int8(15))
                    hi = (d_b - d_u) * 0.0625
                sx = jnp.sum(xb.astype(jnp.float32), axis=1, keepdims=True)
                lo = d_u - 8.0 * sx
                a_s = 1.0
            s_lo = s_ref[pl.ds(b, 1), pl.ds(0, h)]
            s_hi = s_ref[pl.ds(b, 1), pl.ds(h, h)]
            return a_lo + lo * (a_s * s_lo), a_hi + hi * (a_s * s_hi)

        z = jnp.zeros((bm, h), jnp.float32)
        a_lo, a_hi = lax.fori_loop(0, blocks, body, (z, z))
        o_ref[:, pl.ds(0, h)] = a_lo
        o_ref[:, pl.ds(h, h)] = a_hi

    row = lambda a: pl.BlockSpec((bm, a.shape[1]), lambda i, j, s: (i, 0))
    in_specs = [row(x)] + ([row(xs)] if int_path else []) + [
        pl.BlockSpec((K, h), lambda i, j, s: (0, j)),
        pl.BlockSpec((G, bn), lambda i, j, s: (0, j)),
    ]
    operands = [x] + ([xs] if int_path else []) + [packed, scales]
    out = pl.pallas_call(
        kernel, grid=(M // bm, N // bn, split), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, M, N), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret, name=f"paired_{'w4a4' if int_path else 'w4a16'}_{variant}",
    )(*operands)
    return out.sum(0)


def paired_matmul(x, w, *, kind, tiles, variant, interpret=False):
    """The probe's matmul on a paired weight dict {"paired", "scales"} (library-equivalent math)."""
    kw = dict(bm=tiles.bm, bn=tiles.bn, split=tiles.split, warps=tiles.num_warps,
              stages=tiles.num_stages, variant=variant, interpret=interpret)
    if kind == "w4a16":
        return paired_call(x, w["paired"], w["scales"], None, **kw).astype(x.dtype)
    xq, xs = quantize_activations(x, PB, 4 if kind == "w4a4" else 8)
    return paired_call(xq, w["paired"], w["scales"], xs, **kw).astype(x.dtype)


def make_pair(key, K, N, bn):
    """Random int4 weights in both layouts: library {"packed","scales"} and {"paired","scales"}."""
    kq, ks = jax.random.split(key)
    q = jax.random.randint(kq, (K, N), -7, 8, jnp.int8)
    s = jax.random.uniform(ks, (K // PB, N), jnp.float32, 0.5e-3, 2e-3)
    return {"packed": pack_int4(q, PB), "scales": s}, {"paired": pack_paired(q, bn), "scales": s}, q


def check():
    """Interpret-mode check of every variant against float64 NumPy (CPU)."""
    key = jax.random.key(1)
    K, N, M, bn = 512, 256, 32, 128
    lib, pw, q = make_pair(key, K, N, bn)
    wf = np.asarray(q, np.float64) * np.repeat(np.asarray(lib["scales"], np.float64), PB, axis=0)
    x = jax.random.normal(jax.random.fold_in(key, 7), (M, K), jnp.float32)
    tiles = dataclasses.replace(choose_tiles(M, N, K, PB, "w4a16"), bm=16, bn=bn, split=2)
    for kind in ("w4a16", "w4a4", "w4a8"):
        if kind == "w4a16":
            want = np.asarray(x, np.float64) @ wf
        else:
            xq, xs = quantize_activations(x, PB, 4 if kind == "w4a4" else 8)
            xd = np.asarray(xq, np.float64) * np.repeat(np.asarray(xs, np.float64), PB, axis=1)
            want = xd @ wf
        for variant in ("and", "shift"):
            y = np.asarray(paired_matmul(x, pw, kind=kind, tiles=tiles, variant=variant,
                                         interpret=True), np.float64)
            err = np.linalg.norm(y - want) / np.linalg.norm(want)
            print(f"{kind} {variant}: rel err {err:.2e}")
            assert err < 1e-5, (kind, variant, err)


def lower_check():
    """Export each variant for CUDA (jax 0.10.2 lowers Pallas -> Triton IR without a GPU)."""
    K, N, M = 4096, 1024, 64
    lib, pw, _ = jax.eval_shape(lambda: make_pair(jax.random.key(0), K, N, 128))
    tiles = choose_tiles(M, N, K, PB, "w4a16")
    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    for kind in ("w4a16", "w4a4"):
        for variant in ("and", "shift"):
            fn = functools.partial(paired_matmul, kind=kind, tiles=tiles, variant=variant)
            jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
                jax.export.DisabledSafetyCheck.custom_call(t)
                for t in ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")])(x, pw)
            print("lowered", kind, variant)


def main(out_path, cpu=False):
    """Time every variant beside the library kernels; cpu=True: a tiny interpret-mode smoke run."""
    import bench_kernels as bk
    backend = "interpret" if cpu else "triton"
    shapes = [("tiny", 512, 256)] if cpu else [("qkv", 4096, 6144), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
    key = jax.random.key(0)
    rows = []
    for proj, K, N in shapes:
        wbytes = bk.int4_bytes(K, N, K // PB)
        for M in (16,) if cpu else (16, 32, 64, 128):
            t16, t4 = choose_tiles(M, N, K, PB, "w4a16"), choose_tiles(M, N, K, PB, "w4a4")
            copies = max(2, math.ceil(bk.ROTATE_BYTES / wbytes))
            # The paired layout is fixed at pack time by bn: one weight set per distinct bn.
            sets = {}
            for bn in {t16.bn, t4.bn}:
                pairs = [make_pair(jax.random.fold_in(key, 1000 * i + N), K, N, bn) for i in range(2 if cpu else copies)]
                sets[bn] = ([p[0] for p in pairs], [p[1] for p in pairs])
                del pairs
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            fns = {
                "w4a16": (t16.bn, 0, lambda x, w: w4a16_matmul(x, w, backend=backend, tiles=t16)),
                "w4a4": (t4.bn, 0, lambda x, w: w4a4_matmul(x, w, backend=backend, tiles=t4)),
            }
            for variant in ("and", "shift"):
                for kind, t in (("w4a16", t16), ("w4a4", t4)):
                    fns[f"{kind}_paired_{variant}"] = (t.bn, 1, functools.partial(
                        paired_matmul, kind=kind, tiles=t, variant=variant, interpret=cpu))
            for name, (bn, which, fn) in fns.items():
                try:
                    us = 1e6 * bk.time_loop(fn, x, sets[bn][which], 40, 3)
                except Exception as e:
                    print(proj, M, name, type(e).__name__, str(e)[:400], flush=True)
                    continue
                rows.append({"proj": proj, "K": K, "N": N, "M": M, "method": name, "us": us,
                             "gbps": wbytes / us / 1e3, "tiles": dataclasses.asdict(t16 if "16" in name else t4)})
                print(f"{proj} M={M} {name}: {us:.1f} us ({wbytes / us / 1e3:.0f} GB/s)", flush=True)
                json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                           "rows": rows}, open(out_path, "w"), indent=1)
            # Same values, both layouts: the outputs must agree (catches a wrong GPU lowering).
            for kind, t in (("w4a16", t16), ("w4a4", t4)):
                lib0, pw0 = sets[t.bn][0][0], sets[t.bn][1][0]
                a = np.asarray(fns[kind][2](x, lib0), np.float32)
                for variant in ("and", "shift"):
                    b = np.asarray(paired_matmul(x, pw0, kind=kind, tiles=t, variant=variant, interpret=cpu), np.float32)
                    err = float(np.linalg.norm(a - b) / np.linalg.norm(a))
                    print(f"{proj} M={M} {kind}_paired_{variant} vs library: rel {err:.2e}", flush=True)
                    rows.append({"proj": proj, "M": M, "method": f"{kind}_paired_{variant}", "rel_vs_library": err})
            del sets


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
        lower_check()
    elif sys.argv[1:2] == ["--cpu-smoke"]:
        main(sys.argv[2], cpu=True)
    else:
        main(sys.argv[1])
