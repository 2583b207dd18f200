"""API keys for the HTTP API (no Ray, no FastAPI): where keys come from and how a request's key is checked.

Keys come from three places, merged: ``serve.api_keys`` (the config), ``serve.api_key_file`` (one
key per line; blank lines and ``#`` comments skipped) and the ``GAISNET_API_KEYS`` environment
variable (comma-separated) of the process that builds the app. With any key set, every route but
``/health`` and the playground page ``/`` needs ``Authorization: Bearer <key>``, which is what
OpenAI clients send for ``api_key=``.

The keys themselves stay in the process that builds the app: the ingress replica receives only
their SHA-256 digests, and a presented key is hashed and compared with every digest in constant
time (``hmac.compare_digest``, no early exit), so neither the comparison time nor Serve's stored
deployment arguments give a key away.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from ..config import ConfigError, ServeSettings

API_KEYS_ENV = "GAISNET_API_KEYS"
OPEN_ROUTES = ("/health", "/")  # answered without a key: probes ask /health; "/" is the static playground
# page (playground.py), which holds no data and sends the key the user types with every API call it makes


class ApiKeyError(ConfigError):
    """A key source cannot be used (missing file, a malformed key); the message names the source."""


def _check_key(key: str, source: str) -> str:
    if not key or any(c.isspace() for c in key):
        raise ApiKeyError(f"{source}: an API key must be non-empty and contain no whitespace")
    return key


def read_key_file(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ApiKeyError(f"serve.api_key_file: '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ApiKeyError(f"serve.api_key_file: '{path}' cannot be read ({type(e).__name__})") from None
    keys = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(_check_key(line, f"serve.api_key_file '{path}', line {n}"))
    return keys


def resolve_api_keys(settings: ServeSettings, environ: dict[str, str] | None = None) -> list[str]:
    """Every key from the config, the key file and ``$GAISNET_API_KEYS``, without duplicates."""
    env = os.environ if environ is None else environ
    keys = list(settings.api_keys)
    if settings.api_key_file:
        keys += read_key_file(settings.api_key_file)
    raw = env.get(API_KEYS_ENV, "")
    keys += [_check_key(k.strip(), f"${API_KEYS_ENV}") for k in raw.split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (None when absent or another scheme)."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def key_matches(presented: str | None, digests: list[str]) -> bool:
    """Whether ``presented`` is one of the keys; compares against every digest (constant time)."""
    candidate = key_digest(presented or "")
    found = False
    for d in digests:
        found |= hmac.compare_digest(candidate, d)
    return found and presented is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, have_keys: bool) -> str | None:
    """The warning to print when the API listens beyond loopback without keys (None otherwise)."""
    if have_keys or is_loopback(host):
        return None
    return (f"warning: serving on {host}:{port} without API keys: anyone who can reach this address can use the "
            f"API. Set serve.api_keys, serve.api_key_file or ${API_KEYS_ENV}, or bind serve.host=127.0.0.1")
