"""float32 GFLOP/s of SmolLM2-135M's projection matmuls alone, forward and backward (one `jax.vjp`), 4 x 256
tokens: q/k/v as three dots against one dot over the concatenated weights, and gate/up likewise. Run it with
and without XLA_FLAGS=--xla_cpu_use_xnnpack=true (sft_jax's command line sets it) to compare XLA's paths."""
import time

import jax
import jax.numpy as jnp

TOKENS, WIDTH, Q, KV, FFN = 1024, 576, 576, 192, 1536


def separate(x, *ws):
    return jnp.concatenate([x @ w for w in ws], -1)


def fused(x, *ws):
    return x @ jnp.concatenate(ws, 1)


def forward_backward(f, cotangent):
    def run(*args):
        y, pull = jax.vjp(f, *args)
        return y, pull(cotangent)
    return jax.jit(run)


def best(f, args, n=20):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (TOKENS, WIDTH))
    qkv = [jax.random.normal(k[i], (WIDTH, n)) for i, n in ((1, Q), (2, KV), (3, KV))]
    gate_up = [jax.random.normal(k[i], (WIDTH, FFN)) for i in (4, 5)]
    cases = {"q/k/v": (qkv, jax.random.normal(k[6], (TOKENS, Q + 2 * KV))),
             "gate/up": (gate_up, jax.random.normal(k[7], (TOKENS, 2 * FFN)))}
    for _ in range(3):
        line = []
        for name, (ws, cot) in cases.items():
            gflop = 3 * 2 * TOKENS * WIDTH * cot.shape[1] / 1e9  # forward, input gradient, weight gradient
            a, b = (best(forward_backward(f, cot), (x, *ws)) for f in (separate, fused))
            line.append(f"{name}: separate {gflop / a:.0f}, fused {gflop / b:.0f} GFLOP/s ({a / b:.2f}x)")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
