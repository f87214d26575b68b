"""The optimizer update alone, with each of `../ab/finite_guard.py`'s guards (issue 25's finiteness guard).

    python -m experiments.benchmarks.micro.finite_check [--variants=old,new,sum,isfinite] [--rounds=20]

AdamW with clipping (as `config` defaults) over MiniLM's 22.7M parameters (full fine-tuning shapes, the real
weights), on a fixed small gradient, donated and jitted as the train step's guarded update is; the variants'
updates alternate in rounds. Prints each one's median and minimum wall and CPU milliseconds per update.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sft_jax import platform


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="old,new,sum,isfinite")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    platform.configure_cpu()
    import jax
    import jax.numpy as jnp
    import optax

    from experiments.benchmarks.ab import finite_guard
    from sft_jax import optim, train_step
    from sft_jax.config_defaults import defaults
    from sft_jax.tasks.text import TextClassifier

    c = defaults()
    params = TextClassifier(c, 2).params
    tx = optim.adamw(optax.constant_schedule(c.learning_rate), weight_decay=c.weight_decay, clip_norm=c.clip_norm)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-4, x.dtype), params)

    def make(variant):
        finite_guard.apply(variant)
        guard = train_step._apply_if_finite  # read now: the next variant's apply() swaps it

        def update(state, g):
            def apply(operands):
                p, o = operands
                u, o = tx.update(g, o, p)
                return optax.apply_updates(p, u), o

            return guard(jnp.isfinite(optax.global_norm(g)), apply, state)

        fn = jax.jit(update, donate_argnums=0)
        state = (jax.tree.map(jnp.array, params), tx.init(params))
        state, ok = fn(state, grads)  # compiles with this variant in place
        assert bool(ok)
        return fn, state

    variants = args.variants.split(",")
    fns, states = {}, {}
    for v in variants:
        fns[v], states[v] = make(v)
    wall, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            t, c0 = time.perf_counter(), time.process_time()
            states[v], _ = fns[v](states[v], grads)
            jax.block_until_ready(states[v])
            wall[v].append(1e3 * (time.perf_counter() - t))
            cpu[v].append(1e3 * (time.process_time() - c0))
    for v in variants:
        print(f"{v:9s} wall median {statistics.median(wall[v]):6.1f} ms (min {min(wall[v]):6.1f})  "
              f"CPU median {statistics.median(cpu[v]):6.1f} ms (min {min(cpu[v]):6.1f})")


if __name__ == "__main__":
    main()
