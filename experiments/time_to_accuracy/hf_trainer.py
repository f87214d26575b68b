"""The Hugging Face side of the time-to-accuracy comparison: a plain PyTorch + transformers `Trainer` script.

    python experiments/time_to_accuracy/hf_trainer.py --case=minilm --model_dir=DIR --data_train=FILE
        --data_eval=FILE --metrics=OUT.jsonl [--seed=0 --batch_size=32 ...]   (run.py passes every setting)

minilm: all-MiniLM-L6-v2 (BertModel, no pooler) -> mean over the non-pad tokens -> dropout -> linear head
(normal(0.02) kernel, zero bias), the structure of sft_jax's EncoderClassifier with pooling="mean"; full
fine-tuning, cross-entropy. smollm2: SmolLM2-135M-Instruct with PEFT LoRA adapters on every attention and MLP
projection, the prompt a chat turn ("Summarize this article in one sentence.\n\n" + article, the article's end
cut to fit), the loss on the summary and its end-of-turn token only, as sft_jax's sft task builds it.

Both: AdamW (betas 0.9/0.999, eps 1e-8, biases and norms undecayed), gradient clipping, linear warm-up then linear
decay to zero at max_steps, each batch padded to the smallest bucket length that holds its longest example, a
checkpoint every `checkpoint_every` steps, an evaluation every `eval_every` steps. After each evaluation one
line {"step", METRIC, "wall_s"} (seconds since this process started) goes to --metrics, and training stops at
the first evaluation that reaches --target. Imports no JAX or sft_jax.
"""

from __future__ import annotations

import time

START = time.time()  # before the heavy imports: they are part of a cold start

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

