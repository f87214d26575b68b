"""old: LoRA adapter products as plain jnp.matmul; new: through the base layer's dot (mixed.linear_dot)."""
import jax.numpy as jnp

import sft_jax.models.lora as lora

_NEW = lora.LoRALinear.__call__


def _old(self, x, rng=None):  # the benchmark's LoRA has no bias and no adapter dropout
    x, kernel, _ = self.promote_dtype((x, self.kernel.value, None), dtype=self.dtype)
    y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    a, b = self.lora_a.value.astype(x.dtype), self.lora_b.value.astype(x.dtype)
    delta = jnp.matmul(jnp.matmul(x, a, precision=self.precision), b, precision=self.precision)
    return y + (delta * self.scale).astype(y.dtype)


def apply(variant: str) -> None:
    lora.LoRALinear.__call__ = {"old": _old, "new": _NEW}[variant]
