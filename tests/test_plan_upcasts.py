"""The planner's account of XLA:CPU's float32 copies of bfloat16 weights (sft_jax/plan/upcasts.py)."""

import jax
import jax.numpy as jnp

from sft_jax.plan.upcasts import cpu_upcast_bytes

LAYERS, WIDTH = 4, 256


def _scanned_dots(cast_in_program: bool):
    def loss(x, stack):
        if cast_in_program:  # a conversion the program asks for: real on every backend
            stack = stack.astype(jnp.float32)

        def layer(h, w):
            y = jax.lax.dot_general(h, w.astype(h.dtype) if cast_in_program else w, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
            return jnp.tanh(y).astype(h.dtype), None

        return jax.lax.scan(layer, x, stack)[0].astype(jnp.float32).sum()

    dtype = jnp.float32 if cast_in_program else jnp.bfloat16
    x = jax.ShapeDtypeStruct((64, WIDTH), dtype)
    stack = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.bfloat16)
    return jax.jit(jax.grad(loss)).lower(x, stack).compile().as_text()


def test_counts_the_compilers_float32_copy_of_a_scanned_bfloat16_stack():
    """A bfloat16 dot over scanned bfloat16 weights: XLA:CPU converts the whole stack to float32 once."""
    assert cpu_upcast_bytes(_scanned_dots(cast_in_program=False)) == 4 * LAYERS * WIDTH * WIDTH


def test_leaves_out_conversions_the_program_asks_for():
    assert cpu_upcast_bytes(_scanned_dots(cast_in_program=True)) == 0


def test_no_entry_computation_means_nothing_counted():
    assert cpu_upcast_bytes("") == 0
