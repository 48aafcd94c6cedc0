"""Fixtures for the dashboard tests (defined in `live_broker`, which the tests also import)."""

from live_broker import broker, browser, page  # noqa: F401
