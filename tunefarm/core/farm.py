"""How laptops and agents reach the host service's HTTP API: its address, its token, its paths.

The farm URL and the token come from, in this order: the command line (``--farm``; agents also
``--token``), the environment (``TUNEFARM_FARM``, ``TUNEFARM_TOKEN``), then the client config file
(``$TUNEFARM_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/tunefarm/client.yaml``, else
``~/.config/tunefarm/client.yaml``)::

    farm: http://farm-host:9180
    token: the token the host printed on its first start (logs/farm/token on the host)
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import TunefarmError

DEFAULT_FARM_PORT = 9180
FARM_ENV = "TUNEFARM_FARM"
TOKEN_ENV = "TUNEFARM_TOKEN"
CLIENT_CONFIG_ENV = "TUNEFARM_CLIENT_CONFIG"
HEARTBEAT_PATH = "/api/devices/heartbeat"
HEARTBEAT_S = 2.0  # how often agents report to the host service (the service tells them so in its info)
INFO_PATH = "/api/info"
# One API call: at most CONNECT_TIMEOUT_S to connect (and for each send), then at most READ_TIMEOUT_S for
# the answer's first byte and between bytes after it: a listener that accepts and never answers is an
# error within about half a minute, not a hang.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0
TIMEOUT_S = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client_config_path() -> Path:
    if os.environ.get(CLIENT_CONFIG_ENV):
        return Path(os.environ[CLIENT_CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunefarm" / "client.yaml"


def _client_config() -> dict:
    path = client_config_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TunefarmError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - {"farm", "token"}:
        raise TunefarmError(f"{path}: expected a mapping with 'farm' and/or 'token'")
    if data.get("token") and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TunefarmError(f"{path} holds a token but others can read it; run: chmod 600 {path}")
    return data


def normalize_farm_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise TunefarmError("the farm URL is empty; expected e.g. http://farm-host:9180")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise TunefarmError(f"bad farm URL {url!r}; expected http://HOST:PORT")
    return url


def configured_farm() -> str | None:
    """The farm URL from the environment or the client config file, if any."""
    return os.environ.get(FARM_ENV) or _client_config().get("farm")


def farm_settings(farm: str | None = None, token: str | None = None) -> tuple[str, str]:
    """(farm URL, token) from the command line, the environment or the client config file."""
    config = {}
    if not (farm or os.environ.get(FARM_ENV)) or not (token or os.environ.get(TOKEN_ENV)):
        config = _client_config()
    url = farm or os.environ.get(FARM_ENV) or config.get("farm")
    if not url:
        raise TunefarmError(f"which farm? give --farm URL, set {FARM_ENV}, or put 'farm: URL' in "
                            f"{client_config_path()}")
    tok = token or os.environ.get(TOKEN_ENV) or config.get("token")
    if not tok:
        raise TunefarmError(f"no token for the farm: set {TOKEN_ENV} or put 'token: ...' in {client_config_path()} "
                            "(the host prints it on its first start and keeps it in logs/farm/token)")
    return normalize_farm_url(str(url)), str(tok).strip()


class FarmUnreachable(TunefarmError):
    """The farm did not answer (down, restarting, wrong address)."""


class FarmHTTP:
    """One farm's HTTP API: its URL and token; refusals and failures as one-line errors."""

    def __init__(self, url: str, token: str, timeout: tuple[float, float] = TIMEOUT_S):
        import requests  # pylint: disable=import-outside-toplevel

        self.url = url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update(auth_header(token))

    @classmethod
    def from_settings(cls, farm: str | None = None) -> "FarmHTTP":
        return cls(*farm_settings(farm))

    def request(self, method: str, path: str, stream: bool = False, timeout: tuple[float, float] | None = None,
                **kwargs):
        """``timeout``: (connect, read) seconds; the read one bounds the wait for the first byte and every
        pause after it."""
        import requests  # pylint: disable=import-outside-toplevel

        connect, read = timeout or self.timeout
        try:
            resp = self.session.request(method, self.url + path, stream=stream, timeout=(connect, read), **kwargs)
        except requests.ConnectTimeout:  # (also a ConnectionError: caught first)
            raise FarmUnreachable(f"cannot reach the farm at {self.url}: no connection within {connect:g} s") \
                from None
        except requests.Timeout:
            raise FarmUnreachable(f"the farm at {self.url} did not answer within {read:g} s") from None
        except requests.ConnectionError as err:
            reason = str(err.args[0]) if err.args else str(err)
            if "Connection refused" in reason:
                reason = "connection refused"
            elif "timed out" in reason:  # a send that stalled (the farm stopped reading)
                reason = f"it stopped reading the request for {connect:g} s"
            raise FarmUnreachable(f"cannot reach the farm at {self.url}: {reason}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status_code} from {self.url}{path}"
            if resp.status_code == 401:
                message = (f"the farm at {self.url} refused the token (set TUNEFARM_TOKEN to the token in "
                           "logs/farm/token on the host)")
            raise TunefarmError(message)
        return resp

    def get_json(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, body: dict[str, Any] | None = None, **kwargs) -> Any:
        return self.request("POST", path, json=body or {}, **kwargs).json()

    def info(self) -> dict[str, Any]:
        return self.get_json(INFO_PATH)
