#!/bin/bash
# Build what a lent GPU machine lacks for the CUDA conformance run (bench/gpu/README.md).
#
# That machine runs its image's python3 (3.12) and its own CUDA torch, and reaches no package
# registry, so this downloads our pinned versions (constraints.txt) of everything else as
# cp312 wheels, installs them into one folder with Python 3.12, prunes Ray to its core (no
# Java jars, RLlib, Data, Serve, Tune, Train, LLM or dashboard client: 79 MB wheel -> 28 MB
# compressed), and packs the folder as .devrun/site312.tar.xz (~61 MB; the tool carries at
# most 64 MiB a call). libseccomp2 comes along as a .deb in case the image lacks it.
set -euo pipefail
cd "$(dirname "$0")/../.."
# (A pyenv shim may exist and still fail: ask the interpreter itself where it is.)
PY312=${PY312:-$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null ||
  echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
OUT=.devrun
WHL=$(mktemp -d) SITE=$(mktemp -d)
trap 'rm -rf "$WHL" "$SITE"' EXIT
# Wanted at our pins; torch, numpy, sympy, networkx and jinja2 are the image's own.
NAMES=(nnsight transformers ray huggingface_hub hf-xet httpx2 httpcore2 truststore tokenizers
  safetensors accelerate annotated-doc annotated-types anyio cffi click cloudpickle
  cryptography fastapi grpcio grpcio-health-checking h11 httpcore httpx hypothesis iniconfig
  jsonschema jsonschema-specifications referencing rpds-py attrs greenlet msgpack
  opentelemetry-api opentelemetry-exporter-prometheus opentelemetry-sdk
  opentelemetry-semantic-conventions packaging pluggy prometheus_client protobuf py-consul
  pycparser pydantic pydantic-settings pydantic_core PyJWT pyseccomp pytest pytest-asyncio
  pytest-timeout python-dotenv python-multipart PyYAML sortedcontainers starlette
  typing-inspection typing_extensions uvicorn uvloop httptools websocket-client websockets
  zstandard Pygments
  tqdm requests urllib3 certifi idna charset-normalizer filelock fsspec regex wrapt psutil)
pins=()
for name in "${NAMES[@]}"; do
  pin=$(.venv/bin/pip freeze | grep -i "^${name}==" || true)
  [ -n "$pin" ] || { echo "not in .venv: $name (run make install first)" >&2; exit 1; }
  pins+=("$pin")
done
platforms=()
for p in manylinux_2_{5,17,24,27,28,31,34}_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$WHL" "${pins[@]}"
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl
rm -rf "${SITE:?}"/bin "${SITE:?}"/ray/{jars,rllib,data,serve,tune,train,llm} "${SITE:?}"/ray/dashboard/client/build
# site_agent reports its own version from the distribution's metadata.
mkdir -p "$SITE/edif_mesh-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: edif-mesh\nVersion: 0.1.0\n' >"$SITE/edif_mesh-0.1.0.dist-info/METADATA"
mkdir -p "$OUT"
tar -C "$SITE" -cf - . | xz -T0 -6 >"$OUT/site312.tar.xz"
(cd "$OUT" && rm -f libseccomp2_*.deb && apt-get download libseccomp2 2>/dev/null)
cp bench/gpu/conformance.sh "$OUT/"
ls -l "$OUT"
