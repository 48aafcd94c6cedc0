"""SiteRecord ↔ Consul service Meta, Go durations, and the record's own validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from catalog_suite import site_record
from pydantic import ValidationError

from edif.errors import SiteRecordTooLarge, SiteRecordUnreadable
from registry.durations import go_duration, parse_go_duration
from registry.meta import META_KEY, from_meta, to_meta
from registry.model import SiteRecord, split_address, worst_health


def test_a_record_survives_the_trip_through_meta() -> None:
    record = site_record(None, "fau", models=60)
    meta = to_meta(record)
    assert from_meta(meta) == record
    assert SiteRecord.from_meta(record.to_meta(), "warning") == record.with_health("warning")


def test_the_model_list_is_split_into_parts_within_consuls_limits() -> None:
    meta = to_meta(site_record(None, "fau", models=60))
    parts = sorted((k for k in meta if k.startswith("models_")), key=lambda k: int(k[7:]))
    assert len(parts) > 10 and parts == [f"models_{i}" for i in range(len(parts))]
    assert len(meta) <= 64
    assert all(META_KEY.match(k) and not k.startswith("consul-") for k in meta)
    assert all(len(v.encode()) <= 512 for v in meta.values())
    assert all(v.isascii() for k, v in meta.items() if k.startswith("models_"))


def test_no_groups_means_no_group_keys_and_reads_back_empty() -> None:
    record = site_record(None, "open").model_copy(update={"allowed_groups": []})
    meta = to_meta(record)
    assert not any(k.startswith("groups_") for k in meta)
    assert from_meta(meta).allowed_groups == []


def test_too_many_models_is_refused_before_anything_is_written() -> None:
    with pytest.raises(SiteRecordTooLarge, match="fewer models"):
        to_meta(site_record(None, "huge", models=400))


def test_a_scalar_over_512_bytes_is_refused() -> None:
    record = site_record(None, "verbose").model_copy(update={"institution": "Ü" * 300})
    with pytest.raises(SiteRecordTooLarge, match="institution"):
        to_meta(record)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m.pop("edif_schema"),
        lambda m: m.update(edif_schema="2"),
        lambda m: m.pop("site"),
        lambda m: m.pop("v_torch"),
        lambda m: m.pop("models_1"),  # a part missing: truncated JSON
        lambda m: m.update(models_0="not json"),
        lambda m: m.update(max_concurrent_jobs="many"),
        lambda m: m.pop("hardware_0"),
        lambda m: m.update(site="no spaces allowed"),
    ],
)
def test_damaged_meta_is_unreadable(damage: Callable[[dict[str, str]], object]) -> None:
    meta = to_meta(site_record(None, "fau", models=10))
    damage(meta)
    with pytest.raises(SiteRecordUnreadable):
        from_meta(meta)


@pytest.mark.parametrize(
    ("seconds", "text"), [(30, "30s"), (60, "60s"), (1.5, "1500ms"), (0.25, "250ms")]
)
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize(("text", "seconds"), [("1m30s", 90), ("1h", 3600), ("0", 0), (".5s", 0.5)])
def test_go_durations_parse_like_go(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "s", "5 s", "5sx", "five seconds"])
def test_go_durations_refuse_what_is_not_one(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_worst_health() -> None:
    assert worst_health([]) == "passing"
    assert worst_health(["passing", "warning", "passing"]) == "warning"
    assert worst_health(["warning", "critical"]) == "critical"
    assert worst_health(["passing", "maintenance"]) == "critical"  # unknown counts as worst


def test_addresses() -> None:
    assert split_address("gpu01.fau.de:50051") == ("gpu01.fau.de", 50051)
    assert split_address("[::1]:50051") == ("::1", 50051)
    for bad in ("no-port", ":50051", "host:0", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_the_record_validates_what_the_catalog_relies_on() -> None:
    fields = site_record(None, "ok").model_dump()
    for change in (
        {"site": "has/slash"},
        {"grpc_address": "nowhere"},
        {"max_concurrent_jobs": -1},
        {"health": "fine"},
        {"hardware": {**fields["hardware"], "free_memory_bytes": [1, 2]}},  # 8 devices
        {"hardware": {**fields["hardware"], "vendor": "tpu"}},
        {"models": [{**fields["models"][0], "state": "running fine"}]},
        {"surprise": 1},
    ):
        with pytest.raises(ValidationError):
            SiteRecord(**{**fields, **change})
