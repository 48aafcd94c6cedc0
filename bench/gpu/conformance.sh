#!/bin/bash
# On the lent GPU machine, from the repository root: the e2e conformance tests with the sites'
# models on CUDA (the agents place the demo models on the GPU they detect) and the local
# reference on CUDA too, then the overhead bench. See bench/gpu/README.md.
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site "$OUT" && tar -xJf .devrun/site312.tar.xz -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
if ! ldconfig -p | grep -q libseccomp.so.2; then
  mkdir -p /tmp/sc && dpkg -x .devrun/libseccomp2_*.deb /tmp/sc &&
    cp -a /tmp/sc/usr/lib/x86_64-linux-gnu/libseccomp.so.2* /usr/local/lib/ && ldconfig
fi
nvidia-smi -L
python3 - <<'PY'
import anyio._backends._asyncio  # noqa: F401  (before nnsight)
import nnsight, ray, torch, transformers
from site_agent.hardware import detect
from site_agent.scratch import abi_version
print("torch", torch.__version__, "transformers", transformers.__version__,
      "nnsight", nnsight.__version__, "ray", ray.__version__)
print("landlock abi", abi_version(), detect())
PY
export EDIF_HOME=/tmp/edifhome
if [ "${CONFORMANCE:-1}" = 1 ]; then
  timeout 330 python3 -m pytest -p no:cacheprovider -q -rA --model-device cuda --basetemp /tmp/pt \
    tests/e2e/test_conformance.py >"$OUT/conformance-cuda.log" 2>&1
  rc=$?
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/conformance-cuda.log" | tail -60
  find /tmp/pt -path "*run/logs/*.log" | tar czf "$OUT/mesh-logs.tgz" -T - 2>/dev/null
  echo "conformance rc=$rc at $(($(date +%s) - T0)) s"
  [ "$rc" -ne 0 ] && exit "$rc"
fi
[ "${BENCH:-1}" = 1 ] || exit 0
# BENCH_SECTIONS=delivery,ideal: the mesh's 1 GiB next to the unmodified client's own ceiling.
timeout "${BENCH_TIMEOUT:-390}" python3 bench/overhead.py --runs "${BENCH_RUNS:-30}" \
  --sections "${BENCH_SECTIONS:-delivery,latency}" --no-hops \
  --out "$OUT/overhead-gpu-machine.json" >"$OUT/overhead-gpu-machine.log" 2>&1
echo "bench rc=$? at $(($(date +%s) - T0)) s"
grep -v "Writing\|Loading" "$OUT/overhead-gpu-machine.log" | tail -70
