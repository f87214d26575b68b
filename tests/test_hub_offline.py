"""Hub ids resolve offline from huggingface_hub's cache, and a missing one is a one-line error naming the cache.

The cache is built by hand in the layout huggingface_hub writes and reads:
    $HF_HOME/hub/models--ORG--NAME/refs/main              the commit hash of `main`
    $HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/F   a relative symlink to ../../blobs/<hash of F>
    $HF_HOME/hub/models--ORG--NAME/blobs/<hash of F>      the file's bytes
huggingface_hub reads HF_HOME and HF_HUB_OFFLINE into `huggingface_hub.constants` when it is imported, so the
first test resolves in a fresh process with the environment set, and the second patches those constants.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

LLAMA_ID, BERT_ID, MISSING_ID = "tiny-org/tiny-llama", "tiny-org/tiny-bert", "tiny-org/not-downloaded"


def _cache_repo(cache: pathlib.Path, repo_id: str, src: pathlib.Path) -> pathlib.Path:
    """Puts the files of `src` into the hub cache as the `main` revision of `repo_id`; returns the snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, like a git commit
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    return snapshot


_DECODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
_ENCODER = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=34)
# Every family sft_jax loads: hub id -> (transformers config class, model class, config).
HUB_MODELS = {
    "tiny-org/tiny-mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=4)),
    "tiny-org/tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "tiny-org/tiny-qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _DECODER),
    "tiny-org/tiny-phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4})),
    "tiny-org/tiny-gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, sliding_window=4)),
    "tiny-org/tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, sliding_window=4)),
    "tiny-org/tiny-roberta": ("RobertaConfig", "RobertaModel", dict(_ENCODER, pad_token_id=1)),
    "tiny-org/tiny-xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(_ENCODER, pad_token_id=1)),
    "tiny-org/tiny-modernbert": ("ModernBertConfig", "ModernBertModel", dict(
        _ENCODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "tiny-org/tiny-vit": ("ViTConfig", "ViTModel", dict(image_size=8, patch_size=4, hidden_size=16,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=32)),
}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> pathlib.Path:
    """An HF_HOME whose hub cache holds a tiny random model of every family, saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama", safe_serialization=True)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32))
    bert.save_pretrained(root / "bert", safe_serialization=True)
    home = root / "hf_home"
    _cache_repo(home / "hub", LLAMA_ID, root / "llama")
    _cache_repo(home / "hub", BERT_ID, root / "bert")
    for repo_id, (config_cls, model_cls, config) in HUB_MODELS.items():
        src = root / repo_id.split("/")[1]
        getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).save_pretrained(src)
        _cache_repo(home / "hub", repo_id, src)
    return home


def _snapshot(home: pathlib.Path, repo_id: str) -> pathlib.Path:
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


_RESOLVE = """
import json, sys
from sft_jax.models.registry import resolve_model_dir
out = {name: str(resolve_model_dir(name)) for name in sys.argv[1:3]}
try:
    resolve_model_dir(sys.argv[3])
except (ValueError, FileNotFoundError) as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_hub_ids_resolve_offline_in_a_fresh_process(hf_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, LLAMA_ID, BERT_ID, MISSING_ID], env=env,
                          capture_output=True, text=True, timeout=60, cwd=pathlib.Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for repo_id in (LLAMA_ID, BERT_ID):
        assert pathlib.Path(out[repo_id]) == _snapshot(hf_home, repo_id)
        assert (pathlib.Path(out[repo_id]) / "config.json").is_file()
    error = out["error"]
    assert "\n" not in error
    assert str(hf_home / "hub" / "models--tiny-org--not-downloaded") in error and MISSING_ID in error


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    """This process's huggingface_hub pointed at `hf_home`, offline (its constants were read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_hub_ids_load_offline(offline_hub):
    """The cached hub ids load as models, through the same names a config would give."""
    import numpy as np
    from safetensors.numpy import load_file

    from sft_jax.models.loading.hf import load_bert
    from sft_jax.models.loading.lm import load_decoder
    from sft_jax.models.registry import resolve_checkpoint, resolve_model_dir

    checkpoint = resolve_checkpoint(LLAMA_ID)
    assert (checkpoint.kind, checkpoint.path) == ("hf", _snapshot(offline_hub, LLAMA_ID))
    _, config = load_decoder(LLAMA_ID)
    assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (2, 16, 1)

    bert_dir = resolve_model_dir(BERT_ID)
    encoder, bert_config = load_bert(bert_dir)
    assert (bert_config.num_hidden_layers, bert_config.hidden_size) == (2, 16)
    saved = load_file(str(bert_dir / "model.safetensors"))
    word = next(v for k, v in saved.items() if k.endswith("word_embeddings.weight"))
    assert any(np.array_equal(np.asarray(leaf), word) for leaf in _leaves(encoder))


@pytest.mark.parametrize("repo_id", list(HUB_MODELS))
def test_every_family_loads_offline_by_hub_id(offline_hub, repo_id):
    """Each family's hub id, found only in the cache, loads as that family with the cached weights."""
    import numpy as np
    from safetensors.numpy import load_file

    from sft_jax.models.loading.hf import load_encoder
    from sft_jax.models.loading.lm import load_decoder
    from sft_jax.models.loading.vit import load_vit
    from sft_jax.models.registry import resolve_model_dir

    model_dir = resolve_model_dir(repo_id)
    assert model_dir == _snapshot(offline_hub, repo_id)
    family = repo_id.removeprefix("tiny-org/tiny-")
    if HUB_MODELS[repo_id][1].endswith("ForCausalLM"):
        model, config = load_decoder(repo_id)
        assert config.family == family and config.num_layers == 2
    elif family == "vit":
        model, config = load_vit(model_dir)
    else:
        model, config = load_encoder(model_dir)
        assert config.model_type == family
    saved = load_file(str(model_dir / "model.safetensors"))
    embedding = next(v for k, v in saved.items() if k.endswith(
        ("embed_tokens.weight", "word_embeddings.weight", "tok_embeddings.weight", "patch_embeddings.projection.bias")))
    leaves = [np.asarray(leaf) for leaf in _leaves(model)]
    assert any(leaf.shape == embedding.shape and np.array_equal(leaf, embedding) for leaf in leaves)


def _leaves(module):
    from flax import nnx

    return [v.value for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)]


def test_missing_hub_id_is_one_line_naming_the_cache(offline_hub):
    from sft_jax.models.registry import resolve_model_dir

    with pytest.raises(ValueError) as info:
        resolve_model_dir(MISSING_ID)
    message = str(info.value)
    assert "\n" not in message
    assert str(offline_hub / "hub" / "models--tiny-org--not-downloaded") in message
    assert "HF_HUB_OFFLINE=1" in message
