import anndata as ad
import numpy as np
import pandas as pd

import sc_llm as scl
from sc_llm.cli import main


def test_embed_command_round_trip(tmp_path, pbmc, capsys):
    src, dst = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    pbmc[:8].copy().write_h5ad(src)
    assert main(["embed", str(src), str(dst), "--precision", "fp32", "--store-sentences"]) == 0
    out = ad.read_h5ad(dst)
    assert out.obsm["X_text"].shape == (8, 384)
    assert out.obs["cell_sentence"].str.len().min() > 0
    assert "genes in context" in capsys.readouterr().out


def test_demo_writes_metrics_and_figure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n-cells", "120", "--precision", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "figure:" in printed and "X_text" in printed
    assert (tmp_path / "demo_umap.png").stat().st_size > 10_000
    table = pd.read_csv(tmp_path / "demo_metrics.csv", index_col=0)
    assert set(table.index) == {"X_text", "X_pca"}
    assert table["accuracy"].between(0, 1).all()
    adata = ad.read_h5ad(tmp_path / "demo.h5ad")
    assert adata.n_obs == 120 and "knn_X_text" in adata.obs
    correct = (adata.obs["knn_X_text"].astype(str) == adata.obs["cell_type"].astype(str))[adata.obs["split"] == "test"]
    assert np.isclose(table.loc["X_text", "accuracy"], correct.mean())
    assert isinstance(scl.__version__, str)
