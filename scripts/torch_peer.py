"""PyTorch peers for scripts/bench_engine.py: what a user would pick instead, timed on the same GPU.

- `copy_bandwidth()`: one large device-to-device memcpy (the floors' bandwidth: XLA's own copy loop
  understates what the memory can do).
- `time_linear()`: tinygemm int4 (`torch.ops.aten._weight_int4pack_mm`, group 128) and cuBLAS bf16
  linears over rotating weight copies larger than L2, replayed as one CUDA graph.
- `PeerDecoder`: a plain Llama decode step in the style of gpt-fast (fused qkv and gate/up linears,
  RMSNorm, RoPE, a static bf16 KV cache written in place, SDPA with grouped-query heads), its
  linears int4 tinygemm or bf16 cuBLAS, captured as one CUDA graph (eager kernels, no fusion).

Weights are random: only speed is measured here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_ROTATE_BYTES = 256 * 2**20


def copy_bandwidth(nbytes: int = 2**31, iters: int = 20) -> float:
    """Bytes read + written per second by cudaMemcpy device to device (median of `iters`)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    del a, b
    torch.cuda.empty_cache()  # give the 4 GiB back: JAX may need it (bench_long_context's 16 x 32k cache)
    return 2 * nbytes / times[len(times) // 2]


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of `fn` captured in a CUDA graph (median over reps of replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: JAX's runtime threads in the same process may make CUDA calls that a global-mode
    # capture counts as unsafe (cudaErrorStreamCaptureInvalidated after token-major JAX steps).
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def int4_linear_weight(K: int, N: int, group: int = 128, inner_k_tiles: int = 8):
    """(packed weight, scales_and_zeros) for tinygemm: random uint4 values, bf16 scales and zeros."""
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    sz = torch.empty(K // group, N, 2, dtype=torch.bfloat16, device="cuda")
    sz[..., 0].uniform_(0.001, 0.01)
    sz[..., 1].uniform_(-0.05, 0.05)
    return w, sz


def make_linear(kind: str, K: int, N: int, group: int = 128):
    """A callable x [M, K] bf16 -> [M, N] bf16 holding one random weight of the given kind."""
    if kind == "tinygemm":
        w, sz = int4_linear_weight(K, N, group)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, w, group, sz)
    w = torch.randn(K, N, dtype=torch.bfloat16, device="cuda") * 0.02
    return lambda x: x @ w


def time_linear(kind: str, M: int, K: int, N: int, group: int = 128) -> float:
    """Microseconds per call over rotating weight copies larger than L2 (one CUDA graph)."""
    per_copy = K * N // 2 if kind == "tinygemm" else 2 * K * N
    copies = max(2, -(-L2_ROTATE_BYTES // per_copy))
    fns = [make_linear(kind, K, N, group) for _ in range(copies)]
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")

    def run():
        for f in fns:
            f(x)

    sec = graph_time(run)
    del fns
    torch.cuda.empty_cache()
    return 1e6 * sec / copies


class PeerDecoder:
    """One Llama decode step (batch B, one new token per row at position `pos`) in plain PyTorch."""

    def __init__(self, cfg, batch: int, max_len: int, pos: int, kind: str):
        d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        self.cfg, self.batch, self.pos = cfg, batch, pos
        self.layers = []
        for _ in range(cfg.num_layers):
            self.layers.append(dict(
                attn_norm=torch.ones(d, dtype=torch.bfloat16, device="cuda"),
                mlp_norm=torch.ones(d, dtype=torch.bfloat16, device="cuda"),
                wqkv=make_linear(kind, d, (h + 2 * kv) * hd), wo=make_linear(kind, h * hd, d),
                w_gate_up=make_linear(kind, d, 2 * f), w_down=make_linear(kind, f, d),
                k=torch.randn(batch, kv, max_len, hd, dtype=torch.bfloat16, device="cuda"),
                v=torch.randn(batch, kv, max_len, hd, dtype=torch.bfloat16, device="cuda"),
            ))
        self.embed = torch.randn(cfg.vocab_size, d, dtype=torch.bfloat16, device="cuda") * 0.02
        self.lm_head = torch.randn(d, cfg.vocab_size, dtype=torch.bfloat16, device="cuda") * 0.02
        self.final_norm = torch.ones(d, dtype=torch.bfloat16, device="cuda")
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
        ang = pos * inv
        self.cos, self.sin = torch.cos(ang).to(torch.bfloat16), torch.sin(ang).to(torch.bfloat16)
        self.mask = (torch.arange(max_len, device="cuda") <= pos)[None, None, None, :]
        self.tokens = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")

    def rope(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)

    def step(self):
        c, b = self.cfg, self.batch
        h_, kv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        x = self.embed[self.tokens]  # [B, D]
        for lp in self.layers:
            h = F.rms_norm(x, (x.shape[-1],), lp["attn_norm"], c.rms_norm_eps)
            q, k, v = lp["wqkv"](h).split([h_ * hd, kv * hd, kv * hd], dim=-1)
            q = self.rope(q.view(b, h_, 1, hd))
            k = self.rope(k.view(b, kv, 1, hd))
            lp["k"][:, :, self.pos: self.pos + 1] = k
            lp["v"][:, :, self.pos: self.pos + 1] = v.view(b, kv, 1, hd)
            a = F.scaled_dot_product_attention(q, lp["k"], lp["v"], attn_mask=self.mask, enable_gqa=True)
            x = x + lp["wo"](a.reshape(b, h_ * hd))
            h = F.rms_norm(x, (x.shape[-1],), lp["mlp_norm"], c.rms_norm_eps)
            gate, up = lp["w_gate_up"](h).chunk(2, dim=-1)
            x = x + lp["w_down"](F.silu(gate) * up)
        x = F.rms_norm(x, (x.shape[-1],), self.final_norm, c.rms_norm_eps)
        self.tokens = torch.argmax(x @ self.lm_head, dim=-1)
        return self.tokens


def time_decode_step(cfg, batch: int, max_len: int, pos: int, kind: str) -> float:
    """Seconds per decode step of PeerDecoder, 8 steps per CUDA-graph replay."""
    peer = PeerDecoder(cfg, batch, max_len, pos, kind)

    def eight():
        for _ in range(8):
            peer.step()

    with torch.no_grad():
        sec = graph_time(eight, reps=10) / 8
    del peer
    torch.cuda.empty_cache()
    return sec
