"""Who may use the farm: the API token (from the config or its file, else generated; compared in constant
time), the dashboard's session cookie (signed with a key derived from the token) and its sign-in page.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import urllib.parse
from pathlib import Path

from tunefarm.core.errors import TunefarmError
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.log import log

SESSION_COOKIE = "tunefarm_session"


def load_token(config: FarmConfig, default_path: Path) -> str:
    """The API token: from the config, else from its file, else generated into that file (mode 0600)."""
    if config.token:
        return config.token
    path = Path(config.token_file) if config.token_file else default_path
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise TunefarmError(f"{path} is readable by others; run: chmod 600 {path}")
        token = path.read_text().strip()
        if not token:
            raise TunefarmError(f"{path} is empty; delete it to generate a new token")
        log(f"API token: from {path}")
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    # Printed this once so that the person starting the farm can hand it to laptops and agents.
    print(f"generated an API token (kept in {path}, mode 0600; shown only now):\n  {token}\n"
          f"  laptops and agents: export TUNEFARM_TOKEN=<that token>", flush=True)
    return token


def token_ok(token: str, supplied: str | None) -> bool:
    """Whether ``supplied`` is the token, compared in constant time."""
    if not supplied:
        return False
    return hmac.compare_digest(supplied.encode(), token.encode())


def cookie_secret(token: str) -> str:
    """The key that signs dashboard session cookies."""
    # Derived from the token: a new token signs every dashboard session out.
    return hmac.new(token.encode(), b"tunefarm dashboard session", hashlib.sha256).hexdigest()


LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tunefarm: sign in</title>
<link rel="stylesheet" href="/static/farm.css"></head><body><main class="login">
<h1>tunefarm</h1><p>Paste the farm's token (the host printed it on its first start; it is kept in
<code>logs/farm/token</code> on the host).</p>{message}
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<input type="password" name="token" id="token" placeholder="token" autofocus size="50">
<button type="submit" id="signin">Sign in</button></form></main></body></html>"""


def safe_next(value: str) -> str:
    """Where to go after signing in: a plain path on this site, else ``/``. Browsers read a backslash as a
    slash and drop tabs and newlines, so ``/\\evil.example`` or ``/<tab>/evil.example`` would lead to
    another host: a path with a backslash or a control character is refused too, as is ``//host``."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urllib.parse.urlsplit(value)
    return value if not (parts.scheme or parts.netloc) else "/"
