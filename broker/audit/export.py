"""Rendering audit entries and accounting rows as JSON or CSV (for `edif audit export`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from broker.audit.model import AccountingRow, AuditEntry

ENTRY_COLUMNS = [
    "record", "seq", "ts", "action", "kid", "pseudonym", "erased", "role", "model", "site",
    "job_id", "bytes_in", "bytes_out", "gpu_s", "outcome", "hash", "prev",
]  # fmt: skip
ACCOUNTING_COLUMNS = [
    "record", "compaction_seq", "idx", "day", "kid", "pseudonym", "erased", "role", "model",
    "site", "submitted", "completed", "failed", "refused", "gpu_s", "bytes_in", "bytes_out",
]  # fmt: skip


def to_json(
    entries: Sequence[AuditEntry],
    accounting: Sequence[AccountingRow],
    pseudonyms: dict[str, str] | None = None,
) -> str:
    document: dict[str, object] = {
        "entries": [e.model_dump(mode="json") for e in entries],
        "accounting": [a.model_dump(mode="json") for a in accounting],
    }
    if pseudonyms is not None:
        document = {"pseudonyms": pseudonyms, **document}
    return json.dumps(document, indent=2)


def to_csv(entries: Sequence[AuditEntry], accounting: Sequence[AccountingRow]) -> str:
    """One table: a `record` column tells entries from accounting rows; unused cells empty."""
    columns = ENTRY_COLUMNS + [c for c in ACCOUNTING_COLUMNS if c not in ENTRY_COLUMNS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({"record": "entry", **entry.model_dump(mode="json")})
    for row in accounting:
        writer.writerow({"record": "accounting", **row.model_dump(mode="json")})
    return out.getvalue()
