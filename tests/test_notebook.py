"""The tutorial notebook: it runs top to bottom from any working directory on the hand-written sample it ships
(tiny settings: a random tiny LLaMA, 3 steps), and its committed copy keeps the outputs of its real run."""

from __future__ import annotations

import ast
import json
import math
import pathlib
import re

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "summarization_sft.ipynb"
SAMPLE = REPO_ROOT / "notebooks" / "data" / "summaries_sample.jsonl"


def _outputs(nb, kind: str) -> str:
    """All outputs of the code cells of one kind: "text" (stream) or a MIME type such as "text/html"."""
    got = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            got.append(out.get("text", "") if kind == "text" else str(out.get("data", {}).get(kind, "")))
    return "".join(got)


def _check_outputs(nb) -> str:
    """What every executed copy must show: the loss curve, the coloured loss mask, ROUGE before and after."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    plot = next(c for c in code if c.get("id") == "loss-plot")
    assert [o for o in plot.outputs if "image/png" in o.get("data", {})], "the loss-curve cell shows no image"
    html = _outputs(nb, "text/html")
    assert "#b7f0b1" in html and "color:#888" in html  # target tokens (green) and prompt tokens (grey)
    text = _outputs(nb, "text")
    assert "ROUGE before:" in text and "ROUGE after:" in text and "trainable:" in text
    for when in ("before", "after"):
        scores = ast.literal_eval(re.search(rf"ROUGE {when}: +(\{{.*\}})", text).group(1))
        assert set(scores) == {"rouge1", "rouge2", "rougeL"} and all(0 <= v <= 100 for v in scores.values())
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+|nan|inf)", text)]
    assert losses and all(math.isfinite(x) for x in losses)
    return text


def test_notebook_runs_on_its_sample_from_another_directory(tiny_llama_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits the environment; XLA_FLAGS from conftest would give it 8 CPU devices, which is fine.
    monkeypatch.setenv("SFT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SFT_NOTEBOOK_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("SFT_NOTEBOOK_DATA", "sample")  # what a Colab session without network gets
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = _check_outputs(nb)
    n = sum(1 for _ in SAMPLE.open())
    assert f"data: {SAMPLE.name}" in text and f"{n} records; 16 train, 4 held out" in text
    assert f"sft_jax from {REPO_ROOT / 'sft_jax'}" in text  # the install cell found the installed package
    assert list(tmp_path.iterdir()) == []  # it wrote nothing into the working directory


def test_sample_is_hand_written_pairs():
    """The shipped sample: a few dozen {document, summary} pairs, none of them from the project's XSum file."""
    rows = [json.loads(line) for line in SAMPLE.open()]
    assert 30 <= len(rows) <= 100
    assert all(r["document"].strip() and r["summary"].strip() and len(r["summary"]) < len(r["document"])
               for r in rows)
    shared = REPO_ROOT.parent / "shared" / "data" / "xsum" / "xsum-1000.jsonl"
    if shared.is_file():
        xsum = {json.loads(line)["summary"] for line in shared.open()}
        assert not xsum & {r["summary"] for r in rows}


def test_committed_notebook_keeps_its_real_run():
    """The committed copy was executed at the real settings (not the tiny ones) and keeps its outputs."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = _check_outputs(nb)
    assert "| steps: 80 |" in text, "the committed notebook was not executed at its real settings"
