#!/usr/bin/env bash
# One entry point for people and CI: sets up .venv from the project's own files, then runs a job.
#   ./dev.sh demo   - set up, then run the end-to-end demo on the bundled data and model
#   ./dev.sh test   - set up, then run the test suite (what CI runs)
#   ./dev.sh docs   - set up, then build the documentation with warnings as errors
#   ./dev.sh bench  - set up, then run the benchmarks in benchmarks/
#   ./dev.sh test-latest [quick] - as users install: a separate .venv-latest with the newest versions
#                   pip resolves for .[all,test] (no constraints file), import every optional back end,
#                   then a smoke subset of the tests (quick: only the tests that run the back ends)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
# No model hub is reachable: every model the project needs ships in a package or is built by the tests.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

setup() {
  local stamp="$VENV/.sc_llm-installed" want extras="all,test,docs" wheel
  # The real-server LLM test (pytest -m server) needs llama-cpp-python, a ~35 min source build on the
  # registry: when a prebuilt wheel sits in ../shared/wheels (as in CI), install it with its extra.
  wheel=$(ls ../shared/wheels/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
  [ -n "$wheel" ] && extras="$extras,llm-server"
  want=$( (cat pyproject.toml ci/constraints.txt; echo "$wheel") | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch is pinned here (and only here) so pip takes the local CPU wheel instead of a CUDA build.
  "$VENV/bin/python" -m pip install --quiet -c ci/constraints.txt torch
  "$VENV/bin/python" -m pip install --quiet -c ci/constraints.txt -e ".[$extras]" ${wheel:+"$wheel"}
  echo "$want" > "$stamp"
}

# Smoke subset for test-latest: the optional back ends and the value/key/loader guarantees.
LATEST_TESTS=(tests/test_reliability.py tests/test_spatial.py tests/test_mudata.py)
LATEST_QUICK=(tests/test_reliability.py -k "leiden or spatial or squidpy")

test_latest() {
  local venv=.venv-latest
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # Only torch is pinned (local CPU wheel instead of a multi-GB CUDA download), in both steps: an
  # eager upgrade would otherwise replace it. Everything else is what users get.
  grep -E '^torch==' ci/constraints.txt > "$venv/torch-only.txt"
  "$venv/bin/python" -m pip install --quiet -c "$venv/torch-only.txt" torch
  "$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -c "$venv/torch-only.txt" -e ".[all,test]"
  "$venv/bin/python" - <<'PY'
import importlib, importlib.metadata as md
backends = ["sc_llm", "squidpy", "spatialdata", "captum", "lime", "httpx", "dask.array", "distributed",
            "zarr", "mudata", "igraph", "leidenalg"]
for name in backends:
    importlib.import_module(name)
shown = ["torch", "numpy", "scanpy", "anndata", "squidpy", "spatialdata", "dask", "zarr", "setuptools", "igraph"]
print("imported:", ", ".join(backends))
print("versions:", ", ".join(f"{p}=={md.version(p)}" for p in shown))
PY
  if [ "${1:-}" = quick ]; then
    shift
    "$venv/bin/python" -m pytest -q -x "${LATEST_QUICK[@]}" "$@"
  else
    "$venv/bin/python" -m pytest -q -x "${LATEST_TESTS[@]}" "$@"
  fi
}

job=${1:-test}
shift || true
if [ "$job" = test-latest ]; then test_latest "$@"; exit; fi
setup
case "$job" in
  setup) ;;
  demo) "$VENV/bin/sc-llm" demo "$@" ;;
  test) "$VENV/bin/python" -m pytest "$@" ;;
  lint) "$VENV/bin/ruff" check src tests benchmarks ;;
  docs) rm -rf docs/generated; "$VENV/bin/sphinx-build" -E -W --keep-going -b html docs docs/_build/html "$@" ;;
  bench) for b in benchmarks/bench_*.py; do echo "== $b"; "$VENV/bin/python" "$b" "$@"; done ;;
  *) echo "unknown job: $job (use demo, test, test-latest, docs, bench, lint)" >&2; exit 2 ;;
esac
