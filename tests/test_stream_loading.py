"""Streaming a HF checkpoint onto a mesh (`sft_jax.models.loading.stream`): each device reads only its own
slice from the file, and the result equals `load_decoder`'s parameters, placed as `param_shardings` says."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import sharding
from sft_jax.models.loading import stream
from sft_jax.models.loading.lm import load_decoder
from sft_jax.state import ModelDef

REPO = pathlib.Path(__file__).resolve().parents[1]
# Untied embeddings, so the LM head (transposed, vocab split over "tensor") is read too; a small vocabulary.
LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
MESHES = [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see conftest.py")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The same random tiny Llama as one file, as several shards with an index, and in bfloat16."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    out = {k: tmp_path_factory.mktemp(f"llama_{k}") for k in ("single", "sharded", "bf16")}
    model.save_pretrained(out["single"], safe_serialization=True)
    model.save_pretrained(out["sharded"], safe_serialization=True, max_shard_size="40KB")
    model.to(torch.bfloat16).save_pretrained(out["bf16"], safe_serialization=True, max_shard_size="40KB")
    assert (out["sharded"] / "model.safetensors.index.json").is_file()
    weight_map = json.loads((out["sharded"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    return out


def _reference(model_dir):
    model, _ = load_decoder(str(model_dir))
    model_def, params = ModelDef.split(model)
    return model_def, {k: np.asarray(v) for k, v in params.items()}


@pytest.mark.parametrize("kind", ["single", "sharded"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_equals_load_decoder_and_is_sharded(dirs, kind, shape):
    mesh = sharding.make_mesh(shape)
    model_def, want = _reference(dirs[kind])
    model, config = stream.load_decoder_sharded(dirs[kind], mesh)
    got_def, got = ModelDef.split(model)
    assert got_def.names == model_def.names and got_def.axes == model_def.axes
    expected = sharding.param_shardings(list(want), mesh, shapes={k: v.shape for k, v in want.items()},
                                        axes=model_def.axes)
    sharded = 0
    for name, value in got.items():
        assert value.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(value), want[name], err_msg=name)
        assert value.sharding.is_equivalent_to(expected[name], value.ndim), (name, value.sharding, expected[name])
        sharded += len(value.sharding.spec) > 0
    assert sharded == 7 * config.num_layers + 2  # every kernel and both embedding tables are split; norms whole
    # The loaded module computes what load_decoder's does.
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    reference = model_def.merge({k: jnp.asarray(v) for k, v in want.items()})
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)), rtol=1e-5, atol=1e-5)


def test_bfloat16(dirs):
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    _, want = _reference(dirs["bf16"])  # load_decoder upcasts the bfloat16 file to float32
    f32, _ = stream.load_decoder_sharded(dirs["bf16"], mesh)
    bf16, _ = stream.load_decoder_sharded(dirs["bf16"], mesh, param_dtype=jnp.bfloat16)
    got32, got16 = ModelDef.split(f32)[1], ModelDef.split(bf16)[1]
    for name in want:
        assert got16[name].dtype == jnp.bfloat16 and got32[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got32[name]), want[name], err_msg=name)
        np.testing.assert_array_equal(np.asarray(got16[name]), want[name].astype(jnp.bfloat16), err_msg=name)
        assert got16[name].sharding == got32[name].sharding
    # A float32 file read as bfloat16 rounds the way XLA does.
    from_f32, _ = stream.load_decoder_sharded(dirs["single"], mesh, param_dtype=jnp.bfloat16)
    _, want32 = _reference(dirs["single"])
    for name, value in ModelDef.split(from_f32)[1].items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(jnp.asarray(want32[name]).astype(jnp.bfloat16)))


def test_phi3_fused_projections_read_by_rows(tmp_path):
    """Phi-3 stores q, k, v in one `qkv_proj` (gate and up in `gate_up_proj`): each device reads its rows of
    the fused tensor, and nothing else, and gets load_decoder's values."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    transformers.Phi3ForCausalLM(transformers.Phi3Config(**config)).save_pretrained(tmp_path, max_shard_size="40KB")
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    _, want = _reference(tmp_path)
    model, _ = stream.load_decoder_sharded(tmp_path, mesh)
    for name, value in ModelDef.split(model)[1].items():
        np.testing.assert_array_equal(np.asarray(value), want[name], err_msg=name)
    index = stream.SafetensorsIndex(tmp_path)
    names = stream.decoder_names_and_axes(model.config)[2]
    assert names["layers/0/attn/k/kernel"] == ("model.layers.0.self_attn.qkv_proj.weight", True, (32, 48))
    assert names["layers/1/mlp/up/kernel"] == ("model.layers.1.mlp.gate_up_proj.weight", True, (64, 128))
    shardings = sharding.param_shardings(list(names), mesh, shapes={k: v.shape for k, v in want.items()},
                                         axes=ModelDef.split(model)[0].axes)
    attention = {k: v for k, v in names.items() if "qkv" in v.name}
    stream.load_sharded(index, attention, {k: want[k].shape for k in attention}, shardings)
    # q, k and v each read once in all (replicas share a read), from the fused tensor alone.
    assert set(index.bytes_read) == {v.name for v in attention.values()}
    assert sum(index.bytes_read.values()) == sum(want[k].nbytes for k in attention)


