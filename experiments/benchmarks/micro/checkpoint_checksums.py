"""What the per-array checksums of a checkpoint save cost, against the save itself (issue 25, damaged checkpoints).

    python -m experiments.benchmarks.micro.checkpoint_checksums [--models=minilm,smollm2] [--rounds=3]

A full fine-tuning `latest/` state of MiniLM-L6 (22.7M parameters) or SmolLM2-135M shapes (float32 parameters
and AdamW moments), random values, saved by `sft_jax.checkpoint.Checkpoints` to a temporary workdir. Per round:
the checksum record alone (`checkpoint_integrity.record`, computed where the arrays are, 8 bytes per array to
the host), the save call (blocking part, record included) and the save until written (`wait`). The first round
also compiles the checksum program and is reported apart. Restores verify the same way (one more read pass).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import checkpoint_integrity as integrity
from sft_jax.checkpoint import Checkpoints
from sft_jax.sharding import to_host
from sft_jax.state import TrainState


def shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model's architecture (names are only labels)."""
    if model == "minilm":  # BERT, 6 layers, 384 wide, 1536 MLP, 30522 vocabulary
        d, f, layers, out = 384, 1536, 6, {"embed/word": (30522, 384), "embed/pos": (512, 384), "embed/type": (2, 384)}
        for i in range(layers):
            for n in ("q", "k", "v", "o"):
                out[f"l{i}/{n}/kernel"], out[f"l{i}/{n}/bias"] = (d, d), (d,)
            out[f"l{i}/up/kernel"], out[f"l{i}/up/bias"] = (d, f), (f,)
            out[f"l{i}/down/kernel"], out[f"l{i}/down/bias"] = (f, d), (d,)
            for n in ("ln1", "ln2"):
                out[f"l{i}/{n}/scale"], out[f"l{i}/{n}/bias"] = (d,), (d,)
        return out
    d, f, kv, layers = 576, 1536, 192, 30  # SmolLM2-135M: Llama, GQA 9/3 heads of 64, tied embedding
    out = {"embed": (49152, d), "norm": (d,)}
    for i in range(layers):
        out |= {f"l{i}/q": (d, d), f"l{i}/k": (d, kv), f"l{i}/v": (d, kv), f"l{i}/o": (d, d), f"l{i}/gate": (d, f),
                f"l{i}/up": (d, f), f"l{i}/down": (f, d), f"l{i}/n1": (d,), f"l{i}/n2": (d,)}
    return out


def state_of(model: str) -> TrainState:
    key = jax.random.key(0)
    params = {}
    for n, s in shapes(model).items():
        key, k = jax.random.split(key)
        params[n] = jax.random.normal(k, s, jnp.float32)
    moments = {"mu": jax.tree.map(lambda x: x * 0.1, params), "nu": jax.tree.map(lambda x: x * x, params),
               "count": jnp.asarray(0, jnp.int32)}
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=moments, rng=jnp.zeros(2, jnp.uint32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for model in args.models.split(","):
        state = state_of(model)
        jax.block_until_ready(state)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
        workdir = tempfile.mkdtemp(prefix="ckpt_sums_")
        ckpt = Checkpoints(workdir, keep=1)
        items = {"params": state.params, "train": integrity.flat_arrays(
            {"step": state.step, "opt_state": state.opt_state, "rng": state.rng})}
        rows = []
        for r in range(args.rounds + 1):
            step_state = state.replace(step=jnp.asarray(r + 1, jnp.int32))
            t0 = time.perf_counter()
            integrity.record(items)
            t_record = time.perf_counter() - t0
            t0 = time.perf_counter()
            ckpt.save_latest(step_state, {})
            t_call = time.perf_counter() - t0
            ckpt.wait()
            t_total = time.perf_counter() - t0
            to_host(step_state.step)
            rows.append((t_record, t_call, t_total))
        ckpt.close()
        shutil.rmtree(workdir)
        first, rest = rows[0], np.median(np.asarray(rows[1:]), axis=0)
        print(f"{model}: {n / 1e6:.1f}M parameters, {mb:.0f} MiB state; first round (compiles): record "
              f"{first[0]:.3f}s; median of {args.rounds}: record {rest[0]:.3f}s, save call {rest[1]:.3f}s, "
              f"save until written {rest[2]:.3f}s: the checksums are {100 * rest[0] / rest[2]:.1f}% of the save "
              f"({100 * rest[0] / (rest[2] - rest[0]):.1f}% added to it)")


if __name__ == "__main__":
    main()
