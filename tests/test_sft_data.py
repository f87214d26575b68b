"""SFT data: every record format, loss masks token by token, truncation, packing, gradient accumulation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sft_jax.data import lm as lm_data
from sft_jax.data import sft
from sft_jax.data.sources import DataError
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer

FMT = sft.PromptFormat(template="Question: {input}\nAnswer: ")


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_lm_tokenizer(str(tiny_llama_dir))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _targets(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_pair_mask_token_by_token(tok):
    record = sft.parse_record({"input": "What is 2+2?", "output": "It is 4."}, "f:1")[0]
    ids, mask, cut = sft.encode_record(record, tok, FMT, 64)
    prompt = _ids(tok, "Question: ") + _ids(tok, "What is 2+2?") + _ids(tok, "\nAnswer: ")
    output = _ids(tok, "It is 4.") + [tok.eos_token_id]
    assert ids == prompt + output and mask == [0] * len(prompt) + [1] * len(output) and not cut
    # Generation sees exactly the training prompt.
    assert sft.encode_prompt(record, tok, FMT, 64) == prompt


def test_field_mapping_gsm8k_and_xsum(tok):
    gsm = sft.parse_record({"question": "Q?", "answer": "A #### 3"}, "g:1", sft.Fields(input="question",
                                                                                       output="answer"))[0]
    assert (gsm.kind, gsm.input, gsm.output) == (sft.PAIR, "Q?", "A #### 3")
    with pytest.raises(DataError, match=r"x:1: missing field 'summary'"):
        sft.parse_record({"document": "d"}, "x:1", sft.Fields(input="document", output="summary"))


def test_instruction_masks_with_and_without_input(tok):
    fmt = sft.PromptFormat()
    with_input = sft.parse_record({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, "i:1")[0]
    ids, mask, _ = sft.encode_record(with_input, tok, fmt, 64)
    assert tok.decode(ids[: mask.index(1)]) == "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n"
    assert _targets(tok, ids, mask) == "hello" + tok.eos_token
    no_input = sft.parse_record({"instruction": "Say hi.", "output": "hi"}, "i:2")[0]
    ids, mask, _ = sft.encode_record(no_input, tok, fmt, 64)
    assert tok.decode(ids[: mask.index(1)]) == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_self_instruct_expands_instances(tok):
    raw = {"instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"},
                                                     {"input": "up", "output": "down"}]}
    records = sft.parse_record(raw, "s:7")
    assert [(r.where, r.input, r.output) for r in records] == [("s:7#0", "hot", "cold"), ("s:7#1", "up", "down")]


def test_chat_mask_covers_assistant_turns_only(tok):
    # SmolLM2's template has no {% generation %} markers: the turns are found by rendering prefixes.
    assert "{% generation %}" not in tok.chat_template
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    record = sft.parse_record(chat, "c:1")[0]
    ids, mask, _ = sft.encode_record(record, tok, FMT, 256)
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == ["Hello!<|im_end|>", "4<|im_end|>"]
    prompt = sft.encode_prompt(record, tok, FMT, 256)
    assert prompt == ids[: len(prompt)] and tok.decode(ids[len(prompt):]).startswith("4<|im_end|>")


def test_custom_chat_template_without_markers(tok):
    custom = tok.__class__.from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    custom.chat_template = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    record = sft.parse_record({"messages": [{"role": "user", "content": "name a colour"},
                                            {"role": "assistant", "content": "blue"}]}, "c:2")[0]
    ids, mask, _ = sft.encode_record(record, custom, FMT, 64)
    assert _targets(custom, ids, mask).strip() == "blue"
    assert custom.decode(ids[: mask.index(1)]).startswith("USER: name a colour\nASSISTANT:")


def test_chat_needs_a_template(tiny_gemma3_dir):
    gemma_tok = load_lm_tokenizer(str(tiny_gemma3_dir))
    assert not gemma_tok.chat_template  # Gemma 3 base ships none
    record = sft.parse_record({"messages": [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "b"}]}, "c:3")[0]
    with pytest.raises(DataError, match="c:3: the model's tokenizer has no chat template"):
        sft.encode_record(record, gemma_tok, FMT, 64)


def test_truncation_shortens_input_then_cuts_into_output(tok):
    record = sft.parse_record({"input": "word " * 50, "output": "one two three four five six"}, "t:1")[0]
    output = _ids(tok, "one two three four five six") + [tok.eos_token_id]
    prompt_fixed = len(_ids(tok, "Question: ")) + len(_ids(tok, "\nAnswer: "))
    # Room for the template, 3 input tokens and the whole output: the input is cut, the output is intact.
    ids, mask, cut = sft.encode_record(record, tok, FMT, prompt_fixed + 3 + len(output) - 1)
    assert cut and ids[-len(output):] == output and sum(mask) == len(output)
    assert tok.decode(ids).startswith("Question: word word word\nAnswer: ")
    # Less room: the input is gone and the output loses its end (and its EOS); the mask follows the cut.
    ids, mask, cut = sft.encode_record(record, tok, FMT, prompt_fixed + 3 - 1)
    assert cut and ids[prompt_fixed:] == output[:3] and mask == [0] * prompt_fixed + [1] * 3
    with pytest.raises(DataError, match="t:1: no output tokens fit"):
        sft.encode_record(record, tok, FMT, prompt_fixed - 1)


def test_bad_records_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"input": "a", "output": "b"}
    cases = [({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
             ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 must be"),
             ({"input": "a", "output": 3}, "field 'output' must be a string"),
             ({"instruction": "i", "instances": []}, "'instances' must be a non-empty list"),
             ({"input": "a"}, "missing field 'output'")]
    for record, expected in cases:
        bad.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl:2: .*{expected}"):
            sft.read_sft(str(bad))


def test_parallel_text(tmp_path):
    import gzip

    (tmp_path / "a.en").write_text("a dog\na cat\n")
    with gzip.open(tmp_path / "a.fr.gz", "wt") as f:
        f.write("un chien\nun chat\n")
    records = sft.read_sft(f"parallel:{tmp_path / 'a.en'},{tmp_path / 'a.fr.gz'}")
    assert [(r.input, r.output) for r in records] == [("a dog", "un chien"), ("a cat", "un chat")]
    (tmp_path / "b.fr").write_text("un\n")
    with pytest.raises(DataError, match="2 source lines but 1 target lines"):
        sft.read_sft(f"parallel:{tmp_path / 'a.en'},{tmp_path / 'b.fr'}")


def _dataset(tok, n=6):
    records = [sft.Record(sft.PAIR, f"d:{i}", input="number " * (i + 1), output="yes " * (2 * i + 1))
               for i in range(n)]
    return sft.encode_sft(records, tok, FMT, 64)


def test_packing_loss_equals_unpacked(tok, tiny_llama_dir):
    from sft_jax.losses import lm_loss

    ds = _dataset(tok)
    packed = lm_data.pack(ds, 64)
    assert len(packed) < len(ds)  # something was packed
    assert sorted(i for row in packed.rows for i in row) == list(range(len(ds)))
    model, _ = load_decoder(str(tiny_llama_dir))
    with jax.default_matmul_precision("highest"):
        pb = lm_data.make_packed_batch(packed, np.arange(len(packed)), len(packed), (64,), tok.pad_token_id)
        ub = lm_data.make_lm_batch(ds, np.arange(len(ds)), len(ds), (64,), tok.pad_token_id)
        packed_loss, pa = lm_loss(model, jax.tree.map(jnp.asarray, pb), None)
        unpacked_loss, ua = lm_loss(model, jax.tree.map(jnp.asarray, ub), None)
    assert float(pa["count"]) == float(ua["count"]) == ds.num_targets
    assert abs(float(packed_loss) - float(unpacked_loss)) < 1e-5
    # Segment ids restart positions: the second segment of a packed row starts at position 0.
    row = next(r for r in range(len(packed)) if len(packed.rows[r]) > 1)
    seg = pb["segment_ids"][row]
    start = int(np.argmax(seg == 2))
    assert pb["positions"][row, start] == 0 and pb["positions"][row, start - 1] > 0


def test_batch_without_targets_is_an_error(tok):
    ds = lm_data.LmDataset([np.array([1, 2, 3], np.int32)], [np.zeros(3, np.int32)], ["z:4"])
    with pytest.raises(DataError, match="no target tokens.*z:4"):
        lm_data.make_lm_batch(ds, np.array([0]), 2, (8,), 0)


def test_gradient_accumulation_equals_one_large_batch(tok, tiny_llama_dir):
    """Micro-batches with different target counts: the accumulated update weights tokens like the big batch."""
    from sft_jax.losses import lm_loss
    from sft_jax.state import ModelDef, TrainState
    from sft_jax.train_step import make_train_step

    ds = _dataset(tok, 8)
    batch = lm_data.make_lm_batch(ds, np.arange(8), 8, (64,), tok.pad_token_id)
    model, _ = load_decoder(str(tiny_llama_dir))
    model_def, params = ModelDef.split(model)
    tx = optax.sgd(1.0)  # plain SGD: the update is the gradient itself, so any weighting error shows

    def run(accum):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=dict(params), opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
        step = make_train_step(model_def, tx, lm_loss, tuple(params), donate=False, accum_steps=accum)
        with jax.default_matmul_precision("highest"):
            return step(state, jax.tree.map(jnp.asarray, batch))

    (one, m1), (four, m4) = run(1), run(4)
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
    for name in params:
        np.testing.assert_allclose(four.params[name], one.params[name], atol=2e-6, err_msg=name)
    assert not np.allclose(one.params["layers/0/mlp/up/kernel"], params["layers/0/mlp/up/kernel"])


def test_target_index_has_one_width_per_bucket(tok):
    """The target index's width is a shape of the compiled step: it follows the data set, not each batch, so a
    run compiles its train step once per bucket however its targets' counts vary (a stream, which cannot see
    ahead, keeps the T/8 .. T ladder)."""
    from sft_jax.data import batching

    records = [sft.Record(sft.PAIR, f"d:{i}", input="number " * 3, output="yes " * (1 + 9 * (i % 4)))
               for i in range(16)]
    ds = sft.encode_sft(records, tok, FMT, 64)
    counts = [int(m[1:].sum()) for m in ds.loss_mask]
    assert ds.most_targets == max(counts) and min(counts) < 8 < max(counts)
    unpacked = batching.TrainBatches(ds, 2, (64,), 0, tok.pad_token_id, collate=lm_data.make_lm_batch)
    packed = batching.TrainBatches(lm_data.pack(ds, 64), 2, (64,), 0, tok.pad_token_id,
                                   collate=lm_data.make_packed_batch)
    for batches, most in ((unpacked, ds.most_targets), (packed, packed.ds.most_targets)):
        widths = {batches.batch(s)["target_index"].shape[1] for s in range(2 * batches.steps_per_epoch)}
        assert widths == {min(64, -(-most // 8) * 8)}
    per_batch = {lm_data.make_lm_batch(ds, np.array([i, i + 4]), 2, (64,), tok.pad_token_id,
                                       target_width="batch")["target_index"].shape[1] for i in range(4)}
    assert per_batch == {8, 16, 32}  # the ladder follows each batch's rows
    with pytest.raises(ValueError, match="target_width='rows'"):
        lm_data.make_lm_batch(ds, np.array([0]), 1, (64,), tok.pad_token_id, target_width="rows")


def test_loss_at_target_positions_equals_full_loss(tok, tiny_llama_dir):
    """The loss computes logits only at target positions; it must equal scoring every position."""
    from sft_jax.losses import lm_loss

    ds = _dataset(tok)
    batch = lm_data.make_lm_batch(ds, np.arange(len(ds)), len(ds), (64,), tok.pad_token_id)
    k = batch["target_index"].shape[1]
    assert k < 64 and k >= max(int(m.sum()) for m in ds.loss_mask)  # fewer logits than positions
    full = {key: v for key, v in batch.items() if not key.startswith("target_")}
    full["targets"] = batch["targets"]
    model, _ = load_decoder(str(tiny_llama_dir))
    with jax.default_matmul_precision("highest"):
        fast, fast_aux = lm_loss(model, jax.tree.map(jnp.asarray, batch), None)
        slow, slow_aux = lm_loss(model, jax.tree.map(jnp.asarray, full), None)
    assert abs(float(fast) - float(slow)) < 1e-6
    assert float(fast_aux["count"]) == float(slow_aux["count"]) and float(fast_aux["correct"]) == float(
        slow_aux["correct"])
