"""Where does a decode step's time go? (device experiment, run 2)

Times 16 decode steps of `forward` inside one compiled fori_loop (llama3-8b shapes, generated
weights, batch B, cache of S slots) for w4a16 / w4a4 and with parts swapped out:
  base          the model as it is
  kron_hadamard the online Hadamard as two small dense matmuls (H_p = H_a kron H_b) instead of
                log2(p) butterfly passes
  dus_write     the KV write as vmap(dynamic_update_slice) instead of one scatter
  no_rotation   params without the online rotation (different math; its cost only)
  matmuls_only  just the 4 projections of each layer (scan over layers), no attention/norms
"""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository
import jax, jax.numpy as jnp, numpy as np
from qspec_jax import checkpoint, quantize, rotation
import qspec_jax.model as model
from qspec_jax.config import get_preset
from qspec_jax.kv_cache import KVCache

BATCHES, S, STEPS = [int(b) for b in sys.argv[1].split(",")], int(sys.argv[2]), 16
out_path = sys.argv[3]
config = get_preset(os.environ.get("PRESET", "llama3-8b"))
t0 = time.perf_counter()
fp = checkpoint.random_params(config, seed=0, dtype=jnp.bfloat16)
qp = model.fuse_projections(quantize.quantize_params(fp, config, dtype=jnp.bfloat16))
del fp
print(f"quantized in {time.perf_counter() - t0:.0f}s", flush=True)

fwht_orig, write_orig = rotation.fwht, model.write_layer


def kron_fwht(x):
    p = x.shape[-1]
    a = 1 << (p.bit_length() // 2)
    b = p // a
    ha = jnp.asarray(rotation.walsh_hadamard(a) * np.sqrt(a), jnp.float32)  # unnormalized +-1
    hb = jnp.asarray(rotation.walsh_hadamard(b) * np.sqrt(b), jnp.float32)
    y = x.reshape(*x.shape[:-1], a, b)
    y = jnp.einsum("...ab,ai,bj->...ij", y, ha, hb, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape)


def dus_write(cache_all, new, layer, starts):
    vals = new.astype(cache_all.dtype)
    def one(row_cache, row_new, s):  # row_cache [KV, S, hd]
        return jax.lax.dynamic_update_slice(row_cache, row_new, (0, s, 0))
    layer_cache = jax.vmap(one)(cache_all[layer], vals, starts)
    return jax.lax.dynamic_update_index_in_dim(cache_all, layer_cache, layer, 0)


def decode_loop(params, mode):
    cache = KVCache.create(config, B, S, jnp.bfloat16).replace(lengths=jnp.full((B,), S // 2, jnp.int32))
    def body(i, c):
        cache, tok = c
        pos = (cache.lengths + i)[:, None]
        logits, cache = model.forward(params, tok[:, None], pos, cache, config=config, mode=mode)
        return cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, STEPS, body, (cache, jnp.ones((B,), jnp.int32)))[1]


def matmul_loop(params, mode):
    lin = lambda x, w: model.linear(x, w, mode)
    def step(i, x):
        def layer(x, lp):
            qkv = lin(x, lp["wqkv"])
            x = x + lin(qkv[:, :config.num_heads * config.head_dim], lp["wo"])
            gu = lin(x, lp["w_gate_up"])
            return x + lin(gu[:, :config.intermediate_size], lp["w_down"]), None
        return jax.lax.scan(layer, x, params["layers"])[0]
    return jax.lax.fori_loop(0, STEPS, step, jnp.ones((B, config.hidden_size), jnp.bfloat16) * 0.01)


def time_fn(fn, params, mode):
    # A fresh closure per call: jax caches traces by function, so jitting `fn` itself would hand
    # back the first variant's program for every later batch size or patched helper.
    f = jax.jit(lambda p: fn(p, mode))
    args = (params,)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(3):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)) / STEPS

res = {"S": S, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "ms_per_step": {}}
noro = {k: v for k, v in qp.items() if k != "online_rotation"}
for B, mode in [(b, m) for b in BATCHES for m in ("w4a16", "w4a4")]:
    for name in ("base", "kron_hadamard", "dus_write", "no_rotation", "matmuls_only"):
        rotation.fwht = kron_fwht if name == "kron_hadamard" else fwht_orig
        model.write_layer = dus_write if name == "dus_write" else write_orig
        try:
            if name == "matmuls_only":
                ms = time_fn(matmul_loop, qp, mode)
            else:
                ms = time_fn(decode_loop, noro if name == "no_rotation" else qp, mode)
        except Exception as e:
            print(name, mode, type(e).__name__, str(e)[:200], flush=True); continue
        res["ms_per_step"][f"B{B}/{mode}/{name}"] = ms
        print(f"B={B} S={S} {mode} {name}: {ms:.2f} ms/step", flush=True)
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
rotation.fwht, model.write_layer = fwht_orig, write_orig
