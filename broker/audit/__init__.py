"""The broker's audit log: append-only, hash-chained, signed at the head, pseudonymous.

Roles of the modules: `model` (records, canonical hashing, commitments), `keys` (rotated audit
pseudonym keys), `checkpoint` (the signed head), `verify` (pure verification), `retention`
(pure compaction planning), `store` (`AuditLog` interface, SQLite implementation, export and
erasure), `hooks` (the broker's job lifecycle -> events), `export` (JSON/CSV rendering).

Design:

* **Chain.** Entry n's body (canonical JSON: sorted keys, no spaces) holds `seq = n`,
  `prev` = hash of entry n-1 (64 zeros for entry 1), the time and the event; its hash is
  SHA-256 over that encoding. Editing any field breaks that entry's hash; moving a row breaks
  `seq`; removing or inserting one breaks the next `prev`.
* **Anchor.** After every write, `head.json` holds (seq, hash) of the head signed with the
  broker's Ed25519 key (`auth.keys.KeyStore`). The log must end exactly there: a removed tail,
  extra entries or a recomputed chain all fail verification.
* **Pseudonyms.** Users appear as `a-<HMAC-SHA256(audit key, sub)>`, under audit keys kept
  apart from the logs/metrics key (`$EDIF_HOME/keys/audit-pseudonym-<kid>.key`, 0600) and
  rotated (`audit_key_rotation_days`, or `edif audit rotate-key`): each entry names its kid.
  Request contents, tokens, error texts and raw ids are never recorded.
* **Erasure (GDPR art. 17).** The hashed body holds only `subject` = SHA-256(salt || pseudonym)
  with a random per-row salt; pseudonym and salt are stored beside the body. Erasure finds the
  person's pseudonyms under every key, sets pseudonym and salt to NULL, and appends an
  `audit.erasure` entry listing the redacted rows. Verification still passes (the hashed body
  is unchanged) and redaction without such an entry is reported as tampering. What remains is
  a commitment nobody can open: the entries stay as accounting of *someone's* use.
  Destroying an old audit key file unlinks every entry written under it at once.
* **Export (GDPR art. 15).** The same pseudonym lookup, returning entries and accounting rows.
* **Retention.** Detailed (`job.*`) entries older than `audit_detailed_retention_days` become
  accounting rows per (day, kid, pseudonym, role, model, site); one chained
  `audit.compaction` entry records the removed seq spans (the `prev` of each span's first
  entry and the hash of its last) and a digest of the rows, so verification walks across the
  gaps exactly and detects any change to the accounting. See `retention`.
"""

from broker.audit.hooks import JobAuditor
from broker.audit.keys import AuditKeyring
from broker.audit.model import AuditAction, AuditEntry, AuditEvent, AuditFilter, VerifyReport
from broker.audit.store import AuditLog, NullAuditLog, SqliteAuditLog, open_audit_log

__all__ = [
    "AuditAction",
    "AuditEntry",
    "AuditEvent",
    "AuditFilter",
    "AuditKeyring",
    "AuditLog",
    "JobAuditor",
    "NullAuditLog",
    "SqliteAuditLog",
    "VerifyReport",
    "open_audit_log",
]
