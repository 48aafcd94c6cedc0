"""Pure view models for the dashboard pages: data in, plain dicts/dataclasses out.

The routes gather data from the broker's services (`QuotaService`, the audit log,
`BrokerService.deployments()`), these functions shape it for the templates: usage rows against
their limits, a bar chart's geometry (rendered as inline SVG, so no script or CDN is needed),
audit filters parsed from a query string, and /status grouped by site. Nothing here touches
I/O, which keeps it testable without a browser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.audit.model import AuditEntry
from broker.quotas.policy import Period, PolicySet, QuotaPolicy
from broker.quotas.store import UsageRow

PAGE_SIZE = 50


def utc(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    """GPU-seconds for people: `12.5 s`, `3.2 min`, `1.4 h`; None is unlimited."""
    if value is None:
        return "unlimited"
    if value < 120:
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:g} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return f"{value} B"


# -- usage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageLine:
    """One user (pseudonym) or group in the usage tables, against its budget if comparable."""

    name: str
    jobs: int
    gpu_seconds: float
    running: int = 0
    limit: float | None = None  # in the page's period; None: unlimited or other period
    limit_text: str = "unlimited"
    percent: float | None = None  # of `limit`, capped at 100 for the meter

    @property
    def over(self) -> bool:
        return self.limit is not None and self.gpu_seconds >= self.limit


def _against(used: float, budget: float | None, budget_period: Period, shown: Period):
    """(limit, text, percent): a meter only when the budget's period is the page's."""
    if budget is None:
        return None, "unlimited", None
    text = f"{seconds(budget)} / {budget_period.value}"
    if budget_period is not shown:
        return None, text, None
    percent = 100.0 if budget == 0 else min(100.0, 100.0 * used / budget)
    return budget, text, percent


def user_lines(
    rows: Sequence[UsageRow], active: Mapping[str, int], policy: QuotaPolicy, period: Period
) -> list[UsageLine]:
    """Per-pseudonym usage. The ledger keeps no role or groups per pseudonym (by design), so
    the limit shown is `policy`'s: the researcher role's, which covers users in no group."""
    used = {r.name: r for r in rows if r.scope == "user"}
    lines = []
    for name in sorted(set(used) | set(active)):
        row = used.get(name)
        gpu = row.gpu_seconds if row else 0.0
        limit, text, percent = _against(gpu, policy.gpu_seconds_per_period, policy.period, period)
        lines.append(
            UsageLine(name, row.jobs if row else 0, gpu, active.get(name, 0), limit, text, percent)
        )
    return sorted(lines, key=lambda line: (-line.gpu_seconds, line.name))


def group_lines(rows: Sequence[UsageRow], policies: PolicySet, period: Period) -> list[UsageLine]:
    """Per-group usage against the group's shared pool (or, without one, "no pool")."""
    used = {r.name: r for r in rows if r.scope == "group"}
    lines = []
    for name in sorted(set(used) | set(policies.groups)):
        row = used.get(name)
        gpu = row.gpu_seconds if row else 0.0
        policy = policies.groups.get(name)
        if policy is None or policy.group_gpu_seconds_per_period is None:
            limit, text, percent = None, "no pool", None
        else:
            limit, text, percent = _against(
                gpu, policy.group_gpu_seconds_per_period, policy.period, period
            )
        lines.append(UsageLine(name, row.jobs if row else 0, gpu, 0, limit, text, percent))
    return sorted(lines, key=lambda line: (-line.gpu_seconds, line.name))


# -- chart ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # x-axis label
    value: str  # tooltip / title


@dataclass(frozen=True)
class Chart:
    """Geometry of a bar chart in a `width` x `height` SVG viewBox."""

    width: int
    height: int
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (y, label) of the horizontal grid lines
    left: int
    bottom: float
    empty: bool


