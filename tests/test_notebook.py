"""The tutorial notebook runs top to bottom (tiny settings: a random tiny LLaMA, a few XSum-like records)."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "summarization_sft.ipynb"


def test_summarization_notebook_runs(tiny_llama_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    records = [{"document": f"The council of town {i} voted on the new bridge. It will open in spring.",
                "summary": f"Town {i} approved a bridge."} for i in range(24)]
    data = tmp_path / "xsum.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # The kernel inherits the environment; XLA_FLAGS from conftest would give it 8 CPU devices, which is fine.
    monkeypatch.setenv("SFT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("SFT_NOTEBOOK_MODEL", str(tiny_llama_dir))
    monkeypatch.setenv("SFT_NOTEBOOK_DATA", str(data))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ROUGE after:" in outputs and "trainable:" in outputs
    # The coloured mask is real HTML output with both target and prompt tokens.
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "#b7f0b1" in html and "color:#888" in html
    assert os.environ["SFT_NOTEBOOK_TINY"] == "1"
