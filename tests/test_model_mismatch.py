"""No silently wrong model: a model without a usable tokenizer, checkpoint tensors the model does not use (a
config.json that disagrees with its weights, another task's head) and an early-stopping mode against its metric
each stop with one line, while each family's documented non-weights (`unused.NON_WEIGHTS`) still load."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sft_jax.config_defaults import defaults, early_stopping_mode, validate
from sft_jax.models.loading.hf import load_bert, load_tokenizer
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
from sft_jax.models.loading.tokenizers import check_fits
from sft_jax.state import ModelDef

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _raises_one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def _copy(src: pathlib.Path, dst: pathlib.Path, keep=("config.json", "model.safetensors"), **config) -> pathlib.Path:
    """`src`'s files named in `keep` copied to `dst`, config.json updated with `config`."""
    dst.mkdir(parents=True)
    for name in keep:
        shutil.copy(src / name, dst / name)
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ModelDef.split(model)[1].items()}


def _stream(model_dir) -> dict[str, np.ndarray]:
    from sft_jax import sharding
    from sft_jax.models.loading.stream import load_decoder_sharded

    return _params(load_decoder_sharded(model_dir, sharding.make_mesh({"data": 1}))[0])


# --- tokenizers -------------------------------------------------------------------------------------------

def test_encoder_without_tokenizer_stops_the_run_and_config_tokenizer_names_one(tiny_bert_dir, tiny_config,
                                                                                 tmp_path):
    from sft_jax.train import train_and_evaluate

    model = _copy(tiny_bert_dir, tmp_path / "no_tokenizer")
    tiny_config.model = str(model)
    message = _raises_one_line(train_and_evaluate, tiny_config, str(tmp_path / "run"))
    assert message.startswith(f"{model}: no usable tokenizer: 5 tokens, 5 of them special")
    assert "every word would be [UNK]" in message and "config.tokenizer" in message
    assert not (tmp_path / "run" / "checkpoints").exists()

    tiny_config.tokenizer = str(tiny_bert_dir)  # a directory of tokenizer files (it has weights too: unread)
    tiny_config.update(max_steps=2, eval_every=2)
    results = train_and_evaluate(tiny_config, str(tmp_path / "named"))
    assert results["step"] == 2


def test_decoder_without_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path / "no_tokenizer")
    message = _raises_one_line(load_lm_tokenizer, str(model))
    assert message.startswith(f"{model}: no usable tokenizer") and "config.tokenizer" in message
    assert len(load_lm_tokenizer(str(model), str(tiny_llama_dir))) == 49152


def test_named_tokenizer_must_exist_and_fit_the_embedding(tiny_bert_dir, tmp_path):
    message = _raises_one_line(load_tokenizer, tiny_bert_dir, str(tmp_path / "nowhere"))
    assert message.startswith(f"config.tokenizer='{tmp_path / 'nowhere'}': no such directory")
    message = _raises_one_line(check_fits, load_tokenizer(tiny_bert_dir), 1000, "minilm")
    assert message.startswith("minilm: the tokenizer has 30522 tokens, more than the model's vocab_size 1000")


# --- checkpoint tensors the model does not use ------------------------------------------------------------

@pytest.mark.parametrize("layers, expected", [
    (1, r"cannot load BERT-family weights; 16 tensors of model.safetensors not used by the model config.json "
        r"describes (encoder.layer.1."),
    (3, "cannot load BERT-family weights; missing keys: encoder.layer.2."),
])
def test_encoder_layers_disagreeing_with_weights(tiny_bert_dir, tmp_path, layers, expected):
    model = _copy(tiny_bert_dir, tmp_path / "m", num_hidden_layers=layers)
    assert _raises_one_line(load_bert, model).startswith(f"{model}: {expected}")


@pytest.mark.parametrize("loader", ["host", "streamed"])
@pytest.mark.parametrize("layers, expected", [
    (1, "weights; 9 tensors of model.safetensors not used by the model config.json describes (model.layers.1."),
    (3, "weights; missing keys: model.layers.2."),
])
def test_decoder_layers_disagreeing_with_weights(tiny_llama_dir, tmp_path, loader, layers, expected):
    model = _copy(tiny_llama_dir, tmp_path / "m", num_hidden_layers=layers)
    load = (lambda d: load_decoder(str(d))) if loader == "host" else _stream
    message = _raises_one_line(load, model)
    assert message.startswith(f"{model}: cannot load ") and expected in message


