"""Test-wide setup.

anyio's asyncio backend must be imported before nnsight: nnsight mounts `.save` on `object`,
which breaks anyio classes defined afterwards (wire-protocol spec §11.4). The nnsight client
used by the tests, Starlette's test client and httpx's async client all need that backend.
"""

import os

import anyio._backends._asyncio  # noqa: F401  (must precede any nnsight import)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_addoption(parser) -> None:
    # The conformance tests' local reference runs where the sites' models run: `cuda` on a
    # GPU machine (the agents place the demo models on the GPU they detect), else the CPU.
    parser.addoption(
        "--model-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="device of the local reference models in the e2e conformance tests",
    )