SUMMARY_PROMPT = "Summarize this article in one sentence.\n\n"  # configs/xsum_smollm2.py's prompt.template
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_records(spec: str) -> list[dict]:
    """A .tsv (header row) or .jsonl file, optionally sliced by percent like sft_jax: FILE[:90%], FILE[90%:]."""
    path, lo, hi = spec, 0.0, 1.0
    if spec.endswith("]") and "[" in spec:
        path, _, part = spec[:-1].rpartition("[")
        a, _, b = part.partition(":")
        lo, hi = float(a.rstrip("%") or 0) / 100, float(b.rstrip("%") or 100) / 100
    if path.endswith(".tsv"):
        with open(path, newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return records[round(lo * len(records)):round(hi * len(records))]


def take(records: list[dict], n: int, seed: int | None) -> list[dict]:
    """The first n records (after a seeded shuffle when `seed` is given); n=0: all."""
    if not n:
        return records
    if seed is not None:
        records = random.Random(seed).sample(records, len(records))
    return records[:n]


class MeanPoolClassifier(nn.Module):
    """encoder -> masked mean over tokens -> dropout -> linear head, like sft_jax's EncoderClassifier (mean)."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)  # sft_jax's kernel_init
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = self.head(self.dropout(pooled))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def bucket_collator(buckets: list[int], pad_id: int, fields: tuple[str, ...]):
    """Pads each batch to the smallest bucket that fits its longest example (as sft_jax's batching does)."""

    def collate(examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        length = next((b for b in buckets if b >= longest), buckets[-1])
        batch = {}
        for name, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
            if name in fields:
                batch[name] = torch.tensor([list(e[name][:length]) + [fill] * (length - len(e[name][:length]))
                                            for e in examples])
        if "label" in fields:
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    return collate


def sst2_data(args, tokenizer):
    """Tokenised (datasets.Dataset) train and eval splits; labels in sorted order of their names."""
    import datasets

    train = take(read_records(args.data_train), args.max_train_examples, args.seed)
    dev = take(read_records(args.data_eval), args.max_eval_examples, None)
    names = sorted({str(r["label"]) for r in train + dev})

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        return {**enc, "label": [names.index(str(x)) for x in batch["label"]]}

    def to_dataset(records):
        ds = datasets.Dataset.from_dict({"text": [r["text"] for r in records], "label": [r["label"] for r in records]})
        return ds.map(encode, batched=True, remove_columns=["text"])

    return to_dataset(train), to_dataset(dev), len(names)


def xsum_example(record: dict, tokenizer, max_length: int) -> dict:
    """One chat-formatted training example: the prompt (article cut at its end to fit) and the summary with its
    <|im_end|>; labels are -100 except on the summary tokens."""
    summary = tokenizer(record["summary"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    article = tokenizer(record["document"], add_special_tokens=False)["input_ids"]

    def prompt_ids(n: int) -> list[int]:
        text = SUMMARY_PROMPT + tokenizer.decode(article[:n])
        return tokenizer.apply_chat_template([{"role": "user", "content": text.strip()}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)

    keep = len(article)
    prompt = prompt_ids(keep)
    while len(prompt) + len(summary) > max_length and keep > 0:  # decode / re-encode can merge at the cut
        keep = max(keep - (len(prompt) + len(summary) - max_length), 0)
        prompt = prompt_ids(keep)
    ids = (prompt + summary)[:max_length]
    labels = ([-100] * len(prompt) + summary)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def xsum_data(args, tokenizer):
    import datasets

    train = take(read_records(args.data_train), args.max_train_examples, args.seed)
    dev = take(read_records(args.data_eval), args.max_eval_examples, None)

    def to_dataset(records):
        return datasets.Dataset.from_list([xsum_example(r, tokenizer, args.max_length) for r in records])

    return to_dataset(train), to_dataset(dev)


class TokenLossTrainer(transformers.Trainer):
    """eval_loss as sft_jax's eval/loss: the mean over all target tokens of the eval set (the stock Trainer
    averages per-batch means, which weighs short batches more)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        model, total, count = self.model, 0.0, 0
        model.eval()
        with torch.no_grad():
            for batch in self.get_eval_dataloader(eval_dataset):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
                total, count = total + float(loss), count + int((labels != -100).sum())
        model.train()
        metrics = {f"{metric_key_prefix}_loss": total / max(count, 1)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class TargetStop(transformers.TrainerCallback):
    """Writes each evaluation to the metrics file and stops training once the target is reached."""

    def __init__(self, path: str, key: str, name: str, target: float, mode: str):
        self.path, self.key, self.name, self.target, self.mode = path, key, name, target, mode

    def on_train_begin(self, args, state, control, **kwargs):
        setup = {"optim": str(args.optim.value), "torch_threads": torch.get_num_threads(),
                 "save_steps": args.save_steps, "wall_s": time.time() - START}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": 0, "setup": setup}) + "\n")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = float(metrics[self.key])
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, self.name: value, "wall_s": time.time() - START}) + "\n")
        if (value >= self.target) if self.mode == "max" else (value <= self.target):
            control.should_training_stop = True
        return control


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def training_args(args) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=args.output_dir, seed=args.seed, data_seed=args.seed, use_cpu=True,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, max_grad_norm=args.clip_norm,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        eval_strategy="steps", eval_steps=args.eval_every, save_strategy="steps", save_steps=args.checkpoint_every,
        logging_steps=20, report_to="none", dataloader_num_workers=0, remove_unused_columns=False)


def build_minilm(args, tokenizer):
    """The model, data, batch fields, Trainer class and its extra arguments, and the metric: (Trainer key,
    metrics-file name, direction)."""
    train, dev, num_labels = sst2_data(args, tokenizer)
    encoder = transformers.BertModel.from_pretrained(args.model_dir, add_pooling_layer=False,
                                                     attn_implementation="sdpa")
    model = MeanPoolClassifier(encoder, num_labels, args.head_dropout)
    return (model, train, dev, ("input_ids", "attention_mask", "label"), transformers.Trainer,
            {"compute_metrics": accuracy}, ("eval_accuracy", "eval/accuracy", "max"))


def build_smollm2(args, tokenizer):
    import peft

    train, dev = xsum_data(args, tokenizer)
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                             attn_implementation="sdpa")
    model = peft.get_peft_model(base, peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return (model, train, dev, ("input_ids", "attention_mask", "labels"), TokenLossTrainer, {},
            ("eval_loss", "eval/loss", "min"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=("minilm", "smollm2"), required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_train", required=True)
    parser.add_argument("--data_eval", required=True)
    parser.add_argument("--metrics", required=True, help="jsonl: one line per evaluation")
    parser.add_argument("--output_dir", required=True, help="the Trainer's checkpoints")
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    for name, kind in (("batch_size", int), ("eval_batch_size", int), ("learning_rate", float),
                       ("weight_decay", float), ("clip_norm", float), ("warmup_steps", int), ("max_steps", int),
                       ("eval_every", int), ("checkpoint_every", int), ("max_length", int),
                       ("max_train_examples", int), ("max_eval_examples", int), ("head_dropout", float),
                       ("lora_rank", int), ("lora_alpha", float)):
        parser.add_argument(f"--{name}", type=kind, default=0)
    parser.add_argument("--buckets", default="")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core this process may use, as XLA:CPU takes
    buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else [args.max_length]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    transformers.set_seed(args.seed)
    build = build_minilm if args.case == "minilm" else build_smollm2
    model, train, dev, fields, trainer_cls, extra, (key, name, mode) = build(args, tokenizer)
    trainer = trainer_cls(model=model, args=training_args(args), train_dataset=train, eval_dataset=dev,
                          data_collator=bucket_collator(buckets, tokenizer.pad_token_id or 0, fields),
                          callbacks=[TargetStop(args.metrics, key, name, args.target, mode)], **extra)
    trainer.train()


if __name__ == "__main__":
    main()
