"""Encoders beside BERT: RoBERTa, XLM-RoBERTa and ModernBERT against transformers, partial runs, refusals.

Tiny random models are built with transformers' config classes and saved to tmp (nothing is downloaded);
token ids are fed directly. Hidden states and mean-pooled embeddings are compared in float32 under matmul
precision "highest" within 1e-5 on the real positions of a padded batch.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sft_jax.models.bert import fairseq_position_ids
from sft_jax.models.classifier import EncoderClassifier, bert_layout
from sft_jax.models.loading.hf import load_bert, load_bert_config, load_encoder, load_encoder_config
from sft_jax.models.modernbert import FULL, SLIDING, ModernBertConfig
from sft_jax.models.pooling import mean_pool
from sft_jax.sharding import LOGICAL_AXES
from sft_jax.state import ModelDef

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
PAD = 1  # RoBERTa's <pad>: positions start at PAD + 1
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=20, type_vocab_size=1, pad_token_id=PAD, bos_token_id=0, eos_token_id=2)
# Three layers, global / local / global, each local one seeing 2 tokens either side: the 9-token rows of
# `_padded_batch` need the window.
TINY_MODERNBERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=48, global_attn_every_n_layers=2, local_attention=4, pad_token_id=PAD,
                       bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)
FAMILIES = {
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel,
                transformers.RobertaForSequenceClassification),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel,
                    transformers.XLMRobertaForSequenceClassification),
    "modernbert": (transformers.ModernBertConfig, transformers.ModernBertModel,
                   transformers.ModernBertForSequenceClassification),
}


def _save_tiny(path: pathlib.Path, family: str, *, head: bool = False, **overrides) -> pathlib.Path:
    config_cls, base_cls, head_cls = FAMILIES[family]
    torch.manual_seed(0)
    tiny = TINY_MODERNBERT if family == "modernbert" else TINY
    model = (head_cls if head else base_cls)(config_cls(**{**tiny, **overrides}))
    # The default init (std 0.02, unit LayerNorm, zero biases, a zero pad row in the position table) would
    # leave parity blind to norm, bias and position mix-ups: perturb every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _padded_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of lengths 9, 5, 1 padded with PAD; real ids avoid PAD (RoBERTa positions are decided by the ids)."""
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 1]
    mask = (np.arange(9)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(PAD + 1, TINY["vocab_size"], size=mask.shape)
    return {"input_ids": np.where(mask == 1, ids, PAD), "attention_mask": mask}


def _torch_outputs(model_dir: pathlib.Path, family: str, batch) -> tuple[np.ndarray, np.ndarray]:
    # Eager attention: the reference is the plain masked softmax, with no fused kernel in between.
    model = FAMILIES[family][1].from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    mask = batch["attention_mask"][..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * mask).sum(1) / mask.sum(1)
    return hidden, pooled.astype(np.float32)


def _our_outputs(model_dir: pathlib.Path, batch, ignore=()) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_encoder(model_dir, ignore=ignore)
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, ids, mask):
        hidden = nnx.merge(graphdef, params)(ids, mask)
        return hidden, mean_pool(hidden, mask)

    with jax.default_matmul_precision("highest"):
        hidden, pooled = forward(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    return np.asarray(hidden), np.asarray(pooled)


PARITY_CASES = [("roberta", False, {}), ("xlm-roberta", False, {}), ("roberta", True, {}),
                ("modernbert", False, {}), ("modernbert", True, {}),
                ("modernbert", False, dict(norm_bias=True, attention_bias=True, mlp_bias=True))]


@pytest.mark.parametrize("family,head,overrides", PARITY_CASES)
def test_tiny_random_encoder_matches_transformers(tmp_path, family, head, overrides):
    # head=True saves *ForSequenceClassification: the encoder under "roberta." / "model.", a classifier that is
    # an error to leave unread until the user says to drop it.
    _save_tiny(tmp_path, family, head=head, **overrides)
    if head:
        prefix = "model." if family == "modernbert" else "roberta."
        assert any(k.startswith(prefix + "embeddings.") for k in load_file(tmp_path / "model.safetensors"))
        with pytest.raises(ValueError, match=r"tensors of model\.safetensors not used .*\(classifier\."):
            load_encoder(tmp_path)
    batch = _padded_batch()
    ref_hidden, ref_pooled = _torch_outputs(tmp_path, family, batch)
    hidden, pooled = _our_outputs(tmp_path, batch, ignore=(r"^classifier\.",) if head else ())
    keep = batch["attention_mask"].astype(bool)
    assert np.abs(hidden[keep] - ref_hidden[keep]).max() < TOL
    assert np.abs(pooled - ref_pooled).max() < TOL
    config = load_encoder_config(tmp_path)
    if family == "modernbert":
        assert config.layer_types == (FULL, SLIDING, FULL)
        assert (config.global_rope_theta, config.local_rope_theta) == (160000.0, 10000.0)
    else:
        assert (config.model_type, config.pad_token_id, config.type_vocab_size) == (family, PAD, 1)


def test_modernbert_window_and_rotary_bases_matter(tmp_path):
    """The parity above would hold by chance if the local window or the per-layer rotary base did not act on
    9-token rows: with either changed, the outputs move far from transformers'."""
    _save_tiny(tmp_path, "modernbert")
    batch = _padded_batch()
    ref, _ = _torch_outputs(tmp_path, "modernbert", batch)
    keep = batch["attention_mask"].astype(bool)
    config = json.loads((tmp_path / "config.json").read_text())
    for change in (dict(layer_types=[FULL] * 3),
                   dict(rope_parameters={FULL: {"rope_type": "default", "rope_theta": 10000.0},
                                         SLIDING: {"rope_type": "default", "rope_theta": 10000.0}})):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        hidden, _ = _our_outputs(tmp_path, batch)
        assert np.abs(hidden[keep] - ref[keep]).max() > 1e-3, change


def test_modernbert_reads_the_original_hub_config():
    """ModernBERT-base's config.json predates `layer_types` / `rope_parameters`."""
    hub = dict(model_type="modernbert", num_hidden_layers=7, global_attn_every_n_layers=3, local_attention=128,
               global_rope_theta=160000.0, local_rope_theta=10000.0, hidden_activation="gelu")
    config = ModernBertConfig.from_hf(hub)
    assert config.layer_types == (FULL, SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL)
    assert (config.global_rope_theta, config.local_rope_theta, config.local_attention) == (160000.0, 1e4, 128)
    assert config.max_length == 8192 and config.position_offset == 0


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_every_parameter_has_logical_axes(tmp_path, family):
    encoder, config = load_encoder(_save_tiny(tmp_path, family, norm_bias=True) if family == "modernbert"
                                   else _save_tiny(tmp_path, family))
    model_def, params = ModelDef.split(EncoderClassifier(encoder, config.hidden_size, 2, rngs=nnx.Rngs(0)))
    assert set(model_def.axes) == set(params)
    for name, axes in model_def.axes.items():
        assert len(axes) == params[name].ndim and set(axes) <= set(LOGICAL_AXES), (name, axes)
    if family == "modernbert":
        assert "encoder/layers/0/attention_norm/scale" not in params  # identity in layer 0, as in HF
        assert {"encoder/layers/1/mlp/gate/kernel", "encoder/final_norm/bias"} <= set(params)


def test_position_ids_follow_transformers():
    ids = np.array([[5, 7, 9, PAD, PAD], [4, PAD, PAD, PAD, PAD], [3, 3, 3, 3, 3]])
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    ref = RobertaEmbeddings.create_position_ids_from_input_ids(torch.from_numpy(ids), PAD).numpy()
    np.testing.assert_array_equal(np.asarray(fairseq_position_ids(jnp.asarray(ids), PAD)), ref)
    assert ref[0].tolist() == [2, 3, 4, 1, 1]  # real tokens from PAD + 1, pads at PAD


def test_max_length_leaves_out_the_offset(tmp_path):
    config = load_bert_config(_save_tiny(tmp_path, "roberta", max_position_embeddings=514))
    assert config.position_offset == PAD + 1 and config.max_length == 512


@pytest.mark.parametrize("model_type,loaders", [("gpt2", (load_encoder_config, load_encoder, load_bert)),
                                                 ("modernbert", (load_bert_config, load_bert))])
def test_unsupported_model_type_is_one_line(tmp_path, model_type, loaders):
    # load_bert refuses ModernBERT (another module); load_encoder, which the task calls, takes it.
    _save_tiny(tmp_path, "roberta")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    for load in loaders:
        with pytest.raises(ValueError) as e:
            load(tmp_path)
        message = str(e.value)
        assert "\n" not in message
        assert f"model_type '{model_type}'" in message and "config.json" in message


@pytest.mark.parametrize("family,key,value", [
    ("roberta", "pad_token_id", None), ("roberta", "position_embedding_type", "relative_key"),
    ("roberta", "is_decoder", True), ("modernbert", "rope_parameters", {FULL: {"rope_type": "linear",
                                                                                "factor": 2.0}}),
    ("modernbert", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("modernbert", "hidden_activation", "silu"), ("modernbert", "layer_types", [FULL, "chunked", FULL]),
])
def test_unsupported_option_is_one_line(tmp_path, family, key, value):
    _save_tiny(tmp_path, family)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=key) as e:
        load_encoder_config(tmp_path)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


# ------------------------------------------------------------------------------- a partial run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _minilm_dir() -> pathlib.Path:
    from sft_jax.models.registry import resolve_model_dir

    try:
        return resolve_model_dir("minilm-l6")
    except ValueError as e:
        pytest.skip(str(e))


def _tiny_with_tokenizer(out: pathlib.Path, family: str) -> pathlib.Path:
    """A random tiny `family` model with MiniLM's WordPiece tokenizer: its vocabulary, and its pad id 0 as the
    config's pad_token_id (so RoBERTa positions start at 1)."""
    minilm = _minilm_dir()
    ids = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "modernbert":  # 16-token rows, a local window of 2 either side on the middle layer
        ids.update(cls_token_id=101, sep_token_id=102, max_position_embeddings=64)
    else:
        ids.update(max_position_embeddings=66)
    _save_tiny(out, family, **ids)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory) -> pathlib.Path:
    return _tiny_with_tokenizer(tmp_path_factory.mktemp("tiny_roberta"), "roberta")


