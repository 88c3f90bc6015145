"""Executes every notebook in notebooks/ top to bottom (smoke-sized), as a user would."""

import glob
import os

import pytest
from suite_env import suite_xla_flags

# in the [test] extras; a machine without them (the GPU machine, which runs only the
# gpu-marked tests) must still collect this file
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no .ipynb files"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TAYLORCAL_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TAYLORCAL_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    # The kernel must not inherit the 8 fake devices of conftest.py: a notebook user has one
    # (the suite's compile flags stay).
    monkeypatch.setenv("XLA_FLAGS", suite_xla_flags())
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
    )
    # The pipeline ran through distillation and evaluation, both models generated text, and
    # the exported student generated with transformers.
    assert "student ppl" in outputs and "distill: held-out ppl" in outputs
    assert "--- teacher:" in outputs and "--- student:" in outputs
    assert "--- exported student (transformers):" in outputs
    assert "the same 32 tokens as the JAX student:" in outputs
    # The export loaded with trust_remote_code=True throughout: without it transformers asks
    # (a prompt that would block a Colab user) and, unanswered, falls back to a bare config.
    assert "trust_remote_code" not in outputs and "instantiate a model of type" not in outputs
