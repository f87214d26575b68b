"""`write_safetensors` writes each tensor from where it is: a numpy array whole, a sharded `jax.Array` shard by
shard (rows, columns, a middle dimension, two mesh axes at once, replicated parts once), giving the file
safetensors' own reader reads back as the arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sft_jax.models.loading.safetensors_stream import Tensor, write_safetensors

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


def test_sharded_arrays_are_written_shard_by_shard(tmp_path):
    from safetensors.numpy import load_file

    mesh = jax.make_mesh((4, 2), ("a", "b"))
    rng = np.random.default_rng(0)
    cases = {  # name: (values, partition spec)
        "rows": (rng.normal(size=(8, 6)), PartitionSpec("a", None)),
        "columns": (rng.normal(size=(6, 8)), PartitionSpec(None, "a")),
        "middle": (rng.normal(size=(3, 8, 5)), PartitionSpec(None, "a", None)),
        "both": (rng.normal(size=(8, 4)), PartitionSpec("a", "b")),
        "last_of_three": (rng.normal(size=(2, 3, 8)), PartitionSpec(None, None, ("a", "b"))),
        "replicated": (rng.normal(size=(5, 3)), PartitionSpec()),
        "vector": (rng.normal(size=(8,)), PartitionSpec("b")),
        "scalar": (np.array(2.5), PartitionSpec()),
    }
    arrays = {name: jax.device_put(np.float32(v), NamedSharding(mesh, spec)) for name, (v, spec) in cases.items()}
    host = rng.normal(size=(7, 2)).astype(np.float32)
    tensors = [Tensor(n, a.shape, np.float32, lambda a=a: a) for n, a in arrays.items()]
    tensors.append(Tensor("numpy", host.shape, np.float32, lambda: host))
    written = write_safetensors(tmp_path / "w.safetensors", tensors)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == {*cases, "numpy"}
    for name, (values, _) in cases.items():
        np.testing.assert_array_equal(back[name], np.float32(values), err_msg=name)
    np.testing.assert_array_equal(back["numpy"], host)
    assert written == sum(np.float32(v).nbytes for v, _ in cases.values()) + host.nbytes  # each byte once


def test_a_tensor_produced_in_another_shape_is_refused_and_nothing_is_left_under_the_name(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="'x' came out float32\\[2, 3\\], declared float32\\[3, 2\\]"):
        write_safetensors(path, [Tensor("x", (3, 2), np.float32, lambda: np.zeros((2, 3), np.float32))])
    assert not path.exists()
