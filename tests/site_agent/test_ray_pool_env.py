"""The agent drops secret-looking variables before it starts Ray (workers inherit Ray's env)."""

from __future__ import annotations

import os

from site_agent.ray_pool import scrub_environment


def test_secret_looking_variables_are_removed(monkeypatch) -> None:
    planted = {
        "EDIF_TEST_PLANTED_API_TOKEN": "x",
        "NDIF_API_KEY": "y",
        "AWS_SECRET_ACCESS_KEY": "z",
        "DB_PASSWORD": "p",
        "MY_PRIVATE_THING": "q",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EDIF_HOME", "/tmp/somewhere")
    dropped = scrub_environment()
    assert set(planted) <= set(dropped)
    assert not set(planted) & set(os.environ)
    assert os.environ["EDIF_HOME"] == "/tmp/somewhere"
