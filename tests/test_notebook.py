"""experiments/colab/tour.ipynb runs top to bottom (nbclient, SIZE = "tiny")."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "tour.ipynb")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("notebook")]


def test_tour_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'SIZE = "small"' in params[0].source
    params[0].source = f'SIZE = "tiny"\nWORKDIR = {str(tmp_path)!r}\n'
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    data = [o.get("data", {}) for o in outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in d for d in data) == 5  # mel, gradients, loss, gates, histograms
    assert sum("<audio" in d.get("text/html", "") for d in data) == 2  # two audio widgets
    assert "test WER" in text and "executed encoder compute" in text
    assert "max |streamed (skipping) - offline (masked)|" in text
    diff = float(text.split("max |streamed (skipping) - offline (masked)|:")[1].split()[0])
    assert diff < 1e-4
    assert "packed 2-bit artifact" in text
