"""The playground page at ``GET /`` (no Ray, no FastAPI): one static HTML file with its script and
style inline, shipped inside the package (``static/playground.html``, package data) and read through
``importlib.resources``, so it works from a wheel, an editable install or a zip, with no build step
and nothing fetched from a CDN: the page must work on an offline cluster.

The page needs no API key (like ``/health``, it is in ``auth.OPEN_ROUTES``): it holds no data, and
every API call it makes (``/v1/models``, ``/v1/chat/completions``) sends the key typed into it, so
the gate still guards everything the page can reach. The Content-Security-Policy it is served with
lets it talk to this origin only and load nothing from elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PAGE = "playground.html"
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # a new gaisnet version serves its new page at once
}


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's text, read once per process from the installed package."""
    return resources.files(__package__).joinpath("static", PAGE).read_text(encoding="utf-8")
