import numpy as np


def test_pbmc_embedding_shape_and_norm(pbmc_embedded):
    emb = pbmc_embedded.obsm["X_text"]
    assert emb.shape == (700, 384)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