def _run_config(model_dir: pathlib.Path, tmp_path: pathlib.Path):
    from sft_jax.config_defaults import defaults

    records = [{"text": f"{'good fun great' if i % 2 else 'bad dull boring'} movie {i}",
                "label": "positive" if i % 2 else "negative"} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:16]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[16:]))
    c = defaults()
    c.model = str(model_dir)
    c.data.train, c.data.eval = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    c.batch_size = c.eval_batch_size = 8
    c.max_steps, c.eval_every, c.log_every, c.checkpoint_every = 3, 3, 1, 3
    c.max_length, c.buckets = 16, (16,)
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.forgetting.stsb = ""
    c.strategy, c.frozen_layers, c.learning_rate = "partial", 1, 1e-3
    return c


# Every strategy on ModernBERT (its own layout: a gated MLP, alternating attention); RoBERTa's layout is BERT's,
# checked once with the strategy that splits it (partial).
@pytest.mark.parametrize("family, strategy", [("modernbert", "head"), ("modernbert", "partial"),
                                              ("modernbert", "full"), ("roberta", "partial")])
def test_strategies_freeze_what_they_say(tiny_roberta_dir, tmp_path, family, strategy):
    """3 steps of each strategy: head trains the head alone; partial also the blocks after the first; full all.
    Everything else stays bit-identical."""
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.tasks.text import TextClassifier
    from sft_jax.train import train_and_evaluate

    model_dir = tiny_roberta_dir if family == "roberta" else _tiny_with_tokenizer(tmp_path / "model", family)
    config = _run_config(model_dir, tmp_path)
    config.strategy = strategy
    before = TextClassifier(config, num_labels=2)  # the model as the run starts it (same seed, same head)
    assert before.layout == bert_layout(TINY_MODERNBERT["num_hidden_layers"] if family == "modernbert" else 2)
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(results["eval/loss"])
    ckpt = Checkpoints(str(tmp_path / "run"))
    after, _ = ckpt.restore_params(before.params, "latest")
    ckpt.close()
    frozen = {"head": ("encoder/",), "partial": ("encoder/embeddings/", "encoder/layers/0/"), "full": ()}[strategy]
    assert any(n.startswith("encoder/layers/1/") for n in before.params)
    for name, value in before.params.items():
        same = np.asarray(after[name]).tobytes() == np.asarray(value).tobytes()
        assert same == name.startswith(frozen), f"{name}: {'unchanged' if same else 'changed'}"
    assert results["trainable_params"] == sum(v.size for n, v in before.params.items() if not n.startswith(frozen))


