"""notebooks/train_on_instance.ipynb on a real kernel (nbclient), as a user runs it: it trains net8k
with the trainer and shows the report's curves and confusion matrix. The same notebook through the
SSH tunnel is in test_remote.py."""

from __future__ import annotations

import pytest

from fixtures import REPO

NOTEBOOK = REPO / "notebooks" / "train_on_instance.ipynb"


@pytest.mark.slow
def test_the_notebook_runs_unchanged_and_shows_the_reports_plots(tmp_path, monkeypatch, mnist_dir):
    import nbformat
    from nbclient import NotebookClient

    for key, value in {"NOTEBOOK_EPOCHS": "1", "NOTEBOOK_TRAIN_LIMIT": "1024", "NOTEBOOK_RUNS": str(tmp_path),
                       "MNIST_DATA_DIR": str(mnist_dir)}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "test accuracy of the delivered weights:" in text, text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3  # loss, accuracy, confusion matrix
    (run,) = tmp_path.iterdir()
    assert (run / "model.pt").exists() and (run / "plots" / "confusion.png").stat().st_size > 1000
    import json

    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["model"], config["input_size"], config["lr"]) == ("net8k", 24, 0.2)  # net8k's own recipe
