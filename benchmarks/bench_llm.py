"""llm_annotate against a local chat server with a fixed per-request latency.

Prints, measured side by side in one run on the same cells:
- wall-clock speed-up of bounded concurrency (max_concurrency=8) over one request at a time;
- how much faster a full rerun is when every answer comes from the disk cache (zero requests);
- the time llm_annotate spends outside waiting for the server (prompt building, cache, parsing,
  bookkeeping), per cell.

The server is the deterministic test server (sc_llm.testing.ChatServer) on 127.0.0.1: nothing leaves
the machine.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import sc_llm as scl
from sc_llm._utils import logger
from sc_llm.testing import ChatServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer cells")
    parser.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    args = parser.parse_args()
    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*already exists and will be overwritten")

    adata = scl.datasets.pbmc68k()
    scl.pp.cell_sentences(adata)
    scl.pp.train_test_split(adata, "cell_type", random_state=0)
    scl.tl.knn_annotate(adata, use_rep="X_pca", labels_key="cell_type")
    n_cells = 40 if args.quick else 140
    first = {
        s: f'{{"cell_type": "{t}"}}'
        for s, t in zip(adata.obs["cell_sentence"], adata.obs["knn_top1"], strict=True)
    }

    with ChatServer(first) as server, tempfile.TemporaryDirectory() as tmp:
        server.slow(args.latency)

        def annotate(max_concurrency, cache_dir):
            client_kwargs = {
                "base_url": server.base_url,
                "max_concurrency": max_concurrency,
                "cache_dir": cache_dir,
            }
            t0 = time.perf_counter()
            scl.tl.llm_annotate(adata, "bench", n_cells=n_cells, client_kwargs=client_kwargs)
            return time.perf_counter() - t0

        timings = {conc: annotate(conc, Path(tmp) / str(conc)) for conc in (1, 8)}
        n_req = adata.uns["llm"]["usage"]["requests"]
        cached = annotate(8, Path(tmp) / "8")
        assert adata.uns["llm"]["usage"]["requests"] == 0

        server.clear_rules()
        no_latency = annotate(1, False)

    done = adata.obs["llm"].notna()
    agree = float(np.mean(adata.obs["llm"][done].astype(str) == adata.obs["knn_top1"][done].astype(str)))
    print(f"{n_cells} cells, {n_req} requests, server latency {args.latency * 1000:.0f} ms")
    print(f"sequential: {timings[1]:.2f} s   max_concurrency=8: {timings[8]:.2f} s   "
          f"speed-up {timings[1] / timings[8]:.1f}x")  # fmt: skip
    print(
        f"rerun from cache (0 requests): {cached:.3f} s   {timings[8] / cached:.0f}x faster than the first run"
    )
    print(
        f"time per cell with a server that answers at once (HTTP round trip included): {no_latency / n_cells * 1000:.2f} ms"
    )
    print(f"answers equal to the served label: {agree:.3f}")


if __name__ == "__main__":
    main()
