"""Shared test setup: 8 CPU devices for sharding tests, offline Hugging Face, a tiny random BERT.

The environment is set here, at import time, because JAX reads XLA_FLAGS once when it initialises.
"""

from __future__ import annotations

import os

from sft_jax import platform

platform.configure_cpu()  # the command line's XLA:CPU settings (XNNPACK, malloc), before anything starts JAX

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
# The suite compiles over a thousand small programs and runs each for moments: LLVM's optimisation (level 2 by
# default) costs more than it saves (about a quarter of the suite's time). Level 0 changes only the machine code
# XLA:CPU emits: the HLO passes, buffer assignment and the memory analyses the planner tests read are as in a
# run. Subprocesses that set their own XLA_FLAGS pass FAST_COMPILE_FLAG on; measurements of a real run's memory
# or page faults do not.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
for _flag in (_DEVICES_FLAG, FAST_COMPILE_FLAG):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> pathlib.Path:
    """A random 2-layer, 32-wide BERT saved as a Hugging Face directory, with MiniLM's tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sft_jax.models.registry import resolve_model_dir

    try:
        minilm = resolve_model_dir("minilm-l6")
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, out / name)
    return out


def write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    """Writes one JSON object per line; returns `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sentiment_records(n: int, offset: int = 0) -> list[dict]:
    """`n` easy sentiment examples alternating positive / negative."""
    out = []
    for i in range(offset, offset + n):
        if i % 2:
            out.append({"text": f"bad movie number {i}, dull and boring", "label": "negative"})
        else:
            out.append({"text": f"good movie number {i}, fun and great", "label": "positive"})
    return out


@pytest.fixture(scope="session")
def make_tiny_config(tiny_bert_dir):
    """A factory: `make_tiny_config(data_dir)` -> a fresh tiny_config writing its jsonl data to `data_dir`
    (for module-scoped fixtures, which cannot use the function-scoped `tiny_config`)."""

    def make(tmp_path: pathlib.Path):
        from sft_jax.config_defaults import defaults

        c = defaults()
        c.model = str(tiny_bert_dir)
        c.data.train = str(write_jsonl(tmp_path / "train.jsonl", sentiment_records(64)))
        c.data.eval = str(write_jsonl(tmp_path / "eval.jsonl", sentiment_records(16, offset=64)))
        c.batch_size = 8
        c.eval_batch_size = 8
        c.max_steps = 4
        c.eval_every = 2
        c.log_every = 1
        c.checkpoint_every = 2
        c.max_length = 32
        c.buckets = (16, 32)
        c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
        c.forgetting.stsb = ""
        return c

    return make


@pytest.fixture
def tiny_config(make_tiny_config, tmp_path):
    """A complete config for a few-step run of the tiny BERT on 64 train / 16 eval jsonl examples."""
    return make_tiny_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_trainer(tiny_bert_dir):
    """A factory building what `train_and_evaluate` builds for the tiny BERT (labels, optimizer, sharded
    state, jitted train step) without running it, so tests can step it and look inside the state.

    `build(strategy, frozen_layers=0, mesh=None, learning_rate=1e-2, make_tx=None, logical_rules=None)` returns a
    namespace with
    model_def, labels, layout, trainable, tx, state, state_sharding, train_fn, batch_sharding, mesh, host_params
    (a numpy copy of the initial parameters: the state passed to train_fn is donated) and
    `batch(texts, labels)` (a padded host batch). `make_tx(labels, layout)` replaces the default optimizer.
    With `logical_rules` parameters and activations are laid out by them (as the trainer does); without, the
    parameters are replicated and activations unconstrained.
    """
    import types

    import numpy as np
    import optax
    from flax import nnx

    from sft_jax import optim, sharding, strategies
    from sft_jax.data import batching
    from sft_jax.losses import classification_loss
    from sft_jax.models.classifier import EncoderClassifier, bert_layout
    from sft_jax.models.loading.hf import load_bert, load_tokenizer
    from sft_jax.state import ModelDef
    from sft_jax.train_step import make_train_step
    from sft_jax.trainer.setup import init_state

    tokenizer = load_tokenizer(tiny_bert_dir)

    def make_batch(texts, labels, buckets=(16, 32)):
        ids, _ = batching.tokenize(tokenizer, texts, max(buckets))
        ds = batching.EncodedDataset(ids, np.asarray(labels, np.int32), [""] * len(ids))
        return batching.make_batch(ds, np.arange(len(ids)), len(ids), buckets, tokenizer.pad_token_id)

    def build(strategy="full", frozen_layers=0, mesh=None, learning_rate=1e-2, seed=0, make_tx=None,
              logical_rules=None):
        encoder, bert_config = load_bert(tiny_bert_dir)
        module = EncoderClassifier(encoder, bert_config.hidden_size, 2, rngs=nnx.Rngs(seed))
        model_def, params = ModelDef.split(module)
        layout = bert_layout(bert_config.num_hidden_layers)
        labels = strategies.label_params(model_def.names, strategies.strategy_rules(strategy, layout, frozen_layers))
        trainable = strategies.trainable_names(labels)
        tx = (make_tx(labels, layout) if make_tx else
              strategies.partition(labels, optim.adamw(optax.constant_schedule(learning_rate))))
        mesh_ = sharding.make_mesh(mesh or {"data": 1})
        p_shard = sharding.param_shardings(model_def.names, mesh_, shapes={k: v.shape for k, v in params.items()},
                                           axes=model_def.axes if logical_rules else None,
                                           logical_rules=logical_rules or ())
        host_params = {k: np.array(v) for k, v in params.items()}
        state, state_shard = init_state(params, tx, p_shard, mesh_, seed)
        b_shard = sharding.batch_sharding(mesh_)
        train_fn = make_train_step(model_def, tx, classification_loss, trainable, state_sharding=state_shard,
                                   batch_sharding=b_shard, logical_rules=logical_rules)
        return types.SimpleNamespace(model_def=model_def, labels=labels, layout=layout, trainable=trainable, tx=tx,
                                     state=state, state_sharding=state_shard, train_fn=train_fn,
                                     batch_sharding=b_shard, mesh=mesh_,
                                     host_params=host_params, batch=make_batch)

    return build


# Tiny random decoders of both families, saved by transformers as HF directories with the real
# tokenizers of SmolLM2 / Gemma 3 (so vocabularies and chat templates are the real ones).
TINY_LLAMA = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
TINY_GEMMA3 = dict(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                   max_position_embeddings=256, sliding_window=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_theta=1e6, rope_local_base_freq=1e4, tie_word_embeddings=True, bos_token_id=2,
                   eos_token_id=1, pad_token_id=0)


# The other decoder families on SmolLM2's tokenizer (the vocabulary is all they share with it), each with what
# makes it that family switched on: (transformers config class, model class, config beside TINY_LLAMA's).
TINY_FAMILIES = {
    "llama4": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=4)),  # enough layers to scan in stacks
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4,
                                                      max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=4, tie_word_embeddings=False,
                                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        num_hidden_layers=3, hidden_activation="gelu_pytorch_tanh")),
}


def _tiny_decoder_dir(tmp_path_factory, family: str) -> pathlib.Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sft_jax.models.loading.lm import load_lm_tokenizer

    real = "gemma3-270m" if family == "gemma3" else "smollm2-135m-instruct"
    try:
        tokenizer = load_lm_tokenizer(real)
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp(f"tiny_{family}")
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    elif family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY_GEMMA3))
    else:
        config_cls, model_cls, extra = TINY_FAMILIES[family]
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**dict(TINY_LLAMA, **extra)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family == "llama":
                break
            if "norm" in name:  # Gemma norms init to 0 (= scale 1), the others to 1: randomise so they matter
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    """A factory: `tiny_decoder_dir(family)` -> a random tiny decoder of that family (llama, gemma3 or one of
    TINY_FAMILIES) saved as a HF directory with a real tokenizer; made once per session."""
    made: dict[str, pathlib.Path] = {}

    def make(family: str) -> pathlib.Path:
        if family not in made:
            made[family] = _tiny_decoder_dir(tmp_path_factory, family)
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_decoder_dir) -> pathlib.Path:
    """A random 2-layer LLaMA (GQA 4/2 heads, tied embeddings) with SmolLM2's tokenizer, as a HF directory."""
    return tiny_decoder_dir("llama")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tiny_decoder_dir) -> pathlib.Path:
    """A random 3-layer Gemma 3 (sliding window 4 on layers 0-1, global layer 2) with Gemma's tokenizer."""
    return tiny_decoder_dir("gemma3")


LM_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
           "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n")


def lm_config(model_dir, tmp_path, strategy):
    """A 2-step language_modeling run of `model_dir` on a few lines of text (3/4 train, 1/4 eval)."""
    from sft_jax.config_defaults import defaults

    train = tmp_path / "train.txt"
    train.write_text(LM_TEXT * 4)
    c = defaults()
    c.task = "language_modeling"
    c.model = str(model_dir)
    c.strategy = strategy
    c.frozen_layers = 1
    c.data.train, c.data.eval = str(train) + "[:75%]", str(train) + "[75%:]"
    c.max_length, c.buckets = 16, (16,)
    c.batch_size, c.eval_batch_size = 4, 4
    c.max_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 1
    c.learning_rate = 1e-2
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    return c


def planned_config(tmp_path, strategy):
    """A language-model config for the planner whose model is a directory holding only config.json (a small
    Llama shape: hidden 256, 2 layers, vocabulary 1024); its data files are never read."""
    from sft_jax.config_defaults import defaults

    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)))
    c = defaults()
    c.task, c.model, c.strategy = "language_modeling", str(tmp_path), strategy
    c.data.train = c.data.eval = "never-read.txt"
    c.batch_size, c.max_length, c.buckets, c.mesh = 2, 64, (64,), {"data": 1, "fsdp": 1, "tensor": 1}
    return c


def resumed_after_crash(config, workdir, monkeypatch, step: int) -> dict:
    """The results of `config` run in `workdir`, killed just after its step-`step` checkpoint, then resumed."""
    from sft_jax.train import train_and_evaluate

    with monkeypatch.context() as m:
        crash_after_save(m, step)
        with pytest.raises(CrashAfterSave):
            train_and_evaluate(config, str(workdir))
    return train_and_evaluate(config, str(workdir))


TINY_VIT_SIZES = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32)


@pytest.fixture(scope="session")
def image_config():
    """A factory: `image_config(train, eval)` -> a config for a few steps of a tiny random ViT (8x8 images)."""

    def make(train: str, eval_: str):
        from sft_jax.config_defaults import defaults

        c = defaults()
        c.task = "image_classification"
        c.model = "vit-scratch"
        c.vit.update(TINY_VIT_SIZES)
        c.data.train, c.data.eval = train, eval_
        c.batch_size = c.eval_batch_size = 4
        c.max_steps, c.eval_every, c.log_every, c.checkpoint_every = 4, 2, 1, 2
        c.learning_rate = 1e-2
        c.schedule = "constant"
        c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
        return c

    return make


class CrashAfterSave(Exception):
    """Raised by `crash_after_save` right after the checkpoint of the chosen step is on disk."""


def crash_after_save(monkeypatch, step: int) -> None:
    """Makes train_and_evaluate die (CrashAfterSave) just after saving its latest checkpoint at `step`:
    a killed run, for resume tests. Use inside `monkeypatch.context()` to undo it before resuming."""
    from sft_jax.checkpoint import Checkpoints

    save_latest = Checkpoints.save_latest

    def save_then_crash(self, state, meta):
        save_latest(self, state, meta)
        self.wait()
        if int(state.step) == step:
            raise CrashAfterSave

    monkeypatch.setattr(Checkpoints, "save_latest", save_then_crash)
