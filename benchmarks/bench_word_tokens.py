"""Cell token ids: today's TextEncoder.fit (tokenize each sentence) vs WordTokenizer (tokenize each gene once).

Data: pbmc68k (700 cells × 765 genes, ~250 expressed genes per cell) repeated to ``--cells`` cells and
padded to ~1,000 expressed genes per cell: 1,530 extra gene columns named like
``var_names_make_unique`` duplicates of the real genes (``HES4-1``, ``HES4-2``), each expressed in
half of the cells with a random value in (0, 0.5), below every real count, so each cell's real genes
keep their ranks and are followed by ~750 padding genes. Each repeat of the 700 cells draws its own
padding, so no two sentences are equal.

Rows (bundled all-MiniLM-L6-v2 tokenizer, 256 tokens):
- ``fit``: ``TextEncoder.fit(sentences, prefix)``, today's path;
- ``build_sentences``: ``WordTokenizer.build_sentences`` on the same sentences;
- ``build (ranked CSR)``: ``WordTokenizer.build`` on ``rank_csr_rows`` output (ranking not timed);
- ``rank + join + fit`` vs ``rank + build``: from the expression matrix, what an embedding chunk does.

Timed per chunk of 4,096 cells, ``--repeats`` times (mean (sd)); the one-off WordTokenizer set-up
(tokenizing and checking the gene list) is timed separately. All outputs are compared for equality.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import sparse

import sc_llm as scl
from sc_llm.models import load_text_encoder
from sc_llm.models._word_tokens import WordTokenizer
from sc_llm.pp._cell_sentences import join_ranked, rank_csr_rows

CHUNK = 4096


def padded_pbmc(n_cells: int, seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray]:
    """pbmc68k counts repeated to ``n_cells`` rows, with ~750 low padding genes per cell."""
    adata = scl.datasets.pbmc68k()
    real = sparse.csr_matrix(adata.X, dtype=np.float32)
    names = adata.var_names.to_numpy()
    extra = np.array([f"{g}-{k}" for k in (1, 2) for g in names], dtype=object)
    rng = np.random.default_rng(seed)
    reps = -(-n_cells // real.shape[0])
    pad = sparse.random(reps * real.shape[0], len(extra), density=0.5, format="csr", random_state=rng)
    pad.data = (pad.data * 0.5).astype(np.float32)
    X = sparse.hstack([sparse.vstack([real] * reps), pad.astype(np.float32)], format="csr")[:n_cells]
    assert real.data.min() >= 0.5, "padding must rank below every real value"
    return X, np.concatenate([names, extra])


def timed(fn, repeats: int):
    seconds, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return np.array(seconds), out


def chunks(n: int):
    return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=6300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix", default="A cell with genes ranked by expression: ")
    args = parser.parse_args()

    X, names = padded_pbmc(args.cells)
    n = X.shape[0]
    ranked = [rank_csr_rows(X[s:e]) for s, e in chunks(n)]
    sentences = np.concatenate([join_ranked(names, c, p) for c, p in ranked]).tolist()
    n_expressed = np.diff(X.indptr)
    print(
        f"{n} cells, {X.shape[1]} genes, expressed genes per cell: mean {n_expressed.mean():.0f}, "
        f"min {n_expressed.min()}, max {n_expressed.max()}; prefix {args.prefix!r}"
    )

    enc = load_text_encoder()
    t0 = time.perf_counter()
    wt = WordTokenizer(enc.tokenizer, prefix=args.prefix, max_tokens=enc.max_tokens)
    ok = wt.check(names)
    setup = time.perf_counter() - t0
    print(f"WordTokenizer set-up + check on {len(names)} genes: {setup:.2f} s, concatenative: {ok}")

    def fit():
        ids, fits = [], []
        for s, e in chunks(n):
            i, f = enc.fit(sentences[s:e], args.prefix)
            ids += i
            fits.append(f)
        return ids, np.concatenate(fits)

    def gather(parts):
        flat = [p[0] for p in parts]
        ptr = np.concatenate([[0], np.cumsum([int(p[1][-1]) for p in parts])])
        ptrs = np.concatenate([p[1][:-1] + ptr[k] for k, p in enumerate(parts)] + [[ptr[-1]]])
        return np.concatenate(flat), ptrs, np.concatenate([p[2] for p in parts])

    def build_sentences():
        return gather([wt.build_sentences(sentences[s:e]) for s, e in chunks(n)])

    def build_ranked():
        return gather([wt.build(c, p, names) for c, p in ranked])

    def rank_join_fit():
        ids, fits = [], []
        for s, e in chunks(n):
            c, p = rank_csr_rows(X[s:e])
            i, f = enc.fit(join_ranked(names, c, p).tolist(), args.prefix)
            ids += i
            fits.append(f)
        return ids, np.concatenate(fits)

    def rank_build():
        return gather([wt.build(*rank_csr_rows(X[s:e]), names) for s, e in chunks(n)])

    rows = {}
    for name, fn in [
        ("fit", fit),
        ("build_sentences", build_sentences),
        ("build (ranked CSR)", build_ranked),
        ("rank + join + fit", rank_join_fit),
        ("rank + build", rank_build),
    ]:
        rows[name] = timed(fn, args.repeats)

    ref_ids, ref_fit = rows["fit"][1]
    identical = {}
    for name, (_, out) in rows.items():
        if name.endswith("fit"):
            identical[name] = out[1].tolist() == ref_fit.tolist() and out[0] == ref_ids
        else:
            flat, ptr, n_fit = out
            identical[name] = np.array_equal(n_fit, ref_fit) and all(
                flat[ptr[i] : ptr[i + 1]].tolist() == ref_ids[i] for i in range(n)
            )
    cut = int((ref_fit < n_expressed).sum())
    print(
        f"cells cut by the {enc.max_tokens}-token limit: {cut} of {n}; words fitted per cell: mean {ref_fit.mean():.1f}"
    )
    base = n / rows["fit"][0].mean()
    base_e2e = n / rows["rank + join + fit"][0].mean()
    print(f"\n{'path':<22}{'cells/s mean (sd)':>22}{'× fit':>9}{'identical to fit':>18}")
    for name, (sec, _) in rows.items():
        rate = n / sec
        ref = base_e2e if name.startswith("rank") else base
        print(
            f"{name:<22}{rate.mean():>12,.0f} ({rate.std(ddof=1) if len(rate) > 1 else 0:>6,.0f}){rate.mean() / ref:>9.1f}"
            f"{identical[name]!s:>18}"
        )
    print("(the rank rows are relative to 'rank + join + fit')")
    assert all(identical.values()), identical


if __name__ == "__main__":
    main()
