"""Peak host memory while loading a ~1B-parameter bfloat16 Llama checkpoint onto an 8-device FSDP mesh:
`load_decoder` (read whole as float32, then placed) against `load_decoder_sharded` (each device's slice
read straight from the file).

    python -m experiments.loading_memory.run [--preset 1b|300m] [--dir DIR]

Writes a random checkpoint (one tensor at a time: header first, then each tensor's bytes) into DIR (a
temporary folder by default, removed afterwards), then runs each case in a fresh process (8 simulated CPU
devices) that reports VmHWM (peak RSS) minus the RSS just before loading. Writes results.json and RESULTS.md
beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PRESETS = {
    # Llama-shaped: 16 layers at width 2048 (GQA 16/8 heads), MLP 8192, vocab 32000, untied head: 1.14B.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128, vocab_size=32000),
    "300m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=64, vocab_size=32000),
}
CASES = {
    "load_decoder + put on mesh (float32)": "current",
    "load_decoder_sharded, param_dtype=bfloat16": "stream_bf16",
    "load_decoder_sharded, param_dtype=float32": "stream_f32",
}
MESH = {"fsdp": 8}
SHARD_BYTES = 500 * 2**20


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of a LlamaForCausalLM with untied embeddings, in the order HF writes them."""
    h, i, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)})
    return shapes


