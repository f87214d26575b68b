"""The peer's recipe, in PyTorch + transformers alone: all-MiniLM-L6-v2 with a linear head on mean pooling,
fine-tuned on SST-2, with the STS-B probe before and after (the figures issue 28 quotes, measured this way).

    python -m experiments.sst2_strategies.peer_torch --strategy=full --seed=0 --workdir=DIR [--examples=8000]

Recipe: the first `--examples` SST-2 training sentences after a shuffle with the seed, `--epochs` epochs of
batches of 32 (dynamic padding, at most 64 tokens), cross-entropy, AdamW (weight decay 0.01 on every weight
but biases and LayerNorms, as Hugging Face's Trainer does), linear warm-up over the first 10% of the steps
then linear decay to 0, gradient norm clipped to 1.0; the encoder in training mode (its own dropout, 0.1).
head: only the head trains (lr 1e-3); partial: the embeddings and blocks 0-2 frozen (lr 5e-5); full: all
(lr 5e-5). The final model is scored: SST-2 dev accuracy, and the STS-B probe as sft_jax defines it
(Spearman correlation of the cosine similarity of mean-pooled embeddings with the dev scores, at most 128
tokens). Writes WORKDIR/config.json, metrics.jsonl and results.json (sft_jax's key names), so that
`experiments.protocol.keep_run` keeps it like an sft_jax run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np

LEARNING_RATES = {"head": 1e-3, "partial": 5e-5, "full": 5e-5}
FROZEN_BLOCKS = 3  # partial


def read_tsv(path: str, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        index = [header.index(c) for c in columns]
        return [tuple(row[i] for i in index) for row in rows]


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(encoder, tokenizer, texts: list[str], max_length: int, batch: int = 64):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out.append(mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out).numpy()


def stsb_spearman(encoder, tokenizer, path: str) -> float:
    from scipy import stats

    rows = read_tsv(path, ("sentence1", "sentence2", "score"))
    e = embed(encoder, tokenizer, [r[0] for r in rows] + [r[1] for r in rows], max_length=128)
    a, b = e[: len(rows)], e[len(rows):]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(stats.spearmanr(cos, [float(r[2]) for r in rows]).statistic)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=tuple(LEARNING_RATES), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", required=True)
    p.add_argument("--model_dir", default="", help="the all-MiniLM-L6-v2 folder (default: the packaged one)")
    p.add_argument("--train", required=True, help="SST-2 train.tsv (text, label)")
    p.add_argument("--dev", required=True, help="SST-2 dev.tsv")
    p.add_argument("--stsb", required=True, help="STS-B dev.tsv")
    p.add_argument("--examples", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=0.0, help="0: the strategy's (LEARNING_RATES)")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--clip_norm", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores this process may use)")
    args = p.parse_args()

    import torch
    import transformers
    from scipy import stats  # noqa: F401  (fail before training, not after, where scipy is missing)

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)
    if not args.model_dir:
        from sft_jax.models.registry import resolve_checkpoint  # where the packaged weights live, nothing else

        args.model_dir = str(resolve_checkpoint("minilm-l6").path)
    args.learning_rate = args.learning_rate or LEARNING_RATES[args.strategy]
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
        json.dump({**vars(args), "framework": "pytorch", "torch": torch.__version__,
                   "transformers": transformers.__version__, "model": "all-MiniLM-L6-v2",
                   "pooling": "mean", "frozen_layers": FROZEN_BLOCKS if args.strategy == "partial" else 0}, f,
                  indent=1)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    # No pooler: the head reads the mean of the token states (BERT's pooler would sit unused among the weights).
    encoder = transformers.AutoModel.from_pretrained(args.model_dir, attn_implementation="sdpa",
                                                     add_pooling_layer=False)
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    train = read_tsv(args.train, ("text", "label"))
    rng = np.random.default_rng(args.seed)
    train = [train[i] for i in rng.permutation(len(train))[: args.examples]]
    dev = read_tsv(args.dev, ("text", "label"))

    encoder.eval()
    before = stsb_spearman(encoder, tokenizer, args.stsb)
    frozen = []
    if args.strategy == "head":
        frozen = list(encoder.parameters())
    elif args.strategy == "partial":
        frozen = list(encoder.embeddings.parameters())
        frozen += [q for block in encoder.encoder.layer[:FROZEN_BLOCKS] for q in block.parameters()]
    for q in frozen:
        q.requires_grad_(False)
    named = [(n, q) for n, q in [*encoder.named_parameters(), *(("head." + n, q) for n, q in head.named_parameters())]
             if q.requires_grad]
    undecayed = [q for n, q in named if n.endswith("bias") or "LayerNorm" in n]
    decayed = [q for n, q in named if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay},
                                   {"params": undecayed, "weight_decay": 0.0}], lr=args.learning_rate)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
    trainable = sum(q.numel() for _, q in named)

    start, step = time.time(), 0
    with open(os.path.join(args.workdir, "metrics.jsonl"), "w") as log:
        for _ in range(args.epochs):
            encoder.train(args.strategy != "head")  # a frozen encoder is a fixed feature extractor
            epoch = [train[j] for j in rng.permutation(len(train))]  # each epoch its own order
            for i in range(0, len(epoch), args.batch_size):
                rows = epoch[i:i + args.batch_size]
                enc = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=args.max_length,
                                return_tensors="pt")
                labels = torch.tensor([int(r[1]) for r in rows])
                logits = head(mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"]))
                loss = torch.nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([q for _, q in named], args.clip_norm)
                optimizer.step()
                schedule.step()
                step += 1
                if step % 10 == 0 or step == steps:
                    log.write(json.dumps({"step": step, "train/loss": loss.item(), "lr": schedule.get_last_lr()[0],
                                          "elapsed_s": time.time() - start}) + "\n")
                    log.flush()
                    print(f"step {step}/{steps}: loss {loss.item():.4f}", flush=True)
    train_s = time.time() - start

    encoder.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 128):
            rows = dev[i:i + 128]
            enc = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=args.max_length,
                            return_tensors="pt")
            pred = head(mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"])).argmax(-1)
            correct += int((pred == torch.tensor([int(r[1]) for r in rows])).sum())
    after = stsb_spearman(encoder, tokenizer, args.stsb)
    results = {"step": step, "eval/accuracy": correct / len(dev), "forgetting/stsb_spearman/before": before,
               "forgetting/stsb_spearman/after": after, "forgetting/stsb_spearman/drop": before - after,
               "trainable_params": trainable, "train_s": train_s}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
