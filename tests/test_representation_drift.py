"""config.drift.cka / drift.kl: representation drift from the pre-trained model. CKA and KL follow their
definitions, recording block outputs changes nothing a model computes (scanned layers record the same), the
pre-trained model reads CKA 1 and KL 0 against itself, and runs log the metrics at evaluations and for their
best checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lm_config

from sft_jax import sharding, tasks
from sft_jax.models import block_outputs
from sft_jax.models.loading.lm import load_decoder
from sft_jax.models.scan import scan_decoder
from sft_jax.representation_drift import RepresentationDrift, kl_next_token, linear_cka
from sft_jax.rundir import RunDir
from sft_jax.train import train_and_evaluate


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as Kornblith et al. define it: HSIC of the linear kernels, centred with H = I - 11^T / n."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


def test_linear_cka_follows_its_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 5)) + 0.5 * rng.standard_normal((3, 7, 5))).astype(np.float32)
    mask = np.ones((3, 7), np.float32)
    mask[0, 4:] = mask[2, 1:] = 0  # padding
    real = mask.reshape(-1) > 0
    assert float(linear_cka(x, x, mask)) == pytest.approx(1.0, abs=1e-6)
    value = float(linear_cka(x, y, mask))
    assert 0.1 < value < 0.99
    assert value == pytest.approx(_hsic_cka(x.reshape(-1, 6)[real], y.reshape(-1, 5)[real]), rel=1e-5)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    assert float(linear_cka(x, 3.0 * (y @ q.astype(np.float32)), mask)) == pytest.approx(value, rel=1e-5)
    garbage = y.copy()
    garbage[mask == 0] = 1e3  # what padding holds does not count
    assert float(linear_cka(x, garbage, mask)) == pytest.approx(value, rel=1e-5)


def test_kl_next_token_is_zero_for_itself_and_matches_a_hand_computation():
    base = np.array([[[0.0, np.log(3.0)], [5.0, -5.0]]], np.float32)  # p = (1/4, 3/4) at the real token
    current = np.array([[[0.0, 0.0], [-5.0, 5.0]]], np.float32)  # q = (1/2, 1/2)
    mask = np.array([[1.0, 0.0]], np.float32)  # the second position is padding
    assert float(kl_next_token(base, base, mask)) == 0.0
    want = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    assert float(kl_next_token(base, current, mask)) == pytest.approx(want, rel=1e-6)


def test_recording_changes_nothing_and_scanned_layers_record_the_same(tiny_llama_dir):
    model, config = load_decoder(str(tiny_llama_dir))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 10)))

    def recorded(ids):  # the recorded outputs leave the traced function as arrays
        with block_outputs.recording() as blocks:
            logits = model(ids)
        return logits, blocks

    with jax.default_matmul_precision("highest"):
        plain, hidden = jax.jit(lambda ids: (model(ids), model.hidden(ids)[0]))(ids)
        logits, blocks = jax.jit(recorded)(ids)
        np.testing.assert_array_equal(logits, plain)
        assert len(blocks) == config.num_layers == 2 and all(b.shape == (2, 10, config.hidden_size) for b in blocks)
        np.testing.assert_allclose(jax.jit(model.final_norm)(blocks[-1]), hidden, atol=1e-6)
        scan_decoder(model)
        assert model.segments[0].shape.groups == 2
        _, scanned = jax.jit(recorded)(ids)
        for got, want in zip(scanned, blocks, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def _probe(config, workdir, count: int, kl: bool) -> tuple[RepresentationDrift, dict]:
    """The probe of a run of `config` as it starts, and the pre-trained parameters on the run's mesh."""
    workdir.mkdir()
    task = tasks.get(config.task)(config, RunDir(str(workdir)))
    mesh = sharding.make_mesh(config.mesh.to_dict())
    p_shard = sharding.run_param_shardings(config, mesh, task.model_def.names,
                                           {k: v.shape for k, v in task.params.items()}, task.model_def.axes)
    params = {k: jax.device_put(v, p_shard[k]) for k, v in task.params.items()}
    pretrained = {k: np.asarray(v) for k, v in task.params.items()}
    probe = RepresentationDrift(task, pretrained, tuple(pretrained), count=count, cka=True, kl=kl, p_shard=p_shard,
                                b_shard=sharding.batch_sharding(mesh))
    return probe, params


def test_the_pretrained_decoder_reads_cka_one_and_kl_zero(tiny_llama_dir, tmp_path):
    probe, params = _probe(lm_config(tiny_llama_dir, tmp_path, "full"), tmp_path / "run", count=3, kl=True)
    same = probe(params)
    assert same["drift/kl_next_token"] == pytest.approx(0.0, abs=1e-6)
    assert [k for k in same if k.startswith("drift/cka/")] == ["drift/cka/block_0", "drift/cka/block_1",
                                                              "drift/cka/mean"]
    assert all(same[k] == pytest.approx(1.0, abs=1e-5) for k in same if k.startswith("drift/cka/"))
    moved = dict(params, **{"embed/embedding": params["embed/embedding"] * 1.5})
    assert probe(moved)["drift/kl_next_token"] > 1e-4


def test_the_vit_compares_its_real_images_only(image_config, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("red", "blue"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    config = image_config(str(tmp_path / "images"), str(tmp_path / "images"))
    probe, params = _probe(config, tmp_path / "run", count=3, kl=False)  # 3 images in 4 rows: one padding row
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in probe(params).values())
    noise = jax.random.normal(jax.random.key(0), params["vit/layers/0/mlp/up/kernel"].shape)
    moved = dict(params, **{"vit/layers/0/mlp/up/kernel": params["vit/layers/0/mlp/up/kernel"] + noise})
    assert probe(moved)["drift/cka/block_0"] < 0.999


def _evaluations(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_an_encoder_run_logs_cka_and_a_large_step_moves_block_0(make_tiny_config, tmp_path):
    config = make_tiny_config(tmp_path)
    config.drift.cka, config.drift.reference_examples = True, 5
    config.max_steps, config.eval_every = 2, 1
    config.learning_rate = 0.3  # large enough to move the first block's representations in two steps
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    logged = [m for m in _evaluations(workdir) if "drift/cka/mean" in m]
    assert [m["step"] for m in logged] == [1, 2]
    assert {"drift/cka/block_0", "drift/cka/block_1"} <= set(logged[0])
    assert results["drift/cka/block_0"] < 0.99
    assert 0 <= results["drift/cka/block_1"] <= 1 + 1e-6
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["drift/cka/mean"] == pytest.approx(np.mean([saved["drift/cka/block_0"], saved["drift/cka/block_1"]]))
    assert (workdir / "drift.png").stat().st_size > 0


def test_a_decoder_run_logs_cka_and_kl(tiny_llama_dir, tmp_path):
    config = lm_config(tiny_llama_dir, tmp_path, "full")
    config.drift.cka = config.drift.kl = True
    workdir = tmp_path / "run"
    results = train_and_evaluate(config, str(workdir))
    assert results["drift/kl_next_token"] > 0
    assert {"drift/cka/block_0", "drift/cka/block_1", "drift/cka/mean"} <= set(results)
    logged = [m for m in _evaluations(workdir) if "drift/kl_next_token" in m]
    assert [m["step"] for m in logged] == [2]


def test_refusals(tiny_config):
    tiny_config.drift.kl = True
    with pytest.raises(ValueError, match="drift.kl: next-token distributions need a decoder"):
        train_and_evaluate(tiny_config, "/nonexistent/never-made")