def write_checkpoint(out: pathlib.Path, preset: str) -> int:
    """A random bfloat16 checkpoint in safetensors shards + index + config.json; returns its tensor bytes.
    Streams: each file's header is written first, then one tensor at a time is drawn, cast and appended."""
    import ml_dtypes

    c = PRESETS[preset]
    shapes = tensor_shapes(c)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map, total, start = {}, 0, time.time()
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in names:
                shape = shapes[name]
                if len(shape) == 1:
                    value = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
                else:
                    value = rng.standard_normal(shape, dtype=np.float32)
                    value *= 0.02
                f.write(value.astype(ml_dtypes.bfloat16).tobytes())
                del value
                weight_map[name] = file
        total += offset
        print(f"  wrote {file}: {len(names)} tensors, {offset / 2**30:.2f} GiB "
              f"({time.time() - start:.0f} s)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, torch_dtype="bfloat16", hidden_act="silu", **c)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return total


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(case: str, model_dir: str) -> dict:
    """Runs in a fresh process: load `model_dir` onto the mesh as `case` says; peak RSS over the load."""
    import jax
    import jax.numpy as jnp

    from sft_jax import sharding
    from sft_jax.models.loading.lm import load_decoder
    from sft_jax.models.loading.stream import load_decoder_sharded
    from sft_jax.state import ModelDef

    mesh = sharding.make_mesh(MESH)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), sharding.batch_sharding(mesh)))  # backend up
    before = _status_kib("VmRSS")
    start = time.time()
    if case == "current":
        model, _ = load_decoder(model_dir)
        model_def, params = ModelDef.split(model)
        shardings = sharding.param_shardings(model_def.names, mesh, shapes={k: v.shape for k, v in params.items()},
                                             axes=model_def.axes)
        placed = {k: sharding.put_global(v, shardings[k]) for k, v in params.items()}
        del model, params
    else:
        dtype = jnp.bfloat16 if case == "stream_bf16" else jnp.float32
        model, _ = load_decoder_sharded(model_dir, mesh, param_dtype=dtype)
        placed = ModelDef.split(model)[1]
    jax.block_until_ready(placed)
    seconds = time.time() - start
    param_bytes = sum(v.nbytes for v in placed.values())
    return dict(case=case, rss_before_bytes=before * 1024, peak_bytes=(_status_kib("VmHWM") - before) * 1024,
                resident_after_bytes=(_status_kib("VmRSS") - before) * 1024, param_bytes=param_bytes,
                num_params=sum(v.size for v in placed.values()), seconds=seconds,
                dtypes=sorted({str(v.dtype) for v in placed.values()}))


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_report(results: dict) -> None:
    ckpt = results["checkpoint_bytes"]
    gib = 2**30
    rows = ["| case | params on mesh | peak host RSS over the load | x checkpoint | resident after | time |",
            "|---|---|---|---|---|---|"]
    for label, r in results["cases"].items():
        rows.append(f"| {label} | {r['param_bytes'] / gib:.2f} GiB ({', '.join(r['dtypes'])}) | "
                    f"{r['peak_bytes'] / gib:.2f} GiB | {r['peak_bytes'] / ckpt:.2f}x | "
                    f"{r['resident_after_bytes'] / gib:.2f} GiB | {r['seconds']:.1f} s |")
    bf16 = results["cases"]["load_decoder_sharded, param_dtype=bfloat16"]["peak_bytes"] / ckpt
    text = f"""# Host memory while loading a checkpoint onto a mesh

A random Llama-shaped checkpoint, preset `{results['preset']}`: {results['num_params'] / 1e9:.2f}B parameters,
{ckpt / gib:.2f} GiB of bfloat16 in {results['files']} safetensors files (`{json.dumps(results['config'])}`),
loaded onto an 8-device FSDP mesh ({MESH}, 8 simulated CPU devices, so device memory is host memory too).
Each case runs in a fresh process; "peak" is VmHWM minus the RSS just before loading (the backend already up),
"resident after" is what the process still holds once the parameters are placed.

{chr(10).join(rows)}

- `load_decoder` reads every tensor whole as float32 numpy, builds the module on one device, and only then
  places each parameter on the mesh: several float32 copies of the model are alive at once.
- `load_decoder_sharded` (`sft_jax/models/loading/stream.py`) builds each parameter with
  `jax.make_array_from_callback`; the callback reads only its device's slice from the file (safetensors
  `get_slice` over a memory map opened for that one tensor), cast to the parameter dtype. What is resident is
  the sharded parameters plus one tensor in flight. bfloat16 peak: **{bf16:.2f}x** the checkpoint
  (target: under 1.5x).

Machine: {results['cpu']}, {results['cpus']} CPUs, {results['mem_total_gib']:.0f} GiB RAM.
Generating the checkpoint took {results['generate_seconds']:.0f} s.

Command: `{results['command']}`
"""
    (HERE / "RESULTS.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one case, in this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir)), flush=True)
        return
    tmp = None if args.dir else tempfile.mkdtemp(prefix="loading_memory_")
    model_dir = pathlib.Path(args.dir or tmp) / f"llama_{args.preset}"
    try:
        print(f"writing a random {args.preset} checkpoint to {model_dir}", flush=True)
        start = time.time()
        ckpt = write_checkpoint(model_dir, args.preset)
        generate_seconds = time.time() - start
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
        cases = {}
        for label, case in CASES.items():
            print(f"measuring: {label}", flush=True)
            proc = subprocess.run([sys.executable, "-m", "experiments.loading_memory.run", "--measure", case,
                                   "--dir", str(model_dir)], cwd=ROOT, env=env, check=True, capture_output=True,
                                  text=True)
            cases[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = cases[label]
            print(f"  peak {r['peak_bytes'] / 2**30:.2f} GiB = {r['peak_bytes'] / ckpt:.2f}x checkpoint, "
                  f"{r['seconds']:.1f} s", flush=True)
        results = dict(preset=args.preset, config=PRESETS[args.preset], checkpoint_bytes=ckpt,
                       num_params=ckpt // 2, files=len(list(model_dir.glob("*.safetensors"))), mesh=MESH,
                       cases=cases, generate_seconds=generate_seconds, cpu=cpu_model(), cpus=os.cpu_count(),
                       mem_total_gib=_status_kib_meminfo() / 2**20,
                       command="python -m experiments.loading_memory.run" + (
                           f" --preset {args.preset}" if args.preset != "1b" else ""))
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
        write_report(results)
        print(f"wrote {HERE / 'results.json'} and {HERE / 'RESULTS.md'}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _status_kib_meminfo() -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main()
