"""The governance dashboard: server-rendered HTML pages under `/admin` for governance staff.

`routes` mounts the pages (login, Usage, Quotas, Audit, Sites, CSV export) on the broker app;
`sessions` keeps the short-lived, opaque browser sessions a governance JWT opens; `views` shapes
the broker's data for the templates (`templates/`, Jinja2 with autoescaping) and draws the
usage chart as inline SVG. Everything the pages need (`static/dashboard.css`) is served by the
broker itself: no CDN, no inline script or style, so a strict CSP holds.
"""

from broker.dashboard.routes import add_dashboard_routes

__all__ = ["add_dashboard_routes"]
