"""Plan a run before launching it: per-device memory and FLOPs of its train step, compiled for N devices.

    python -m sft_jax.plan --config=configs/xsum_smollm2.py --devices=8 --config.mesh.fsdp=8 [--json]
    python -m sft_jax.plan --config=configs/recipes/llama31_8b.py:lora --devices=1 --device_memory_gb=80

No weight or data file is read: a model directory with only its config.json is enough.
"""

import json
import os
import re
import sys

from absl import flags, logging
from ml_collections import config_flags

from sft_jax import cli

config_flags.DEFINE_config_file("config", None, "Config file: path[:arg].", lock_config=True)
flags.DEFINE_integer("devices", 1, "Number of devices to plan for (simulated CPU devices).")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device, in GB (1e9 bytes).")
flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from sft_jax.plan import plan

    devices = jax.devices()
    if len(devices) < FLAGS.devices:
        cli.fail(f"--devices={FLAGS.devices}: only {len(devices)} devices")
    try:
        result = plan(FLAGS.config, device_memory_gb=FLAGS.device_memory_gb, devices=devices[:FLAGS.devices])
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(json.dumps(result.to_json()) if FLAGS.json else result.table())


def _simulate_devices(argv: list[str]) -> None:
    """N CPU devices for --devices=N: XLA reads the flag once, before JAX starts, so before flag parsing."""
    count = next((int(m.group(1)) for a in argv if (m := re.fullmatch(r"--devices=(\d+)", a))), 1)
    flags_now = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _simulate_devices(sys.argv[1:])
    cli.run_command(main)