def test_tokenizer_pad_must_be_the_position_pad(tiny_roberta_dir, tmp_path):
    from sft_jax.train import train_and_evaluate

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_roberta_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "pad_token_id": 1}))
    with pytest.raises(ValueError, match="pad_token_id 1"):
        train_and_evaluate(_run_config(model_dir, tmp_path), str(tmp_path / "run"))


def test_checkpoint_names_survive_a_model_prefix(tmp_path):
    """An export under "model." loads like the plain one (the prefix rules are shared with BERT)."""
    _save_tiny(tmp_path, "xlm-roberta")
    batch = _padded_batch(1)
    plain, _ = _our_outputs(tmp_path, batch)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({"model." + k: v for k, v in weights.items()}, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(_our_outputs(tmp_path, batch)[0], plain)


def test_modernbert_dropout_is_explicit_and_bfloat16_stays_close(tmp_path):
    from sft_jax.models.modernbert import ModernBertEncoder

    batch = _padded_batch()
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])

    @nnx.jit
    def forward(model, key):
        return model(ids, mask, dropout_rng=key)

    rates = dict(embedding_dropout=0.2, attention_dropout=0.2, mlp_dropout=0.2)
    model = ModernBertEncoder(ModernBertConfig.from_hf({**TINY_MODERNBERT, **rates}), rngs=nnx.Rngs(0))
    plain = forward(model, None)
    np.testing.assert_array_equal(forward(model, jax.random.key(1)), forward(model, jax.random.key(1)))
    assert not np.allclose(forward(model, jax.random.key(1)), plain)

    _save_tiny(tmp_path, "modernbert")
    ref = forward(load_encoder(tmp_path)[0], None)
    low = forward(load_encoder(tmp_path, dtype=jnp.bfloat16)[0], None)
    keep = batch["attention_mask"].astype(bool)
    assert low.dtype == jnp.float32 and np.abs(np.asarray(low)[keep] - np.asarray(ref)[keep]).max() < 0.1
