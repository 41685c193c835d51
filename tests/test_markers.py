"""Marker tables (dict / long DataFrame / GMT), marker_overlap (Table 1's bold rule), marker_similarity (Table 33)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import sc_llm as scl

MARKERS = {
    "CD14+ Monocyte": ["CD14", "LYZ", "FCN1", "S100A9"],
    "CD19+ B": ["MS4A1", "CD79A", "CD79B"],
    "CD56+ NK": ["NKG7", "GNLY", "GZMB"],
}


def test_read_markers_dict_dataframe_gmt_agree(tmp_path):
    long = pd.DataFrame(
        [(t, g, True) for t, genes in MARKERS.items() for g in genes] + [("CD19+ B", "MS4A1", True)],
        columns=["cell_type", "genesymbol", "human"],
    )
    gmt = tmp_path / "markers.gmt"
    gmt.write_text("".join(f"{t}\tna\t" + "\t".join(g) + "\n" for t, g in MARKERS.items()))
    network = long.rename(columns={"cell_type": "source", "genesymbol": "target"})
    assert scl.tl.read_markers(MARKERS) == MARKERS
    assert scl.tl.read_markers(long) == MARKERS  # duplicate row dropped, order kept
    assert scl.tl.read_markers(network) == MARKERS
    assert scl.tl.read_markers(str(gmt)) == MARKERS
    with pytest.raises(KeyError, match="No gene column"):
        scl.tl.read_markers(pd.DataFrame({"cell_type": ["a"], "foo": ["x"]}))
    with pytest.raises(TypeError, match="list of genes"):
        scl.tl.read_markers({"B": "MS4A1"})
    bad = tmp_path / "bad.gmt"
    bad.write_text("only_name\n")
    with pytest.raises(ValueError, match="bad.gmt:1"):
        scl.tl.read_markers(bad)


def _with_attributions() -> AnnData:
    adata = AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(3)]))
    def table(method, rows):
        df = pd.DataFrame(rows, columns=["group", "gene"])
        df["rank"] = df.groupby("group").cumcount() + 1
        df["attribution"] = 1.0 / df["rank"]
        df["n_cells"], df["method"] = 1, method
        return df[["group", "rank", "gene", "attribution", "n_cells", "method"]]

    adata.uns["attributions_lime"] = {"genes": table("lime", [
        ("CD14+ Monocyte", "LYZ"), ("CD14+ Monocyte", "FTL"), ("CD14+ Monocyte", "cd14"),
        ("CD19+ B", "CD79A"), ("CD19+ B", "MS4A1"), ("T cell", "CD3E"),
    ])}
    adata.uns["attributions_integrated_gradients"] = {"genes": table("integrated_gradients", [
        ("CD14+ Monocyte", "CD14"), ("CD14+ Monocyte", "S100A9"),
        ("CD19+ B", "MS4A1"), ("CD19+ B", "CD74"), ("T cell", "CD3D"),
    ])}
    return adata


def test_marker_overlap_marks_markers_and_shared():
    adata = _with_attributions()
    with pytest.warns(UserWarning, match="'T cell'"):
        summary = scl.tl.marker_overlap(adata, MARKERS)
    assert summary.loc["CD14+ Monocyte", "lime"] == ["LYZ", "cd14"]
    assert summary.loc["CD14+ Monocyte", "integrated_gradients"] == ["CD14", "S100A9"]
    assert summary.loc["CD14+ Monocyte", "shared"] == ["cd14"]  # case-insensitive
    assert summary.loc["CD19+ B", "shared"] == ["MS4A1"]
    assert summary.loc["CD19+ B", "n_lime"] == 2 and summary.loc["CD19+ B", "n_integrated_gradients"] == 1
    assert summary.loc["T cell", "n_lime"] == 0 and summary.loc["T cell", "marker_type"] is None
    genes = adata.uns["marker_overlap"]["genes"]
    assert not genes.loc[genes["gene"] == "FTL", "is_marker"].item()
    assert genes.loc[(genes["gene"] == "MS4A1"), "shared"].all()
    assert adata.uns["marker_overlap"]["summary"].loc["CD14+ Monocyte", "lime"] == "LYZ, cd14"
    # A mapping renames groups to marker cell types.
    summary = scl.tl.marker_overlap(adata, {**MARKERS, "T": ["CD3E", "CD3D"]}, mapping={"T cell": "T"},
                                    key_added="m2")
    assert summary.loc["T cell", "lime"] == ["CD3E"] and summary.loc["T cell", "shared"] == []
    with pytest.raises(KeyError, match="run sc_llm.tl.attribute"):
        scl.tl.marker_overlap(adata, MARKERS, keys=["attributions_shap"])


def test_marker_similarity_matches_direct_cosines(text_encoder):
    result = scl.tl.marker_similarity(MARKERS, text_encoder)
    vocab = [g for genes in MARKERS.values() for g in genes]
    emb = dict(zip(vocab, text_encoder.encode(vocab, precision="fp32"), strict=True))
    for t, genes in MARKERS.items():
        top = emb[genes[0]]
        intra = np.mean([top @ emb[g] for g in genes[1:]])
        inter = np.mean([top @ emb[g] for u, other in MARKERS.items() if u != t for g in other])
        assert result["per_type"].loc[t, "intra"] == pytest.approx(intra, abs=1e-5)
        assert result["per_type"].loc[t, "inter"] == pytest.approx(inter, abs=1e-5)
        assert result["per_type"].loc[t, "top_marker"] == genes[0]
    assert result["intra"] == pytest.approx(result["per_type"]["intra"].mean())
    with pytest.raises(ValueError, match="at least two cell types"):
        scl.tl.marker_similarity({"B": ["MS4A1", "CD79A"], "NK": ["NKG7"]}, text_encoder)


def test_attributions_plot_renders(tmp_path):
    adata = _with_attributions()
    fig = scl.pl.attributions(adata, key="attributions_lime", markers=MARKERS, save=tmp_path / "attr.png")
    assert (tmp_path / "attr.png").stat().st_size > 0
    bold = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
    assert sorted(bold) == ["CD79A", "LYZ", "MS4A1", "cd14"]
    with pytest.raises(KeyError, match="not in the attribution table"):
        scl.pl.attributions(adata, key="attributions_lime", groups=["Martian"], save=tmp_path / "x.png")
