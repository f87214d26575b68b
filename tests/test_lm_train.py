"""Language-model fine-tuning: shifted batches and masks, the loss against transformers, strategies on decoders."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LM_TEXT as TEXT
from conftest import CrashAfterSave, crash_after_save
from conftest import lm_config as _lm_config

from sft_jax.data import lm as lm_data
from sft_jax.data.sources import DataError
from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    return load_lm_tokenizer(str(tiny_llama_dir))


def test_batch_is_shifted_and_masked(llama_tokenizer, tmp_path):
    docs = [lm_data.Document("to be or not to be", "a:1"), lm_data.Document("that is the question", "a:2")]
    ds = lm_data.encode_documents(docs, llama_tokenizer, max_length=32)
    batch = lm_data.make_lm_batch(ds, np.array([0, 1]), 3, (8, 16), llama_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, 8)
    for row in range(2):
        seq = ds.tokens[row]
        assert seq[-1] == llama_tokenizer.eos_token_id  # documents end with EOS, so the model learns to stop
        n = len(seq) - 1
        np.testing.assert_array_equal(batch["input_ids"][row, :n], seq[:-1])
        np.testing.assert_array_equal(batch["targets"][row, :n], seq[1:])
        np.testing.assert_array_equal(batch["loss_mask"][row], [1.0] * n + [0.0] * (8 - n))
        np.testing.assert_array_equal(batch["segment_ids"][row], [1] * n + [0] * (8 - n))
        np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
    assert batch["loss_mask"][2].sum() == 0 and batch["segment_ids"][2].sum() == 0  # a padding row


def test_long_document_is_split_not_truncated(llama_tokenizer):
    ds = lm_data.encode_documents([lm_data.Document(TEXT, "t:1")], llama_tokenizer, max_length=8)
    ids = lm_data.doc_token_ids(llama_tokenizer, TEXT)
    assert len(ds) > 3 and all(len(t) <= 9 for t in ds.tokens)
    # Blocks overlap by one token, so every token after the first is a target exactly once.
    targets = np.concatenate([t[1:] for t in ds.tokens])
    np.testing.assert_array_equal(targets, ids[1:])
    assert ds.num_targets == len(ids) - 1


def test_percent_slices_split_a_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    train = lm_data.read_documents(f"{path}[:90%]")[0].text
    held_out = lm_data.read_documents(f"{path}[90%:]")[0].text
    assert train + held_out == path.read_text()
    assert held_out.startswith("line 90\n")
    with pytest.raises(DataError, match=r"\[A%:B%\]"):
        lm_data.read_documents(f"{path}[90%:10%]")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    assert [d.text for d in lm_data.read_documents(f"{jsonl}[80%:]")] == ["doc 8", "doc 9"]


def test_bad_lm_records_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'text'"):
        lm_data.read_documents(str(bad))
    with pytest.raises(DataError, match=r"must be \.txt, \.jsonl, \.parquet, \.arrow"):
        (tmp_path / "x.csv").write_text("a,b\n")
        lm_data.read_documents(str(tmp_path / "x.csv"))


def test_lm_loss_matches_transformers(tiny_llama_dir, llama_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from sft_jax.losses import lm_loss

    ds = lm_data.encode_documents([lm_data.Document(TEXT, "t:1")], llama_tokenizer, max_length=64)
    batch = lm_data.make_lm_batch(ds, np.array([0]), 1, (64,), llama_tokenizer.pad_token_id)
    model, _ = load_decoder(str(tiny_llama_dir))
    with jax.default_matmul_precision("highest"):
        loss, aux = lm_loss(model, jax.tree.map(jnp.asarray, batch), None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor(ds.tokens[0][None].astype(np.int64))
    with torch.no_grad():
        expected = ref(input_ids=ids, labels=ids).loss.item()  # HF shifts labels inside
    assert abs(float(loss) - expected) < 1e-5
    assert int(aux["count"]) == len(ds.tokens[0]) - 1


# Every strategy on Llama, and each other family with the strategies where it differs: Gemma 3's tied head
# ("head" trains a separate one) and LoRA over its projections; the rest one strategy each, so that every
# family trains and every strategy runs on an untied and on a tied model (strategies select parameters by the
# family's layout, the same code for all).
@pytest.mark.parametrize("family, strategy", [
    ("llama", "full"), ("llama", "partial"), ("llama", "head"), ("llama", "lora"), ("gemma3", "head"),
    ("gemma3", "lora"), ("mistral", "partial"), ("qwen2", "head"), ("qwen3", "full"), ("phi3", "lora"),
    ("gemma2", "full")])
def test_strategies_on_decoders(family, strategy, tiny_decoder_dir, tmp_path):
    """Decoder families train 2 steps with the strategies; what the strategy freezes stays bit-identical."""
    from sft_jax.state import ModelDef
    from sft_jax.tasks.language_model import load_finetuned_lm
    from sft_jax.train import train_and_evaluate

    model_dir = tiny_decoder_dir(family)
    workdir = tmp_path / "run"
    results = train_and_evaluate(_lm_config(model_dir, tmp_path, strategy), str(workdir))
    assert np.isfinite(results["eval/loss"]) and results["eval/perplexity"] > 1
    _, before = ModelDef.split(load_decoder(str(model_dir))[0])
    _, after = ModelDef.split(load_finetuned_lm(str(workdir), "latest")[0])

    def moved(name):
        return not np.array_equal(np.asarray(before[name]), np.asarray(after[name]))

    if strategy == "head":
        # "head" on a decoder = its output side: the LM head (for a tied model a separate one, initialised from
        # the embedding) and the final norm learn; the embedding and every block stay bit-identical.
        assert "lm_head/kernel" in after and moved("final_norm/scale")
        if "lm_head/kernel" in before:
            assert moved("lm_head/kernel")
        else:
            assert not np.array_equal(np.asarray(after["lm_head/kernel"]), np.asarray(before["embed/embedding"]).T)
        assert not any(moved(n) for n in before if n not in ("final_norm/scale", "lm_head/kernel"))
        assert results["trainable_params"] == after["lm_head/kernel"].size + after["final_norm/scale"].size
    elif strategy == "partial":
        frozen = [n for n in before if n.startswith(("embed/", "layers/0/"))]
        assert frozen and not any(moved(n) for n in frozen)
        assert all(moved(n) for n in before if n.startswith("layers/1/"))
    elif strategy == "lora":
        assert not any(moved(n) for n in before)  # the base, biases and norms included
        adapters = [n for n in after if n.endswith("/lora_b")]
        assert len(adapters) == 7 * len([n for n in before if n.endswith("attn/q/kernel")])
        assert all(np.abs(np.asarray(after[n])).max() > 0 for n in adapters)  # lora_b starts at zero
    else:
        assert all(moved(n) for n in before)


def test_early_stopping_metric_must_belong_to_the_task(tiny_llama_dir, tmp_path):
    from sft_jax.train import train_and_evaluate

    c = _lm_config(tiny_llama_dir, tmp_path, "full")
    c.early_stopping.metric = "eval/f1"
    with pytest.raises(ValueError, match="eval/f1"):
        train_and_evaluate(c, str(tmp_path / "run"))


def test_sft_run_end_to_end_with_generation_metrics(tiny_llama_dir, tmp_path):
    """task=sft on instruction + pair + chat records, packed, with accumulation and generation metrics."""
    from sft_jax.train import train_and_evaluate

    records = []
    for i in range(24):
        records.append({"input": f"{i} plus 1?", "output": f"It is {i + 1}. #### {i + 1}"})
        records.append({"instruction": "Repeat the word.", "input": f"w{i}", "output": f"w{i}"})
        records.append({"messages": [{"role": "user", "content": f"say {i}"},
                                     {"role": "assistant", "content": f"{i}"}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    c = _lm_config(tiny_llama_dir, tmp_path, "full")
    c.task = "sft"
    c.data.train, c.data.eval = str(train), str(train)
    c.max_length, c.buckets = 96, (96,)
    c.packing, c.grad_accum_steps = True, 2
    c.prompt.template = "Q: {input}\nA: "
    c.eval_generation.metrics = ("rouge", "exact_match")
    c.eval_generation.num_examples, c.eval_generation.batch_size, c.eval_generation.max_new_tokens = 6, 4, 8
    c.early_stopping.metric, c.early_stopping.mode = "eval/rougeL", "max"
    workdir = tmp_path / "run"
    results = train_and_evaluate(c, str(workdir))
    assert results["train_rows"] < results["train_examples"]  # packing put several examples in a row
    for key in ("eval/loss", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/exact_match"):
        assert key in results and np.isfinite(results[key])
    logged = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert logged and {"step", "where", "prediction", "reference"} <= set(logged[0])
    assert logged[0]["reference"] == "It is 1. #### 1"


def test_time_budget_stops_training(tiny_llama_dir, tmp_path):
    from sft_jax.train import train_and_evaluate

    c = _lm_config(tiny_llama_dir, tmp_path, "full")
    c.max_steps, c.max_train_seconds = 50, 1e-3
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert results["stopped_out_of_time"] and results["step"] == 1 and results["best_step"] == 1



def test_sft_lora_resume_after_crash_is_bit_identical(tiny_llama_dir, tmp_path, monkeypatch):
    """Reliability on the decoder task: packed sft rows, LoRA with dropout (so the RNG matters). A run that
    dies right after its step-2 checkpoint, started again, ends bit-identical to the uninterrupted run."""
    from sft_jax.train import train_and_evaluate

    records = [{"input": f"{i} plus 1?", "output": f"It is {i + 1}."} for i in range(40)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    c = _lm_config(tiny_llama_dir, tmp_path, "lora")
    c.task, c.packing = "sft", True
    c.data.train = c.data.eval = str(data)
    c.max_length, c.buckets = 32, (32,)
    c.lora.dropout = 0.1
    c.max_steps, c.checkpoint_every, c.eval_every = 4, 2, 4
    expected = train_and_evaluate(c, str(tmp_path / "ref"))

    workdir = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_after_save(m, 2)
        with pytest.raises(CrashAfterSave):
            train_and_evaluate(c, str(workdir))
    resumed = train_and_evaluate(c, str(workdir))
    timing = ("train/examples_per_s", "train/tokens_per_s", "train/wall_time_s")
    assert resumed["params_fingerprint"] == expected["params_fingerprint"]
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in expected.items() if k not in timing}


def test_lm_loss_token_accuracy_counts_target_at_the_max():
    """`correct` counts weighted tokens whose target logit is the largest (argmax == target; a target tied
    for the maximum counts too), and the loss is the masked mean cross-entropy."""
    import jax.numpy as jnp
    import optax

    from sft_jax.losses import lm_loss

    logits = jnp.array([[[0.0, 3.0, 1.0], [2.0, 0.0, 2.0], [5.0, 1.0, 0.0], [0.0, 0.0, 9.0]]])
    targets = jnp.array([[1, 2, 1, 2]])  # right, tied for the max, wrong, right but masked out
    weights = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    batch = {"input_ids": jnp.zeros((1, 4), jnp.int32), "segment_ids": jnp.ones((1, 4), jnp.int32),
             "positions": jnp.arange(4)[None], "targets": targets, "loss_mask": weights}
    loss, aux = lm_loss(lambda ids, **_: logits, batch, None)
    assert float(aux["correct"]) == 2.0 and float(aux["count"]) == 3.0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(float(loss), float(jnp.sum(ce * weights) / 3.0), rtol=1e-6)
