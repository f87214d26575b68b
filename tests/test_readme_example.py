"""The README's "use the train step on its own" example runs as written: from an NNX module to three trained
steps and their metrics, with public names only."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Use the train step on its own"


def _example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(SECTION):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_train_step_example_runs_and_learns(tmp_path):
    code = _example()
    imported = [n.strip() for line in re.findall(r"^from sft_jax[\w.]* import (.+)$", code, re.M)
                for n in line.split(",")]
    assert imported and not any(n.startswith("_") for n in imported), imported  # public names only
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [re.match(r"(\d+) loss=([\d.]+) accuracy=([\d.]+)$", line) for line in proc.stdout.strip().splitlines()]
    assert all(rows) and [int(r.group(1)) for r in rows] == [1, 2, 3], proc.stdout
    losses = [float(r.group(2)) for r in rows]
    assert losses[0] > losses[1] > losses[2], losses  # the head learns
