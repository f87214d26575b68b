"""The hash-based dropout mask: its rate, independence across positions and keys, and sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sft_jax.models.dropout import dropout, hash_bits, keep_mask


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_keep_rate(keep):
    mask = np.asarray(keep_mask(jax.random.key(0), keep, (64, 128, 96)))
    n = mask.size
    # Binomial standard error at n = 786k is under 6e-4; 5 of them.
    assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)


def test_bits_are_uniform_and_uncorrelated():
    bits = np.asarray(hash_bits(jax.random.key(1), (256, 512))).astype(np.float64) / 2**32
    # Uniform on [0, 1): 16 bins each within 5 standard errors of 1/16.
    counts = np.histogram(bits, bins=16, range=(0, 1))[0] / bits.size
    assert np.all(np.abs(counts - 1 / 16) < 5 * np.sqrt((1 / 16) * (15 / 16) / bits.size))
    # Neighbours along each axis (consecutive indices, and indices a row apart) are uncorrelated.
    se = 5 / np.sqrt(bits.size)
    for a, b in [(bits[:, 1:], bits[:, :-1]), (bits[1:], bits[:-1])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < se
    # Each of the 32 bits is set half the time.
    raw = np.asarray(hash_bits(jax.random.key(1), (256, 512)))
    frac = np.array([((raw >> i) & 1).mean() for i in range(32)])
    assert np.all(np.abs(frac - 0.5) < 5 * 0.5 / np.sqrt(raw.size))


def test_keys_give_independent_masks():
    shape = (128, 256)
    base = jax.random.key(7)
    masks = [np.asarray(keep_mask(k, 0.5, shape)) for k in
             [base, jax.random.fold_in(base, 1), jax.random.fold_in(base, 2), jax.random.split(base)[0]]]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            agree = (masks[i] == masks[j]).mean()
            assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(masks[i].size), (i, j, agree)
    # The same key gives the same mask (reproducible).
    np.testing.assert_array_equal(np.asarray(keep_mask(base, 0.5, shape)), masks[0])


def test_dropout_scales_and_passes_through():
    x = jnp.ones((64, 64), jnp.float32)
    y = np.asarray(dropout(x, 0.25, jax.random.key(3)))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert dropout(x, 0.25, None) is x and dropout(x, 0.0, jax.random.key(3)) is x
    assert dropout(x.astype(jnp.bfloat16), 0.1, jax.random.key(3)).dtype == jnp.bfloat16


def test_mask_is_the_same_under_sharding():
    """Every element's bit depends on its global index only, so a sharded jit draws the one-device mask."""
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("a", "b"))
    shape = (8, 12, 16, 32)
    key = jax.random.key(11)
    want = np.asarray(jax.jit(lambda k: keep_mask(k, 0.9, shape))(key))
    for spec in [P("a", "b"), P(None, "b", "a"), P(("a", "b"))]:
        f = jax.jit(lambda k: keep_mask(k, 0.9, shape), out_shardings=NamedSharding(mesh, spec))
        np.testing.assert_array_equal(np.asarray(f(key)), want)
    # And inside a computation whose input is sharded (the mask follows the activation's sharding).
    x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, P("a", None, "b")))
    got = jax.jit(lambda x, k: dropout(x, 0.1, k))(x, key)
    np.testing.assert_array_equal(np.asarray(got) != 0, want)
