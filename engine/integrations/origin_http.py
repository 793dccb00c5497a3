"""HTTP requests that carry a secret, kept on the one server they are meant for.

`urllib.request.urlopen` follows redirects and keeps every header it was given, an `Authorization` header
included, on every hop: an image URL on Label Studio that answers 302 to another port or host would hand that
listener the token. Label Studio's storage endpoints do answer with redirects, so this is the normal path.
Here redirects are followed by hand, and only while they stay on the origin (scheme, host, port) the request
was made for; a hop anywhere else is refused before anything is sent to it.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class OffOriginRedirect(ValueError):
    """A redirect that leaves the origin the request (and its credentials) were meant for."""


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def same_origin(url: str, base: str) -> bool:
    """Whether `url` is on the server `base` names (scheme, host and port alike)."""
    try:
        u, b = urlsplit(url), urlsplit(base)
        return u.scheme in ("http", "https") and (u.scheme, u.hostname, u.port or _default_port(u.scheme)) == \
            (b.scheme, b.hostname, b.port or _default_port(b.scheme))
    except ValueError:  # a malformed port
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError for the 3xx, which `open_on_origin` handles


# No proxy either: a proxy is another host, and it would see the header in the clear on http.
_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def open_on_origin(url: str, origin: str, headers: dict | None = None, data: bytes | None = None,
                   method: str | None = None, timeout: float = 30.0):
    """`urlopen(url)` with `headers`, following at most MAX_REDIRECTS redirects, each only while it stays on
    `origin`. Raises OffOriginRedirect (nothing sent to that hop), or urllib's errors as urlopen does. A 303
    turns the request into a bodiless GET, as browsers do."""
    if not same_origin(url, origin):
        raise OffOriginRedirect(f"{url[:200]!r} is not on {origin}; refusing to send it our credentials")
    for _ in range(MAX_REDIRECTS + 1):
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        try:
            return _OPENER.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location") if e.code in _REDIRECTS else None
            if not location:
                raise
            e.close()
            nxt = urljoin(url, location)
            if not same_origin(nxt, origin):
                raise OffOriginRedirect(f"{url[:200]} redirected to {nxt[:200]!r}, which is not on {origin}; "
                                        f"not following it (credentials stay with {origin})") from None
            url = nxt
            if e.code == 303:
                data, method = None, "GET"
    raise OffOriginRedirect(f"{url[:200]}: more than {MAX_REDIRECTS} redirects")
