"""Generation: the KV-cached loop against uncached decoding, batching, EOS, stop strings, sampling, CLI."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import generate as gen
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
from sft_jax.state import ModelDef

# Different lengths, so rows are left-padded by different amounts; with N new tokens every row runs past
# the tiny Gemma's sliding window of 4.
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy", "One two three four"]
N = 12


@functools.cache
def _load(model_dir: str) -> types.SimpleNamespace:
    model, config = load_decoder(model_dir)
    tokenizer = load_lm_tokenizer(model_dir)
    model_def, params = ModelDef.split(model)
    raw = model
    if not config.gemma:
        # The random tiny LLaMA, with tied embeddings at init scale, just repeats a token whatever it attends to,
        # which would hide wrong positions or a wrong cache. Sharper attention and larger residual updates make
        # its tokens depend on the context. (Gemma's randomised norms already do; its QK norm undoes such scaling.)
        scale = {"attn/q/kernel": 8, "attn/k/kernel": 8, "attn/v/kernel": 10, "attn/o/kernel": 10, "mlp/": 3}
        params = {k: v * next((f for s, f in scale.items() if s in k), 1) for k, v in params.items()}
        model = model_def.merge(params)
    return types.SimpleNamespace(model=model, raw=raw, config=config, tokenizer=tokenizer, model_def=model_def,
                                 params=params, ids=gen.encode_prompts(tokenizer, PROMPTS))


@pytest.fixture(params=["llama", "gemma3"])
def tiny(request):
    return _load(str(request.getfixturevalue(f"tiny_{request.param}_dir")))


@pytest.fixture
def llama(tiny_llama_dir):
    return _load(str(tiny_llama_dir))


def _uncached_greedy(model, prompts: list[list[int]], n: int) -> np.ndarray:
    """Reference decoding: each step re-runs the full forward (no cache) on prompt + tokens so far and takes
    the argmax of the last real token's logits. Rows are right-padded to one fixed length (padding after a
    token cannot change its logits under a causal mask), so the forward compiles once."""
    length = max(len(p) for p in prompts) + n
    forward = jax.jit(lambda ids, mask: model(ids, mask))
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        ids = np.zeros((len(seqs), length), np.int32)
        mask = np.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        logits = np.asarray(forward(ids, mask))
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return np.array([s[len(p):] for s, p in zip(seqs, prompts)])


def test_cached_greedy_equals_uncached_and_batching_changes_nothing(tiny):
    tokens, lengths = gen.generate_ids(tiny.model_def, tiny.params, tiny.ids, max_new_tokens=N, bucket=16)
    assert tokens.shape == (len(PROMPTS), N) and list(lengths) == [N] * len(PROMPTS)
    np.testing.assert_array_equal(tokens, _uncached_greedy(tiny.model, tiny.ids, N))
    for i, prompt in enumerate(tiny.ids):  # alone: different padding, same tokens
        alone, _ = gen.generate_ids(tiny.model_def, tiny.params, [prompt], max_new_tokens=N, bucket=16)
        np.testing.assert_array_equal(alone[0], tokens[i])


def test_decode_loop_compiles_once_per_shape(llama):
    run = functools.partial(gen.generate_ids, llama.model_def, llama.params, max_new_tokens=5, bucket=16)
    run([[1, 2, 3], [4, 5]])
    size = gen._decode._cache_size()
    run([[7, 8, 9, 10, 11, 12], [13]])  # other prompts, same batch and bucket
    assert gen._decode._cache_size() == size


def test_eos_ends_a_row_with_padding_after(llama):
    free, _ = gen.generate_ids(llama.model_def, llama.params, llama.ids, max_new_tokens=N)
    eos, pad = int(free[0, 3]), 7
    tokens, lengths = gen.generate_ids(llama.model_def, llama.params, llama.ids, max_new_tokens=N,
                                       eos_ids=(eos,), pad_id=pad)
    assert lengths[0] <= 3
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(free[i] == eos)
        end = int(hits[0]) if hits.size else N
        assert lengths[i] == end
        np.testing.assert_array_equal(tokens[i, :end], free[i, :end])
        if end < N:
            assert tokens[i, end] == eos and (tokens[i, end + 1:] == pad).all()
    # Every row's first token is an EOS: all rows end at once and the rest is padding.
    tokens, lengths = gen.generate_ids(llama.model_def, llama.params, llama.ids, max_new_tokens=N,
                                       eos_ids=free[:, 0].tolist(), pad_id=pad)
    assert (lengths == 0).all() and (tokens[:, 1:] == pad).all()


def test_stop_strings_cut_the_text(llama):
    free = gen.generate(llama.model, llama.tokenizer, PROMPTS, max_new_tokens=N)
    assert len(free[0]) >= 6, free
    stop = free[0][len(free[0]) // 2:][:3]
    expected = [t[:t.index(stop)] if stop in t else t for t in free]
    for chunk in (2, 16):  # the stop string found across and within decode chunks
        got = gen.generate(llama.model, llama.tokenizer, PROMPTS, max_new_tokens=N, stop=[stop, "never seen"],
                           chunk=chunk)
        assert got == expected
    assert gen.generate(llama.model, llama.tokenizer, PROMPTS, max_new_tokens=N, stop=["never seen"]) == free


def test_sampling(llama):
    run = functools.partial(gen.generate_ids, llama.model_def, llama.params, llama.ids, max_new_tokens=N)
    greedy, _ = run()
    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, seed=3)[0], greedy)
    np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, seed=3)[0], greedy)
    a, b, c = run(temperature=1.0, seed=1)[0], run(temperature=1.0, seed=1)[0], run(temperature=1.0, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    # Chunked decoding (as with stop strings) draws the same samples: keys depend on the step only.
    np.testing.assert_array_equal(run(temperature=1.0, seed=1, stop_fn=lambda i, new: False, chunk=3)[0], a)


def test_top_k_and_top_p_keep_the_right_candidates():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]] * 2000))
    keys = jax.random.key(0)

    def drawn(sampling, top_p=1.0):
        return set(np.asarray(gen._sample(logits, keys, 1.0, top_p, sampling)).tolist())

    assert drawn((False, 0, False)) == {0, 1, 2, 3}
    assert drawn((False, 2, False)) == {1, 3}
    assert drawn((False, 0, True), top_p=0.5) == {1, 3}  # 0.4 < 0.5, so the next token is needed too
    assert drawn((False, 0, True), top_p=0.4) == {1}
    # Top-p after top-k works on the renormalised top-k mass (as in transformers): 0.4/0.9 + 0.3/0.9 > 0.75.
    assert drawn((False, 3, True), top_p=0.75) == {1, 3}
    assert drawn((False, 3, True), top_p=0.8) == {1, 3, 2}


def test_prompt_encoding(llama, tiny_gemma3_dir):
    tok = llama.tokenizer
    chat = gen.encode_prompts(tok, ["hi"], chat=True)[0]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == tok(text, add_special_tokens=False).input_ids and text.endswith("assistant\n")
    gemma = _load(str(tiny_gemma3_dir)).tokenizer
    ids = gen.encode_prompts(gemma, ["hi"])[0]
    assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1
    with pytest.raises(ValueError, match="no chat template"):
        gen.encode_prompts(gemma, ["hi"], chat=True)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate_ids(llama.model_def, llama.params, [[1]], max_new_tokens=2, top_p=0.0)


def test_load_model_from_a_workdir(llama, tiny_llama_dir, tmp_path):
    from sft_jax.checkpoint import Checkpoints
    from sft_jax.state import TrainState
    from sft_jax.tasks.language_model import load_lm

    (tmp_path / "config.json").write_text(json.dumps({"model": str(tiny_llama_dir), "strategy": "full",
                                                      "task": "language_modeling"}))
    tuned = {k: v * 1.5 if k == "embed/embedding" else v for k, v in llama.params.items()}
    ckpt = Checkpoints(str(tmp_path))
    ckpt.save_best(TrainState(step=jnp.int32(1), params=tuned, opt_state=None, rng=jnp.zeros(2, jnp.uint32)), {})
    ckpt.wait()
    ckpt.close()
    model, tokenizer = load_lm(str(tiny_llama_dir), str(tmp_path), dtype="bfloat16")
    _, params = ModelDef.split(model)
    np.testing.assert_array_equal(params["embed/embedding"], tuned["embed/embedding"])
    assert model.config.dtype == jnp.bfloat16
    assert gen.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)[0]
    with pytest.raises(ValueError, match="differs from the model"):
        load_lm("smollm2-135m-instruct", str(tmp_path))


def test_smollm2_knows_the_capital_of_france():
    try:
        model, _ = load_decoder("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    tokenizer = load_lm_tokenizer("smollm2-135m-instruct")
    out = gen.generate(model, tokenizer, ["The capital of France is"], max_new_tokens=4)
    assert out[0].startswith(" Paris"), out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return subprocess.run([sys.executable, "-m", "sft_jax.generate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli(llama, tiny_llama_dir):
    r = _cli(f"--model={tiny_llama_dir}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", "--max_new_tokens=5",
             "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    expected = gen.generate(llama.raw, llama.tokenizer, PROMPTS[:2], max_new_tokens=5)
    assert rows == [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, expected)]

    r = _cli("--model=/no/such/model", "--prompt=hi", "--max_new_tokens=2")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr


def _sharpened_copy(model_dir, out):
    """The tiny model with larger projections (as `_load` does), saved by transformers: greedy text that
    depends on the context rather than one repeated token, so a wrong position or mask shows."""
    import shutil

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and name.endswith("weight"):
                p.mul_(6.0)
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(model_dir):
        if f.startswith(("tokenizer", "special_tokens")) or f.endswith((".jinja", ".model")):
            shutil.copy(os.path.join(model_dir, f), out)
    return model


# The command line's decoding is the same code for every family: the families whose attention differs most
# (sliding windows, local / global layers and a tied head, QK norms). Every family's cached decoding equals
# its uncached forward (test_decoder_families), which equals transformers' (the per-family parity tests).
@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral", "qwen3"])
def test_cli_greedy_equals_transformers(family, tiny_decoder_dir, tmp_path):
    """`python -m sft_jax.generate --model=DIR --json` (greedy) completes as transformers' own `generate` does,
    prompts past the sliding window included."""
    torch = pytest.importorskip("torch")
    reference = _sharpened_copy(tiny_decoder_dir(family), tmp_path)
    tokenizer = load_lm_tokenizer(str(tmp_path))
    prompts, n = PROMPTS[:2], 10
    r = _cli(f"--model={tmp_path}", *(f"--prompt={p}" for p in prompts), f"--max_new_tokens={n}", "--json")
    assert r.returncode == 0, r.stderr
    ours = [json.loads(line)["completion"] for line in r.stdout.splitlines()]
    eos = set(reference.generation_config.eos_token_id if isinstance(reference.generation_config.eos_token_id, list)
              else [reference.generation_config.eos_token_id]) | {tokenizer.eos_token_id}
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos),
                                     pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        new = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        full = tokenizer.decode(ids + new, skip_special_tokens=True)
        expected.append(full[len(tokenizer.decode(ids, skip_special_tokens=True)):])
    assert ours == expected
    assert len(set(tokenizer(expected[1]).input_ids)) > 2  # not one repeated token
