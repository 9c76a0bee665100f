"""The host service's HTTP side: tornado handlers for the API (token required) and the dashboard's pages."""
from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import tornado.escape
import tornado.httputil
import tornado.iostream
import tornado.web

from tunefarm.core.errors import TunefarmError
from tunefarm.core.farm import HEARTBEAT_S
from tunefarm.core.wire import DeviceInfo, parse_hostport
from tunefarm.host.service.auth import LOGIN_PAGE, SESSION_COOKIE, safe_next, token_ok
from tunefarm.host.service.errors import ApiError
from tunefarm.host.service.jobs import Upload, parse_submission, upload_too_big
from tunefarm.host.service.log import log
from tunefarm.host.service.store import FINAL_STATES

STATIC_DIR = Path(__file__).parent / "static"
FOLLOW_POLL_S = 0.5
FOLLOW_PING_S = 10.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.5, 60.0  # a heartbeat's announced interval
MAX_TRACKER_TEXT = 256  # the tracker address a heartbeat reports


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Log changes and refusals only (the dashboard polls): method, path, status. Never headers (the token)."""
    status = handler.get_status()
    request = handler.request
    if request.path == "/api/devices/heartbeat" and status < 400:
        return
    if request.method == "GET" and status < 400:
        return
    log(f"{status} {request.method} {request.path} from {request.remote_ip} "
         f"({1000.0 * request.request_time():.0f} ms)")




class BaseHandler(tornado.web.RequestHandler):
    @property
    def service(self):  # the FarmService (app.py)
        return self.settings["service"]

    def bearer(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def has_session(self) -> bool:
        return self.get_signed_cookie(SESSION_COOKIE, max_age_days=30) == b"dashboard"


# The largest body a request may carry, per endpoint: JSON calls and heartbeats are small; only a job
# submission carries a model file (JobsHandler: the upload limit). Every API handler streams its body
# (tornado.web.stream_request_body), so prepare() runs before any of it is read: a body over the limit is
# refused (413) from its Content-Length, or (sent chunked) the connection is closed once it passes it,
# and nothing past the limit is kept in memory.
SMALL_BODY = 64 * 1024
FORM_OVERHEAD = 1 << 20  # a submission: the job's YAML and the multipart framing, besides the model


@tornado.web.stream_request_body
class ApiHandler(BaseHandler):
    """JSON in, JSON out; every call needs the token (a dashboard session may read, never change)."""

    def body_limit(self) -> int:
        """How many bytes this request's body may have."""
        return SMALL_BODY

    def too_big(self, size: int) -> str:
        return f"the request body ({size} bytes) is over this endpoint's limit of {self.body_limit()} bytes"

    refusal: ApiError | None = None  # a 401 that prepare() leaves for the method to raise (keep-alive)

    def prepare(self):
        self.chunks: list[bytes] = []
        self.received = 0
        limit = self.body_limit()
        self.request.connection.set_max_body_size(limit)
        ok = token_ok(self.service.token, self.bearer(), peer=self.request.remote_ip)
        if not ok and self.request.method == "GET" and not self.request.headers.get("Authorization"):
            ok = self.has_session()
        if not ok:
            refusal = ApiError(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (the farm's token "
                                    "is in logs/farm/token on the host; clients read TUNEFARM_TOKEN)")
            if not self._small_body():
                raise refusal  # answered at once; the connection closes rather than read a stranger's upload
            # Answered once the (small or empty) body is read: an answer sent during prepare() makes tornado
            # close the connection, and a 401 must not end a client's keep-alive connection.
            self.refusal = refusal
            self.request.connection.set_max_body_size(SMALL_BODY)
            return
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, self.too_big(int(length)))

    def _small_body(self) -> bool:
        """Whether the request says it carries at most SMALL_BODY bytes (none, or a Content-Length)."""
        if self.request.headers.get("Transfer-Encoding"):
            return False
        length = self.request.headers.get("Content-Length", "0")
        return length.isdigit() and int(length) <= SMALL_BODY

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.refusal is None and self.received <= self.body_limit():
            self.chunks.append(chunk)

    def __init_subclass__(cls, **kwargs):
        """Every HTTP method of an API handler answers a refusal that prepare() deferred, before it runs."""
        super().__init_subclass__(**kwargs)
        for name in ("get", "post", "put", "patch", "delete"):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_refusal_first", False):
                setattr(cls, name, _refusal_first(method))

    def body(self) -> bytes:
        """The request's body (at most body_limit() bytes: a 413 otherwise)."""
        if self.received > self.body_limit():
            raise ApiError(413, self.too_big(self.received))
        body, self.chunks = b"".join(self.chunks), []
        return body

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs) -> None:
        err = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(err, ApiError):
            message = err.message
        elif isinstance(err, tornado.web.HTTPError):
            message = err.log_message or self._reason
        else:
            message = f"internal error: {type(err).__name__}: {err}" if err else self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message, "status": status_code}))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ApiError):
            return  # answered as JSON and logged by _log_request without the details
        super().log_exception(typ, value, tb)

    def job_or_404(self, job_id: str) -> dict[str, Any]:
        job = self.service.store.job(job_id)
        if job is None:
            raise ApiError(404, f"no job '{job_id}' on this farm (tunefarm jobs lists them)")
        return job

    def json_body(self) -> dict[str, Any]:
        body = self.body()
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "the request body is not JSON") from None
        except RecursionError:
            raise ApiError(400, "the request body is JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data


def _refusal_first(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.refusal is not None:
            raise self.refusal
        return method(self, *args, **kwargs)

    run._refusal_first = True
    return run


class NotFoundHandler(ApiHandler):
    def prepare(self):
        raise ApiError(404, f"no such page or API endpoint: {self.request.path}")


class InfoHandler(ApiHandler):
    def get(self):
        svc = self.service
        host, port = parse_hostport(svc.tracker.addr)
        if not svc.config.tracker and svc.config.tracker_bind in ("0.0.0.0", "::", ""):
            host = self.request.host_name  # as this caller reaches the host
        from tunefarm import __version__  # pylint: disable=import-outside-toplevel

        self.write_json({"service": "tunefarm", "version": __version__, "tracker": f"{host}:{port}",
                         "max_upload_bytes": int(svc.config.max_upload_mb * 1024 * 1024),
                         "heartbeat_s": HEARTBEAT_S, "offline_after_s": svc.config.device_offline_after_s})


class DevicesHandler(ApiHandler):
    async def get(self):
        svc = self.service
        loop = asyncio.get_running_loop()
        try:
            view, error = await loop.run_in_executor(svc.io_pool, svc.tracker.devices), None
        except TunefarmError as err:
            view, error = None, str(err)
        self.write_json(svc.views.devices_view(view, error))


class HeartbeatHandler(ApiHandler):
    async def post(self):
        svc = self.service
        body = self.json_body()
        info = body.get("info")
        if not isinstance(info, dict) or not info.get("agent_id") or not info.get("key"):
            raise ApiError(400, "a heartbeat carries 'info': the agent's DeviceInfo with agent_id and key")
        try:
            device = DeviceInfo.from_json(info)  # types, sizes and nesting, as the tracker checks them
        except ValueError as err:
            wrong = [name for name, value in info.items() if not _valid_field(name, value)]
            raise ApiError(400, f"heartbeat: DeviceInfo field(s) of the wrong type: {', '.join(wrong)} ({err})") \
                from None
        interval = body.get("interval_s", HEARTBEAT_S)
        if (not isinstance(interval, (int, float)) or isinstance(interval, bool) or not math.isfinite(interval)
                or not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S):
            # a device's offline window is 3 intervals: 'inf' would keep a device online forever
            raise ApiError(400, f"interval_s must be a number of seconds from {MIN_INTERVAL_S:g} to "
                                f"{MAX_INTERVAL_S:g}")
        tracker = body.get("tracker", "")
        if not isinstance(tracker, str) or len(tracker) > MAX_TRACKER_TEXT:
            raise ApiError(400, f"tracker must be a HOST:PORT string of at most {MAX_TRACKER_TEXT} characters")
        flags = {}
        for name in ("listed", "busy", "stopping"):  # bool("false") is True: JSON true or false, nothing else
            value = body.get(name, False)
            if not isinstance(value, bool):
                raise ApiError(400, f"heartbeat: {name} must be true or false (got {json.dumps(value)[:40]})")
            flags[name] = value
        stopping = flags["stopping"]
        if stopping and device.agent_id in await self.tracker_agent_ids():
            # Anyone with the token can send a heartbeat in any agent's name. An agent that stops cleanly
            # stops its RPC server first (it leaves the tracker), then says goodbye; a goodbye for an agent
            # the tracker still lists is someone else's, and taking the live agent offline would refuse
            # submissions for its key. (Binding an agent id to the first reporter's address would not help
            # on one machine or behind NAT, where every reporter has the same address.)
            raise ApiError(409, f"heartbeat: agent {device.agent_id} is still registered with the tracker; a "
                                "stopping heartbeat counts only once its server has left the tracker")
        svc.store.heartbeat(device.agent_id, device.key, device.to_json(), tracker, flags["listed"],
                            flags["busy"], float(interval), stopping)
        self.write_json({"ok": True, "heartbeat_s": HEARTBEAT_S})

    async def tracker_agent_ids(self) -> set[str]:
        """The agent ids the tracker lists now (none if it does not answer: then no agent can take jobs)."""
        svc = self.service
        try:
            view = await asyncio.get_running_loop().run_in_executor(svc.io_pool, svc.tracker.devices)
        except TunefarmError:
            return set()
        return {agent.agent_id for item in view for agent in item["agents"] if isinstance(agent, DeviceInfo)}


def _valid_field(name: str, value: Any) -> bool:
    try:
        DeviceInfo.from_json({"key": "k", name: value})  # one field at a time; the key is required
        return True
    except ValueError:
        return False


class JobsHandler(ApiHandler):
    """GET: every job. POST (multipart: ``job`` = the YAML text, optional file ``model``, ``skip_eval``): submit."""

    def body_limit(self) -> int:
        if self.request.method == "POST":  # the limit is for the model; 1 MiB for the form
            return self.service.jobs.upload_limit + FORM_OVERHEAD
        return super().body_limit()

    def too_big(self, size: int) -> str:
        return upload_too_big(size, self.service.jobs.upload_limit)

    def get(self):
        svc = self.service
        self.write_json({"jobs": [svc.views.public_job(j) for j in svc.store.jobs()]})

    async def post(self):
        svc = self.service
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        try:
            tornado.httputil.parse_body_arguments(self.request.headers.get("Content-Type", ""), self.body(),
                                                  args, files, self.request.headers)
        except tornado.httputil.HTTPInputError as err:
            raise ApiError(400, f"the request body is not a valid form: {err}") from None
        if not args.get("job"):
            raise ApiError(400, "no job: send the job file's YAML as the form field 'job' (multipart/form-data)")
        try:
            text = args["job"][0].decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the job file is not UTF-8 text") from None
        job = parse_submission(text)
        model = (files.get("model") or [None])[0]
        upload = Upload(model.filename or "", model.body) if model is not None else None
        skip_eval = (args.get("skip_eval") or [b"0"])[0] in (b"1", b"true", b"yes")
        record = await svc.jobs.submit(job, upload, skip_eval, svc.online_devices)
        svc.jobs.schedule()
        self.write_json(svc.views.public_job(svc.store.job(record["id"]), detail=True), status=201)


class JobHandler(ApiHandler):
    def get(self, job_id):
        self.write_json(self.service.views.public_job(self.job_or_404(job_id), detail=True))

    def delete(self, job_id):
        self.job_or_404(job_id)
        removed = self.service.jobs.delete(job_id)
        self.service.views.forget(job_id)
        self.write_json({"deleted": job_id, "removed": removed})


class JobActionHandler(ApiHandler):
    def post(self, job_id, action):
        self.job_or_404(job_id)
        svc = self.service
        if action == "cancel":
            job = svc.jobs.cancel(job_id)
        else:
            trials = self.json_body().get("trials")
            if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
                raise ApiError(400, "trials must be a positive integer")
            job = svc.jobs.resume(job_id, trials)
            svc.jobs.schedule()
            job = svc.store.job(job_id)
        log(f"job {job_id}: {action} -> {job['state']}")
        self.write_json(svc.views.public_job(job, detail=True))


class ProgressHandler(ApiHandler):
    """NDJSON: one ``{"type": "progress", ...}`` line per measured batch, ``{"type": "state", "job": ...}`` on
    changes. With ``follow=1`` the response stays open and streams new lines until the job is final."""

    async def get(self, job_id):
        self.job_or_404(job_id)
        try:
            line = int(self.get_argument("from", "0"))
        except ValueError:
            line = -1
        if line < 0:
            raise ApiError(400, "'from' must be a line number (0 or more)")
        follow = self.get_argument("follow", "0") in ("1", "true")
        svc = self.service
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-store")
        last_state = None
        last_write = time.monotonic()
        was_final = False
        while True:
            events = svc.views.events(job_id, line)
            wrote = bool(events)
            for event in events:
                self.write(json.dumps({"type": "progress", **event}) + "\n")
                line = event["n"] + 1
            job = svc.store.job(job_id)
            state = (job["state"], job["attempts"], job["error"], job["cancel_requested"])
            if state != last_state:
                self.write(json.dumps({"type": "state", "job": svc.views.public_job(job)}) + "\n")
                last_state, wrote = state, True
            if wrote:
                last_write = time.monotonic()
            elif time.monotonic() - last_write > FOLLOW_PING_S:
                self.write(json.dumps({"type": "ping", "time": time.time()}) + "\n")
                last_write = time.monotonic()
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                return
            # Final, and nothing new since it was final: the worker has exited, its lines are all out.
            if not follow or svc.jobs.stopping or (was_final and not events):
                break
            was_final = job["state"] in FINAL_STATES
            await asyncio.sleep(0 if was_final else FOLLOW_POLL_S)
        self.finish()


class TasksHandler(ApiHandler):
    async def get(self, job_id):
        self.job_or_404(job_id)
        svc = self.service
        try:
            rows = await asyncio.get_running_loop().run_in_executor(svc.tvm_pool, svc.views.task_table, job_id)
        except Exception as err:  # pylint: disable=broad-except
            # e.g. a database read while the worker writes its last line: the next poll succeeds
            raise ApiError(503, f"the task table is not readable right now: {str(err).splitlines()[-1]}") from None
        self.write_json({"tasks": rows})


class FileHandler(ApiHandler):
    def get(self, job_id, name):
        self.job_or_404(job_id)
        path = self.service.views.file_path(job_id, name)
        data = self.service.views.read_file(job_id, name)
        if path is None or data is None:
            raise ApiError(404, f"job {job_id} has no file '{name}' (available: "
                                f"{', '.join(self.service.views.job_files(job_id)) or 'none yet'})")
        kinds = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".png": "image/png",
                 ".svg": "image/svg+xml", ".jsonl": "application/x-ndjson", ".log": "text/plain; charset=utf-8",
                 ".yaml": "text/plain; charset=utf-8"}
        self.set_header("Content-Type", kinds.get(path.suffix, "application/octet-stream"))
        if self.get_argument("download", "0") == "1":
            self.set_header("Content-Disposition", f'attachment; filename="{job_id}-{name}"')
        self.finish(data)


class BundleHandler(ApiHandler):
    async def get(self, job_id):
        self.job_or_404(job_id)
        svc = self.service
        try:
            archive = await asyncio.get_running_loop().run_in_executor(svc.tvm_pool, svc.views.build_bundle, job_id)
        except TunefarmError as err:
            raise ApiError(409, str(err)) from None
        try:
            self.set_header("Content-Type", "application/gzip")
            self.set_header("Content-Disposition", f'attachment; filename="{job_id}.tar.gz"')
            with open(archive, "rb") as fh:
                while True:
                    chunk = fh.read(1 << 20)
                    if not chunk:
                        break
                    self.write(chunk)
                    await self.flush()
            self.finish()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            archive.unlink(missing_ok=True)


class PageHandler(BaseHandler):
    def initialize(self, page: str):
        self.page = page

    def get(self, *_args):
        if not self.has_session():
            self.redirect("/login?next=" + tornado.escape.url_escape(self.request.path))
            return
        self.set_header("Cache-Control", "no-store")
        self.finish((STATIC_DIR / self.page).read_bytes())


class LoginHandler(BaseHandler):
    def get(self):
        next_page = tornado.escape.xhtml_escape(safe_next(self.get_argument("next", "/")))
        self.finish(LOGIN_PAGE.format(message="", next=next_page))

    def post(self):
        next_page = safe_next(self.get_argument("next", "/"))
        if not token_ok(self.service.token, self.get_argument("token", "").strip(), peer=self.request.remote_ip):
            self.set_status(401)
            self.finish(LOGIN_PAGE.format(message='<p class="error">Wrong token.</p>',
                                           next=tornado.escape.xhtml_escape(next_page)))
            return
        self.set_signed_cookie(SESSION_COOKIE, "dashboard", expires_days=30, httponly=True, samesite="Strict")
        self.redirect(next_page)


class LogoutHandler(BaseHandler):
    def get(self):
        self.clear_cookie(SESSION_COOKIE)
        self.redirect("/login")


