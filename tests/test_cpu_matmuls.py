"""`config.cpu_matmuls`: XLA:CPU's own matmuls or oneDNN's, for the train and eval steps. Both train the same
model to the same losses (up to float32 summation order), the option reaches the compiled program, and it is
left out on other platforms."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_compute_params import _setup

from sft_jax.config_defaults import defaults, validate
from sft_jax.state import TrainState
from sft_jax.train_step import CPU_MATMULS, compiler_options, make_eval_step, make_train_step


def test_options_by_platform_and_name():
    cpu = [types.SimpleNamespace(platform="cpu")] * 2
    gpu = [types.SimpleNamespace(platform="gpu")]
    assert compiler_options("onednn", cpu) == CPU_MATMULS["onednn"]
    assert compiler_options("onednn", cpu)["xla_cpu_use_onednn"] is True
    assert compiler_options("xla", cpu) == {}
    assert compiler_options("auto", cpu) == CPU_MATMULS["onednn"]  # encoders
    assert compiler_options("auto", cpu, decoder=True) == {}
    assert compiler_options("onednn", gpu) == {}  # XLA:CPU options never reach a GPU or TPU compile
    assert compiler_options("measure", cpu, decoder=True) == {}  # unresolved (nothing measured): as auto
    with pytest.raises(ValueError, match=r"^cpu_matmuls: 'mkl' is not one of \('auto', 'measure', 'xla', 'onednn'\)$"):
        compiler_options("mkl", cpu)
    c = defaults()
    assert c.cpu_matmuls == "auto"
    c.cpu_matmuls = "mkl"
    with pytest.raises(ValueError, match=r"^config.cpu_matmuls: 'mkl' is not one of \('auto', 'measure', 'xla', "
                                         r"'onednn'\)$"):
        validate(c)


def _run(family, strategy, dtype, dirs, cpu_matmuls, steps=3):
    model_def, params, loss_fn, batch, trainable, tx = _setup(family, strategy, dtype, dirs)
    opts = compiler_options(cpu_matmuls)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    fn = make_train_step(model_def, tx, loss_fn, trainable, donate=False, compiler_options=opts)
    hlo = fn.lower(state, batch).compile().as_text()
    losses = []
    for _ in range(steps):
        state, m = fn(state, batch)
        losses.append(float(m["loss"]))
    sums = make_eval_step(model_def, loss_fn, compiler_options=opts)(state.params, batch)
    return losses, np.concatenate([np.ravel(sums[k]) for k in sorted(sums)]), state.params, hlo


@pytest.mark.parametrize("family,strategy,dtype", [("bert", "full", jnp.float32), ("llama", "lora", jnp.float32)])
def test_onednn_trains_like_xla(family, strategy, dtype, tiny_bert_dir, tiny_llama_dir):
    dirs = {"bert": tiny_bert_dir, "llama": tiny_llama_dir}
    xla = _run(family, strategy, dtype, dirs, "xla")
    onednn = _run(family, strategy, dtype, dirs, "onednn")
    assert "__onednn_fusion" not in xla[3]
    assert "__onednn_fusion" in onednn[3]  # float32 dots (bfloat16 ones stay XLA's: the step is unchanged)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(onednn[0], xla[0], rtol=tol)
    np.testing.assert_allclose(onednn[1], xla[1], rtol=tol)
    assert xla[0][-1] < xla[0][0]  # it trained
    # Adam divides by sqrt(v): a gradient entry near zero can move by up to the learning rate (1e-2) per step
    # when its summation order changes. Those stay rare; the parameters as a whole agree closely.
    diff = max(float(np.max(np.abs(np.asarray(onednn[2][n], np.float32) - np.asarray(p, np.float32))))
               for n, p in xla[2].items())
    print(family, strategy, "max parameter difference", diff)
    assert diff < (1e-4 if dtype == jnp.float32 else 3e-2)
