"""The dashboard page served at `/`: one self-contained HTML file (inline CSS and JS).

It needs nothing from the internet: the page polls `status` (relative, so it works behind
a path prefix) every second, renders one table row per source and dataset, and draws the
replay lag of the last minutes as an inline SVG chart kept in the browser.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from replicator.observe.http import Route


@cache
def page() -> bytes:
    return resources.files("replicator.observe").joinpath("dashboard.html").read_bytes()


def dashboard_route() -> Route:
    return lambda: ("text/html; charset=utf-8", page())
