"""WikiText-2 raw test perplexity of the decoder LMs: our JAX probe, checked against transformers.

    .venv/bin/python -m experiments.perplexity.run [--models=smollm2-135m-instruct,gemma3-270m]
        [--max_length=1024] [--stride=1023] [--max_tokens=N] [--reference_windows=4] [--batch_size=1]
        [--report_only]

For each model: `sft_jax.evaluate.perplexity.wikitext2_perplexity` on the test text (all of it unless
`--max_tokens`), then transformers' PyTorch model (float32, the same GGUF weights dequantized by
transformers) on the first `--reference_windows` of the same windows, compared window by window.
A full reference pass would cost as much as ours again, which the 2 shared cores of this machine cannot
afford. Results are merged into results.json by model (so models can be run one at a time), and
RESULTS.md is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WIKITEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2_raw")


def reference_window_nll(checkpoint, ids, wins, bos_id: int | None) -> tuple[list[float], float]:
    """(per-window NLL (nats) of the scored tokens by transformers, one unpadded window at a time,
    seconds spent loading the model)."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    start = time.perf_counter()
    path = checkpoint.path
    if checkpoint.kind == "gguf":
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32)
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ref.eval()
    load_s = time.perf_counter() - start
    prefix = [] if bos_id is None else [bos_id]
    out = []
    for w in tqdm(wins, desc="transformers reference", unit="win"):
        inputs = torch.tensor([prefix + ids[w.begin:w.end].tolist()])
        first = w.score_begin - w.begin + len(prefix)  # input position of the first scored token
        with torch.no_grad():
            logits = ref(input_ids=inputs).logits[0, first - 1:-1]
        targets = inputs[0, first:]
        nll = 0.0
        for i in range(0, len(targets), 128):  # float64 log-softmax in row chunks: Gemma's vocab is 262k
            logp = torch.log_softmax(logits[i:i + 128].double(), dim=-1)
            nll -= float(logp.gather(1, targets[i:i + 128, None]).sum())
        out.append(nll)
    return out, load_s


def run_model(name: str, args: argparse.Namespace) -> dict:
    from sft_jax.evaluate.perplexity import Window, read_wikitext, tokenize_text, wikitext2_perplexity
    from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
    from sft_jax.models.registry import resolve_checkpoint
    from sft_jax.state import ModelDef

    print(f"== {name}", flush=True)
    load_avg_start = os.getloadavg()[0]
    t = time.perf_counter()
    checkpoint = resolve_checkpoint(name)
    model, config = load_decoder(checkpoint)
    tokenizer = load_lm_tokenizer(checkpoint)
    model_def, params = ModelDef.split(model)
    load_s = time.perf_counter() - t

    ours = wikitext2_perplexity(model_def, params, tokenizer, args.data, max_length=args.max_length,
                                stride=args.stride, max_tokens=args.max_tokens, batch_size=args.batch_size)
    print(f"ours: token ppl {ours['token_perplexity']:.4f}, word ppl {ours['word_perplexity']:.4f}, "
          f"{ours['wall_s']:.0f} s", flush=True)

    # The reference scores the first K windows of the same pass; ours on them comes from its per-window NLLs.
    text = read_wikitext(args.data)
    k = min(args.reference_windows, ours["num_windows"])
    wins = [Window(*w) for w in ours["windows"][:k]]
    ids, words = tokenize_text(tokenizer, text, max_tokens=wins[-1].end)
    scored = sum(w.num_scored for w in wins)
    t = time.perf_counter()
    ref, ref_load_s = reference_window_nll(checkpoint, ids, wins, tokenizer.bos_token_id if ours["bos"] else None)
    ref_s = time.perf_counter() - t - ref_load_s
    ours_k, ref_k = math.fsum(ours["window_nll"][:k]), math.fsum(ref)
    comparison = {
        "windows": k, "text_tokens": int(wins[-1].end), "scored_tokens": scored, "words": words,
        "ours_token_perplexity": math.exp(ours_k / scored), "ref_token_perplexity": math.exp(ref_k / scored),
        "ours_word_perplexity": math.exp(ours_k / words), "ref_word_perplexity": math.exp(ref_k / words),
        "ours_nll": ours_k, "ref_nll": ref_k,
        "mean_nll_diff_per_token": (ours_k - ref_k) / scored,
        "max_window_nll_rel_diff": max(abs(a / b - 1) for a, b in zip(ours["window_nll"][:k], ref)),
        "ref_load_s": ref_load_s, "ref_wall_s": ref_s, "ref_s_per_window": ref_s / k,
    }
    print(f"reference on {k} windows: ours token ppl {comparison['ours_token_perplexity']:.6f}, transformers "
          f"{comparison['ref_token_perplexity']:.6f} ({ref_s:.0f} s, {ref_load_s:.0f} s loading)", flush=True)
    row = {key: ours[key] for key in ("token_perplexity", "word_perplexity", "nll", "nll_per_token",
                                      "scored_tokens", "num_tokens", "num_words", "num_windows", "max_length",
                                      "stride", "bos", "wall_s")}
    row.update(model=name, family=config.family, vocab_size=config.vocab_size, batch_size=args.batch_size,
               max_tokens=args.max_tokens, full_text_tokens=len(tokenize_text(tokenizer, text)[0]),
               load_s=load_s, tokens_per_s=ours["scored_tokens"] / ours["wall_s"],
               s_per_window=ours["wall_s"] / ours["num_windows"], reference=comparison,
               load_average=[load_avg_start, os.getloadavg()[0]])
    return row


