"""Fair-use quotas: per-user rate limits, admission caps and GPU-seconds budgets.

`policy` says what each role and group may use, `bucket`/`caps`/`budget` decide (pure
functions), `store` keeps policies and the usage ledger in SQLite, `service.QuotaService` puts
them together for the broker.
"""
