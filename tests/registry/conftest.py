"""Registry tests: the `slow` marker (tests that wait out Consul's real deregister window)."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: waits out real time (a real Consul's 1-minute deregister floor)"
    )