def test_gguf_with_more_blocks_than_its_metadata_is_refused(monkeypatch):
    from sft_jax.models.loading import lm

    try:
        checkpoint = lm.resolve_checkpoint("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    read = lm.read_gguf

    def fewer_layers(path):
        config, weights = read(path)
        return dict(config, num_hidden_layers=config["num_hidden_layers"] - 1), weights

    monkeypatch.setattr(lm, "read_gguf", fewer_layers)
    message = _raises_one_line(load_decoder, checkpoint)
    assert ("cannot load llama weights; 9 tensors of SmolLM2-135M-Instruct.Q4_1.gguf not used by the model "
            "config.json describes (model.layers.29.") in message


def test_another_tasks_head_needs_ignore_weights(tiny_bert_dir, tiny_config, tmp_path):
    from conftest import TINY_BERT, TOKENIZER_FILES

    from sft_jax.train import train_and_evaluate

    model = tmp_path / "sst2_bert"
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(**TINY_BERT)).save_pretrained(model)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_bert_dir / name, model / name)
    tiny_config.model = str(model)
    message = _raises_one_line(train_and_evaluate, tiny_config, str(tmp_path / "run"))
    assert message.startswith(f"{model}: cannot load BERT-family weights; 2 tensors of model.safetensors not used")
    assert "(classifier.bias, classifier.weight)" in message and message.endswith("config.ignore_weights")

    tiny_config.ignore_weights = (r"^classifier\.",)
    tiny_config.update(max_steps=2, eval_every=2)
    assert train_and_evaluate(tiny_config, str(tmp_path / "ignored"))["step"] == 2


def test_ignore_weights_must_be_regexes(tiny_config):
    tiny_config.ignore_weights = ("[",)
    message = _raises_one_line(validate, tiny_config)
    assert message.startswith("config.ignore_weights: '[' is not a valid regex")


def test_decoder_non_weights_load_and_a_differing_tied_copy_does_not(tiny_llama_dir, tmp_path):
    """A RoPE buffer and a tied model's stored copy of its embedding are not weights; an `lm_head.weight` unlike
    the embedding it is said to be tied to is a mismatch (host and streamed loaders alike)."""
    want = _params(load_decoder(str(tiny_llama_dir))[0])
    weights = load_file(tiny_llama_dir / "model.safetensors")
    assert "lm_head.weight" not in weights  # the tiny Llama is tied
    model = _copy(tiny_llama_dir, tmp_path / "extras", keep=("config.json",))
    extra = {"model.rotary_emb.inv_freq": np.ones(4, np.float32),
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
             "lm_head.weight": weights["model.embed_tokens.weight"]}
    save_file({**weights, **extra}, model / "model.safetensors")
    for got in (_params(load_decoder(str(model))[0]), _stream(model)):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    extra["lm_head.weight"] = extra["lm_head.weight"] + 1.0
    save_file({**weights, **extra}, model / "model.safetensors")
    for load in (lambda d: load_decoder(str(d)), _stream):
        message = _raises_one_line(load, model)
        assert message.endswith("lm_head.weight differs from model.embed_tokens.weight though config.json ties "
                                "them (tie_word_embeddings): the config and the weights disagree")


def test_multimodal_gemma3_loads_its_language_model_only(tmp_path):
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "mm")
    stored = load_file(tmp_path / "mm" / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in stored)
    host = _params(load_decoder(str(tmp_path / "mm"))[0])
    assert np.array_equal(host["embed/embedding"], stored["language_model.model.embed_tokens.weight"])
    assert np.array_equal(host["layers/1/mlp/up/kernel"], stored["language_model.model.layers.1.mlp.up_proj.weight"].T)
    streamed = _stream(tmp_path / "mm")
    assert all(np.array_equal(streamed[k], host[k]) for k in host)

    save_file({**stored, "audio_tower.proj.weight": np.zeros((2, 2), np.float32)},
              tmp_path / "mm" / "model.safetensors")
    assert "1 tensor of model.safetensors not used by the model config.json describes (audio_tower.proj.weight)" \
        in _raises_one_line(load_decoder, str(tmp_path / "mm"))


