"""The farm key: the secret that lets a process register as an agent or ask the tracker for a device.

TVM's tracker protocol has no authentication: anyone who reaches the tracker could register a server on a
farm key (and receive candidates, models and weights, and report timings) or take the farm's devices. The
farm's tracker therefore admits ``PUT`` (register a server) and ``REQUEST`` (ask for a session) only on a
connection that proved it holds the farm key, by a challenge-response on TVM's own framing, before its
first such request::

    -> [CHALLENGE]                  <- [SUCCESS, nonce]           (a fresh random nonce per connection)
    -> [AUTH, role, proof]          <- SUCCESS, or the connection is closed
       proof = HMAC-SHA256(farm key, "tunefarm-auth|<role>|<nonce>")

The key never crosses the network and a recorded proof is worth nothing on another connection. (There is
no encryption: an attacker who can read and change the traffic in flight can still hijack a connection;
see docs/security.md.) Keys that the tracker is told to leave open (``--open-key``) take stock
TVM servers and clients without a proof.

The key is read, in this order, from ``$TUNEFARM_FARM_KEY`` (the value), ``$TUNEFARM_FARM_KEY_FILE``,
or ``~/.config/tunefarm/farm.key`` (``$XDG_CONFIG_HOME``); the file is created (mode 0600) with a new
random key when it does not exist, so a tracker and agents on one machine share it with nothing to set up.
Other machines' agents need a copy of the file (or the variable).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from .errors import TunefarmError

KEY_ENV = "TUNEFARM_FARM_KEY"
KEY_FILE_ENV = "TUNEFARM_FARM_KEY_FILE"
# Tracker codes the farm's tracker adds to TVM's (tvm.rpc.base.TrackerCode uses 1..7).
CHALLENGE = 101
AUTH = 102
SUCCESS = 0
NONCE_BYTES = 16


def default_key_file() -> Path:
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunefarm" / "farm.key"


def load_farm_key(path: str | Path | None = None, create: bool = True) -> bytes:
    """The farm key (see the module docstring); creates the key file when it is missing and ``create``."""
    if path is None and os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].strip().encode()
    path = Path(path) if path else default_key_file()
    if not path.is_file():
        if not create:
            raise TunefarmError(f"no farm key at {path}: copy the tracker host's key file there, or set {KEY_ENV}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it meanwhile: use theirs
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TunefarmError(f"the farm key file {path} is readable by others; run: chmod 600 {path}")
    key = path.read_text().strip()
    if not key:
        raise TunefarmError(f"the farm key file {path} is empty")
    return key.encode()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def proof(key: bytes, nonce: str, role: str) -> str:
    return hmac.new(key, f"tunefarm-auth|{role}|{nonce}".encode(), hashlib.sha256).hexdigest()


def proof_ok(key: bytes, nonce: str | None, role: str, supplied) -> bool:
    return bool(nonce) and isinstance(supplied, str) and hmac.compare_digest(proof(key, nonce, role), supplied)


def authenticate(sock, key: bytes, role: str, sendjson, recvjson) -> None:
    """Prove the farm key on a tracker connection (``sendjson``/``recvjson``: TVM's framing functions).
    Raises TunefarmError when the tracker refuses (a wrong key) or is not a farm tracker."""
    try:
        sendjson(sock, [CHALLENGE])
        answer = recvjson(sock)
    except (OSError, RuntimeError, ValueError) as err:
        raise TunefarmError(f"the tracker did not answer the farm's challenge (is it a tunefarm tracker?): {err}") \
            from None
    if not (isinstance(answer, list) and len(answer) == 2 and answer[0] == SUCCESS and isinstance(answer[1], str)):
        raise TunefarmError("the tracker did not answer the farm's challenge (is it a tunefarm tracker?)")
    try:
        sendjson(sock, [AUTH, role, proof(key, answer[1], role)])
        ok = recvjson(sock) == SUCCESS
    except (OSError, RuntimeError, ValueError):
        ok = False
    if not ok:
        raise TunefarmError("the tracker refused this farm key (use the tracker host's key file; see "
                            f"{KEY_FILE_ENV} / {KEY_ENV})")
