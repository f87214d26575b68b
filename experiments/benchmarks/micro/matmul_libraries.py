"""float32 GFLOP/s of the models' matmul shapes: JAX (XLA:CPU), numpy (OpenBLAS), PyTorch, interleaved."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

torch.set_num_threads(2)
SHAPES = [(2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576), (4096, 384, 1536), (4096, 1536, 384),
          (1024, 576, 576), (576, 1024, 1536)]


def best(f, n=5):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


dot = jax.jit(jnp.dot)
for _ in range(2):
    for m, k, n in SHAPES:
        a, b = np.random.randn(m, k).astype(np.float32), np.random.randn(k, n).astype(np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        gf = 2 * m * k * n / 1e9
        rates = [gf / best(f) for f in (lambda ja=ja, jb=jb: dot(ja, jb).block_until_ready(),
                                        lambda a=a, b=b: a @ b, lambda ta=ta, tb=tb: ta @ tb)]
        print(f"{m}x{k}x{n}: jax {rates[0]:.0f} numpy {rates[1]:.0f} torch {rates[2]:.0f} GFLOP/s", flush=True)