def test_vit_layers_disagreeing_with_weights(tmp_path):
    from sft_jax.models.loading.vit import load_vit

    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                 patch_size=4)
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**sizes)).save_pretrained(tmp_path / "vit")
    load_vit(tmp_path / "vit")  # its pooler is not a weight of ours
    model = _copy(tmp_path / "vit", tmp_path / "one_layer", num_hidden_layers=1)
    message = _raises_one_line(load_vit, model)
    assert message.startswith(f"{model}: cannot load ViT weights; 16 tensors of model.safetensors not used")
    assert load_vit(model, ignore=(r"^encoder\.layer\.1\.",))[1].num_hidden_layers == 1


def test_peft_tensors_that_are_no_adapters_are_refused(tiny_llama_dir, tmp_path):
    """PEFT's `modules_to_save` (a whole trained layer beside the adapters) would be dropped unread: refused."""
    from flax import nnx

    from sft_jax.models.loading.peft import ADAPTER_WEIGHTS, load_adapters, save_adapters
    from sft_jax.models.lora import LoraConfig, apply_lora

    cfg = LoraConfig(rank=2, alpha=4.0, targets=r"layers/0/attn/q$")
    model, _ = load_decoder(str(tiny_llama_dir))
    apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, rngs=nnx.Rngs(0))
    out = save_adapters(ModelDef.split(model)[1], cfg, tmp_path / "adapters")
    tensors = load_file(out / ADAPTER_WEIGHTS)
    save_file({**tensors, "base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}, out / ADAPTER_WEIGHTS)
    message = _raises_one_line(load_adapters, load_decoder(str(tiny_llama_dir))[0], out)
    assert message == (f"{out}: cannot load the adapters; 1 tensor of adapter_model.safetensors not LoRA "
                       "adapters (base_model.model.lm_head.weight): they would be dropped")


# --- early stopping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric, mode, want", [
    ("eval/loss", "auto", "min"), ("eval/perplexity", "auto", "min"), ("eval/accuracy", "auto", "max"),
    ("eval/rougeL", "auto", "max"), ("eval/loss", "min", "min"), ("eval/my_score", "min", "min"),
    ("eval/my_score", "auto", "max"),
])
def test_early_stopping_mode_follows_the_metric(metric, mode, want):
    c = defaults().early_stopping
    c.metric, c.mode = metric, mode
    assert early_stopping_mode(c) == want


@pytest.mark.parametrize("metric, mode, better", [("eval/loss", "max", "lower"), ("eval/perplexity", "max", "lower"),
                                                   ("eval/accuracy", "min", "higher")])
def test_early_stopping_mode_against_the_metric_is_refused(tiny_config, metric, mode, better):
    tiny_config.early_stopping.metric, tiny_config.early_stopping.mode = metric, mode
    if metric == "eval/perplexity":
        tiny_config.task = "language_modeling"
    message = _raises_one_line(validate, tiny_config)
    assert message.startswith(f"config.early_stopping.mode: {mode!r} contradicts metric {metric!r}, where {better} "
                              "is better")


def test_best_checkpoint_minimises_a_loss_metric(tiny_config, tmp_path, monkeypatch):
    """eval/loss scripted 0.9, 0.5, 0.7 with patience 1 and the default mode: the best step is the lowest loss's."""
    from sft_jax.tasks import classification
    from sft_jax.train import train_and_evaluate

    scripted = iter([0.9, 0.5, 0.7])
    real_evaluate = classification.evaluate
    calls = []

    def evaluate(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        calls.append(out)
        if len(calls) <= 3:
            out["eval/loss"] = next(scripted)
        return out

    monkeypatch.setattr(classification, "evaluate", evaluate)
    tiny_config.update(max_steps=10, eval_every=1, checkpoint_every=10)
    tiny_config.early_stopping.metric, tiny_config.early_stopping.patience = "eval/loss", 1
    assert tiny_config.early_stopping.mode == "auto"
    results = train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert (results["step"], results["best_step"], results["stopped_early"]) == (3, 2, True)