def bar_chart(points: Sequence[tuple[str, float]], width: int = 760, height: int = 220) -> Chart:
    """Bars for `(label, GPU-seconds)` points, with a y axis of four round ticks."""
    left, right, top, bottom_pad = 64, 12, 12, 28
    bottom = height - bottom_pad
    peak = max((v for _, v in points), default=0.0)
    scale_max = _nice(peak) if peak > 0 else 1.0
    plot_w, plot_h = width - left - right, bottom - top
    slot = plot_w / max(1, len(points))
    bars = []
    for i, (label, value) in enumerate(points):
        h = plot_h * value / scale_max
        bars.append(
            Bar(left + i * slot + slot * 0.15, bottom - h, slot * 0.7, h, label, seconds(value))
        )
    ticks = [(bottom - plot_h * k / 4, seconds(scale_max * k / 4)) for k in range(5)]
    return Chart(width, height, bars, ticks, left, bottom, peak <= 0)


def _nice(value: float) -> float:
    """The smallest 1/2/5 x 10^n at or above `value` (round axis maxima)."""
    magnitude = 10 ** _floor_log10(value)
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def _floor_log10(value: float) -> int:
    exponent = 0
    while value >= 10:
        value /= 10
        exponent += 1
    while value < 1:
        value *= 10
        exponent -= 1
    return exponent


# -- audit ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditQuery:
    """The audit page's filters, as parsed from (and written back into) the query string."""

    action: str = ""
    model: str = ""
    site: str = ""
    since: str = ""  # `YYYY-MM-DDTHH:MM`, UTC (an <input type="datetime-local"> value)
    until: str = ""
    page: int = 1
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> AuditQuery:
        errors: list[str] = []
        try:
            page = max(1, int(params.get("page", "1") or "1"))
        except ValueError:
            page, errors = 1, [*errors, "page must be a number"]
        query = cls(
            action=params.get("action", "").strip()[:64],
            model=params.get("model", "").strip()[:200],
            site=params.get("site", "").strip()[:64],
            since=params.get("since", "").strip()[:32],
            until=params.get("until", "").strip()[:32],
            page=page,
            errors=errors,
        )
        for name in ("since", "until"):
            if getattr(query, name) and _parse_time(getattr(query, name)) is None:
                query.errors.append(f"{name}: expected a date and time like 2026-01-31T14:00")
        return query

    @property
    def since_ts(self) -> float | None:
        return _parse_time(self.since)

    @property
    def until_ts(self) -> float | None:
        return _parse_time(self.until)

    def params(self, page: int | None = None) -> dict[str, str]:
        """The filters as query parameters (empty ones left out), for links."""
        values = {
            "action": self.action,
            "model": self.model,
            "site": self.site,
            "since": self.since,
            "until": self.until,
        }
        out = {k: v for k, v in values.items() if v}
        if page is not None and page > 1:
            out["page"] = str(page)
        return out

    def matches(self, entry: AuditEntry) -> bool:
        """Filters the log's own `AuditFilter` cannot express (substring on model, exact site)."""
        if self.model and self.model.lower() not in (entry.model or "").lower():
            return False
        return not (self.site and entry.site != self.site)


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    for pattern in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, pattern).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Page:
    items: list[AuditEntry]
    number: int
    pages: int
    total: int


def paginate(entries: Sequence[AuditEntry], number: int, size: int = PAGE_SIZE) -> Page:
    """Newest first; `number` clamped into range."""
    ordered = sorted(entries, key=lambda e: e.seq, reverse=True)
    pages = max(1, -(-len(ordered) // size))
    number = min(max(1, number), pages)
    start = (number - 1) * size
    return Page(list(ordered[start : start + size]), number, pages, len(ordered))


# -- sites ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteView:
    name: str
    reachable: bool
    models: list[dict[str, Any]]

    @property
    def queue_depth(self) -> int:
        return sum(int(m.get("queue_depth") or 0) for m in self.models)

    @property
    def health(self) -> str:
        if not self.reachable:
            return "UNREACHABLE"
        states = {m.get("application_state") for m in self.models}
        return "HEALTHY" if states <= {"RUNNING"} else "DEGRADED"


def sites_of(status: Mapping[str, Any]) -> list[SiteView]:
    """`/status`'s `deployments` ("site/repo" -> entry) grouped by site."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for name, entry in (status.get("deployments") or {}).items():
        site = name.split("/", 1)[0]
        grouped.setdefault(site, []).append(dict(entry))
    return [
        SiteView(
            site,
            any(m.get("deployment_level") == "HOT" for m in models),
            sorted(models, key=lambda m: str(m.get("repo_id"))),
        )
        for site, models in sorted(grouped.items())
    ]
