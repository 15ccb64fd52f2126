"""Device check of the fused residual add + RMSNorm (model.FUSED_RESIDUAL_NORM) on the Mosaic
kernels' real split-K halves, before its step is timed. Writes one JSON to argv[1].

1. Kernels: o_proj / down_proj shapes of Llama-3-8B at M = 1 and 16: `mosaic_matmul(...,
   unjoined=True)` must return SplitKHalves; the Triton kernel's x must equal XLA's join + add bit for
   bit, and its h be within bf16 rounding of XLA's norm.
2. The model: a 2-layer Llama-3-8B-shaped model (generated weights), one decode step at batch 16
   with the switch off and on: logits' relative error and argmax agreement.

    python3 benchmarks/engine/runs/check_residual_norm.py $OUT/check_residual_norm.json
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.int4_mosaic import SplitKHalves, mosaic_matmul, to_mosaic_layout  # noqa: E402
from pallas_kernels.packing import quantize_weight  # noqa: E402
from pallas_kernels.residual_norm import residual_rmsnorm  # noqa: E402
from qspec_jax import checkpoint, model, quantize  # noqa: E402
from qspec_jax.config import get_preset  # noqa: E402
from qspec_jax.evaluation import run_metadata  # noqa: E402
from qspec_jax.kernel_choice import arrange_weights  # noqa: E402
from qspec_jax.kv_cache import KVCache  # noqa: E402

EPS = 1e-5


def kernel_cells(rng):
    cells = []
    for name, (K, N) in {"o": (4096, 4096), "down": (14336, 4096)}.items():
        mw = to_mosaic_layout(quantize_weight(jnp.asarray(rng.standard_normal((K, N)), jnp.float32) * 0.02, 128))
        for m in (1, 16):
            x_in = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
            resid = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
            cell = {"proj": name, "M": m}
            try:
                parts = jax.jit(lambda a, w: mosaic_matmul(a, w, "w4a16", unjoined=True))(x_in, mw)
                cell["split_k_halves"] = isinstance(parts, SplitKHalves)
                if cell["split_k_halves"]:
                    cell["split"] = int(parts.halves.shape[0])
                    got_x, got_h = residual_rmsnorm(resid, parts, None, EPS)
                    want_x = resid + parts.join().astype(jnp.bfloat16)
                    want_h = model.rms_norm(want_x, None, EPS)
                    cell["x_equal"] = bool(jnp.array_equal(got_x, want_x))
                    diff = np.abs(np.asarray(got_h, np.float64) - np.asarray(want_h, np.float64))
                    cell["h_max_rel_err"] = float(diff.max() / np.abs(np.asarray(want_h, np.float64)).max())
            except Exception as e:  # noqa: BLE001 - the file says which cell failed and why
                cell["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(cell, flush=True)
            cells.append(cell)
    return cells


def model_cell(batch=16):
    config = dataclasses.replace(get_preset("llama3-8b"), num_layers=2)
    fparams = checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16)
    qparams = model.unstack_layers(model.fuse_projections(
        quantize.quantize_params(fparams, config, group_size=128, dtype=jnp.bfloat16)))
    params = arrange_weights(qparams, "mosaic")
    tok = jax.random.randint(jax.random.key(0), (batch, 1), 3, config.vocab_size)
    pos = jnp.full((batch, 1), 37, jnp.int32)
    logits = {}
    for fused in (False, True):
        model.FUSED_RESIDUAL_NORM = fused
        cache = KVCache.create(config, batch, 128, jnp.bfloat16)
        step = jax.jit(lambda p, c, t, q: model.forward(p, t, q, c, config=config, mode="w4a16")[0])
        logits[fused] = np.asarray(step(params, cache, tok, pos), np.float64)
    model.FUSED_RESIDUAL_NORM = False
    rel = np.abs(logits[True] - logits[False]).max() / np.abs(logits[False]).max()
    agree = float(np.mean(logits[True].argmax(-1) == logits[False].argmax(-1)))
    return {"batch": batch, "layers": 2, "logits_max_rel_err": float(rel), "argmax_agreement": agree}


def main():
    out = {"meta": run_metadata(), "kernels": kernel_cells(np.random.default_rng(0))}
    try:
        out["model"] = model_cell()
    except Exception as e:  # noqa: BLE001
        out["model"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    print(out["model"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