def write_report(rows: list[dict], command: str) -> None:
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [
        "# WikiText-2 raw test perplexity (decoder forgetting probe)",
        "",
        f"Produced by `{command}` on this machine (2 CPU cores shared with other jobs, float32, JAX on CPU).",
        "",
        "Text: WikiText-2 raw test split (`../shared/data/wikitext2_raw/wiki.test.raw`, 241,211 words; its "
        "CRLF line endings read as LF), tokenized once without special tokens. Windows of `max_length` model "
        "positions every `stride` text tokens (Hugging Face's fixed-length perplexity); each window scores "
        "only tokens no earlier window scored. Gemma's tokenizer adds BOS, so each Gemma window is [BOS] + "
        "1,023 text tokens and every text token is scored; SmolLM2's does not, so its windows are 1,024 text "
        "tokens whose first is context only (consecutive windows share that one token) and the text's first "
        "token is not scored. Token-level perplexity = exp(total NLL / scored tokens); word-level = "
        "exp(total NLL / whitespace-separated words of the covered text), comparable across tokenizers.",
        "",
        "Models: the packaged GGUF files (SmolLM2-135M-Instruct Q4_1, gemma-3-270m Q4_K_M), dequantized to "
        "float32 by our loader and by transformers alike: these are the perplexities of the 4-bit files, not of "
        "the bf16 originals.",
        "",
        "| model | text tokens (scored) | words | windows (max_length / stride) | token ppl | word ppl "
        "| NLL/token | wall time (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cover = "" if r["num_tokens"] == r["full_text_tokens"] else f" of {r['full_text_tokens']:,}"
        lines.append(
            f"| {r['model']} | {r['num_tokens']:,}{cover} ({r['scored_tokens']:,}) | {r['num_words']:,} | "
            f"{r['num_windows']} ({r['max_length']} / {r['stride']}) | {r['token_perplexity']:.4f} | "
            f"{r['word_perplexity']:.4f} | {r['nll_per_token']:.5f} | {r['wall_s']:.0f} | {r['tokens_per_s']:.0f} |")
    partial = [r for r in rows if r["num_tokens"] < r["full_text_tokens"]]
    if partial:
        estimates = ", ".join(
            f"{r['model']} {math.ceil(r['full_text_tokens'] / r['stride'])} windows x {r['s_per_window']:.1f} s "
            f"= ~{math.ceil(r['full_text_tokens'] / r['stride']) * r['s_per_window'] / 60:.0f} min" for r in partial)
        lines += [
            "",
            "Rows marked \"of N\" cover only the first tokens of the text (`--max_tokens`), to keep the run short "
            "on 2 shared cores: they are not full-test figures, and the two models' prefixes end at slightly "
            "different words. A full pass (the command without `--max_tokens`) would take, at this run's rate: "
            f"{estimates} (an estimate, not a measurement).",
        ]
    lines += [
        "",
        "## Against transformers on the same windows",
        "",
        "transformers' PyTorch model (float32; the same GGUF file, dequantized by transformers) on the first "
        "windows of the same pass, one unpadded window at a time, float64 log-softmax; ours is the same "
        "windows' NLLs from the run above (padded, batched, jit-compiled, vocabulary in chunks).",
        "",
        "| model | windows (text tokens) | words | token ppl ours | token ppl transformers | word ppl ours "
        "| word ppl transformers | mean NLL diff / token (nats) | max window NLL rel. diff | transformers s/window "
        "| ours s/window |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["reference"]
        lines.append(
            f"| {r['model']} | {c['windows']} ({c['text_tokens']:,}) | {c['words']:,} | "
            f"{c['ours_token_perplexity']:.6f} | {c['ref_token_perplexity']:.6f} | {c['ours_word_perplexity']:.6f} | "
            f"{c['ref_word_perplexity']:.6f} | {c['mean_nll_diff_per_token']:.2e} | "
            f"{c['max_window_nll_rel_diff']:.2e} | {c['ref_s_per_window']:.1f} | {r['s_per_window']:.1f} |")
    lines += [
        "",
        "Our wall times (and s/window) include tokenizing the text and jit compilation, not loading the model; "
        "transformers' s/window excludes loading the GGUF. All were measured while other jobs shared the 2 "
        "cores, so they are upper bounds. Load average (1 min) at the start / end of each model: "
        + ", ".join(f"{r['model']} {r['load_average'][0]:.1f} / {r['load_average'][1]:.1f}" for r in rows) + ".",
        "",
    ]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--data", default=WIKITEXT, help="wiki.test.raw or its folder")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=1023, help="max_length - 1: windows do not overlap")
    parser.add_argument("--max_tokens", type=int, default=None, help="only the first N tokens (default: all)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--reference_windows", type=int, default=4)
    parser.add_argument("--report_only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()

    path = os.path.join(HERE, "results.json")
    previous = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = {r["model"]: r for r in json.load(f)}
    if args.report_only:
        rows = list(previous.values())
        write_report(rows, "; ".join(dict.fromkeys(r["command"] for r in rows)))
        return
    for name in args.models.split(","):
        row = run_model(name, args)
        row["command"] = " ".join([".venv/bin/python -m experiments.perplexity.run", *sys.argv[1:]])
        previous[name] = row
        rows = list(previous.values())
        write_report(rows, "; ".join(dict.fromkeys(r["command"] for r in rows)))
    print(open(os.path.join(HERE, "RESULTS.md")).read())


if __name__ == "__main__":
    main()
