"""Who may use the farm: the API token (from the config or its file, else generated; compared in constant
time), the dashboard's session cookie (signed with a key derived from the token) and its sign-in page.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import secrets
import time
import urllib.parse
from pathlib import Path

from tunefarm.core.errors import TunefarmError
from tunefarm.host.service.config import FarmConfig
from tunefarm.host.service.errors import ApiError
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


LOG_THROTTLE_EVERY_S = 60.0


class WrongTokens:
    """Per peer address, wrong tokens are slowed (issue 32, item 11: ~830 guesses/s were answered): a bucket
    of :attr:`FREE` failures that refills at one per :attr:`REFILL_S`; while it is empty, a request from that
    address that carries a token is answered 429 without the token being compared, right or wrong. Requests
    without a token (a dashboard's cookie) are not counted. At most :attr:`MAX_PEERS` addresses are kept."""

    FREE = 30  # a burst a person or a script with a stale token never reaches; then one guess a second
    REFILL_S = 1.0
    MAX_PEERS = 4096

    def __init__(self):
        # peer -> [bucket level, when, when last logged]
        self.peers: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def _level(self, peer: str, now: float) -> float:
        entry = self.peers.get(peer)
        if entry is None:
            return float(self.FREE)
        return min(float(self.FREE), entry[0] + (now - entry[1]) / self.REFILL_S)

    def wait_s(self, peer: str) -> float:
        """Seconds before ``peer`` may try a token again (0: now)."""
        level = self._level(peer, time.monotonic())
        return 0.0 if level >= 1.0 else (1.0 - level) * self.REFILL_S

    def failed(self, peer: str) -> None:
        now = time.monotonic()
        level = self._level(peer, now) - 1.0
        logged = self.peers[peer][2] if peer in self.peers else -math.inf
        if level < 1.0 and now - logged > LOG_THROTTLE_EVERY_S:
            log(f"too many wrong tokens from {peer}: its requests with a token are answered 429 beyond one per "
                f"{self.REFILL_S:g} s (said at most once a minute)")
            logged = now
        self.peers[peer] = [level, now, logged]
        self.peers.move_to_end(peer)
        while len(self.peers) > self.MAX_PEERS:
            self.peers.popitem(last=False)


WRONG_TOKENS = WrongTokens()


def token_ok(token: str, supplied: str | None, peer: str | None = None) -> bool:
    """Whether ``supplied`` is the token, compared in constant time. With ``peer`` (the client's address),
    wrong tokens are counted and a peer that sent too many gets an ApiError(429) instead (:class:`WrongTokens`)."""
    if not supplied:
        return False
    if peer is not None:
        wait = WRONG_TOKENS.wait_s(peer)
        if wait > 0:
            raise ApiError(429, f"too many wrong tokens from {peer}: try again in {max(1, math.ceil(wait))} s")
    ok = hmac.compare_digest(supplied.encode(), token.encode())
    if not ok and peer is not None:
        WRONG_TOKENS.failed(peer)
    return ok


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