def test_raw_bytes_fallback_for_bfloat16(dirs, monkeypatch):
    """Where safetensors' numpy framework cannot give bfloat16, the slice is read through a memory map of the
    tensor's bytes (header offsets + ml_dtypes), with the same result."""
    mesh = sharding.make_mesh({"fsdp": 8})
    want = ModelDef.split(stream.load_decoder_sharded(dirs["bf16"], mesh, param_dtype=jnp.bfloat16)[0])[1]
    real = stream.safe_open

    class NoBf16:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_slice(self, name):
            raise TypeError("data type 'bfloat16' not understood")

    monkeypatch.setattr(stream, "safe_open", NoBf16)
    got = ModelDef.split(stream.load_decoder_sharded(dirs["bf16"], mesh, param_dtype=jnp.bfloat16)[0])[1]
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_each_device_reads_only_its_slice(dirs, shape):
    mesh = sharding.make_mesh(shape)
    config = stream.DecoderConfig.from_hf(json.loads((dirs["sharded"] / "config.json").read_text()))
    _, _, names, shapes, axes = stream.decoder_names_and_axes(config)
    shardings = sharding.param_shardings(list(names), mesh, shapes=shapes, axes=axes)
    index = stream.SafetensorsIndex(dirs["sharded"])
    arrays = stream.load_sharded(index, names, shapes, shardings)
    for path, (name, _, _) in names.items():
        # Each tensor is read once in all: 8 slices of an 8-way split one, 1 read for a replicated one.
        indices = shardings[path].devices_indices_map(shapes[path]).values()
        distinct = len({stream._key(i, shapes[path]) for i in indices})
        reads = [r for r in index.reads if r[0] == name]
        assert len(reads) == distinct, (path, reads)
        assert index.bytes_read[name] == index.nbytes(name), path
        assert all(nbytes == index.nbytes(name) // distinct for _, _, nbytes in reads), path
        if len(arrays[path].sharding.spec) and shape == {"fsdp": 8}:
            assert distinct == 8, path
    assert sum(index.bytes_read.values()) == sum(index.nbytes(n) for n in index.names())


def test_missing_and_misshaped_tensors_named(dirs):
    mesh = sharding.make_mesh({"fsdp": 8})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    names = {"a": ("model.nope.weight", False), "b": ("model.norm.weight", False),
             "c": ("lm_head.weight", True), "d": ("model.embed_tokens.weight", True)}
    shapes = {"a": (4,), "b": (7,), "c": (32, 256), "d": (256, 32)}
    index = stream.SafetensorsIndex(dirs["single"])
    with pytest.raises(ValueError) as e:
        stream.load_sharded(index, names, shapes, dict.fromkeys(names, replicated))
    message = str(e.value)
    assert "missing keys: model.nope.weight" in message
    assert "model.norm.weight: checkpoint (32,), expected (7,)" in message
    assert "model.embed_tokens.weight: checkpoint (256, 32), expected (256, 32) (transposed)" in message
    assert "lm_head.weight" not in message
    assert index.reads == []  # nothing is read before the names and shapes are checked
    with pytest.raises(FileNotFoundError):
        stream.SafetensorsIndex(dirs["single"].parent)


_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from sft_jax import sharding
from sft_jax.models.loading import stream
from sft_jax.state import ModelDef
mesh = sharding.make_mesh({"fsdp": 4})
config = stream.DecoderConfig.from_hf(json.loads(open(sys.argv[3] + "/config.json").read()))
_, _, names, shapes, axes = stream.decoder_names_and_axes(config)
shardings = sharding.param_shardings(list(names), mesh, shapes=shapes, axes=axes)
index = stream.SafetensorsIndex(sys.argv[3])
arrays = stream.load_sharded(index, names, shapes, shardings)
full = {k: sharding.to_host(v).tolist() for k, v in arrays.items()}
print(json.dumps({"bytes": dict(index.bytes_read), "full": full if int(sys.argv[2]) == 0 else None}))
"""


def test_two_processes_read_half_each(dirs, tmp_path):
    """2 processes x 2 CPU devices, FSDP over the 4: each process reads only the slices of its own devices,
    about half of every split tensor, and the global arrays equal the single-process ones."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"localhost:{port}", str(i), str(dirs["single"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    index = stream.SafetensorsIndex(dirs["single"])
    _, want = _reference(dirs["single"])
    total = sum(index.nbytes(n) for n in index.names())
    for out in outs:
        read = sum(out["bytes"].values())
        assert 0.45 * total < read < 0.6 * total, (read, total)  # norms (replicated) are read by both
        down = "model.layers.0.mlp.down_proj.weight"
        assert out["bytes"][down] == index.nbytes(down) // 2
    for name, value in outs[0]["full"].items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), want[name], err_msg=name)
