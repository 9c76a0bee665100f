"""The RPC server process an agent supervises: stock ``tvm.rpc`` server code, run in-process.

``python -m tunefarm.device_agents.rpc_server --tracker H:P --key K --host H --port P --info-json '{...}'``

It runs TVM's own listen loop (``PopenRPCServerState``) in this process and adds these things:

* its tracker registration (``UPDATE_INFO``) carries the agent's ``DeviceInfo`` under ``INFO_FIELD``,
  which the stock tracker stores and returns in SUMMARY;
* the global functions ``tunefarm.agent.info``, ``tunefarm.agent.id`` and ``tunefarm.agent.target``
  (JSON strings), and ``tunefarm.runner.run`` / ``tunefarm.runner.available`` (the model runners of
  :mod:`tunefarm.device_agents.runners`), which RPC clients can call in a session (sessions are forked
  from this process, so they inherit them);
* a hardened accept step (:mod:`tunefarm.device_agents.rpc_accept`): handshakes are read concurrently, each
  within a deadline and with every length bounded, and a malformed one is refused with a log line instead of
  ending the listen loop (anyone who reaches the port could block or crash the stock one);
* an exit: when the listen loop ends (the tracker stayed away for about 60 s, or a session crashed),
  this process exits non-zero so that the agent restarts it; and when the agent dies, this process
  and its sessions die too, rather than staying registered as an orphan.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time

from tunefarm.core.wire import AGENT_ID_FUNC, AGENT_INFO_FUNC, AGENT_TARGET_FUNC, INFO_FIELD, no_delay, parse_hostport
from tunefarm.device_agents import rpc_accept

EXIT_LOOP_ENDED = 3
REFUSED_RETRY_S = 10.0  # a tracker that refused the farm key is asked again this often
TRACKER_RETRY_S = 1.0  # a tracker that is down (connection refused) is dialled again this often (stock: 5 s)
EXIT_PARENT_GONE = 4

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_MAIN_PID = os.getpid()
_loop_error: list[str] = []
_stopping = threading.Event()
_listen_sock: list = []  # the listen loop's socket, closed first when this process stops


_NAME = " ".join(("rpc server", os.environ.get("TUNEFARM_AGENT_TAG", ""))).strip()  # 'gpu<i>' under --gpus


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_NAME}: {message}", flush=True)


def _publish_info(info: dict, farm_key: bytes) -> None:
    """Prove the farm key, then add ``INFO_FIELD: info`` to every UPDATE_INFO this process sends to the tracker.

    The stock listen loop calls ``base.sendjson`` through the module at each call, so replacing it
    here changes only this process (and the sessions forked from it, which never talk to the tracker).
    UPDATE_INFO is the first message of every (re)connection to the tracker, before the server's PUT:
    the farm's tracker admits the PUT only from a connection that answered its challenge
    (:mod:`tunefarm.core.credential`).
    """
    from tvm.rpc import base  # pylint: disable=import-outside-toplevel

    from tunefarm.core.credential import authenticate  # pylint: disable=import-outside-toplevel
    from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel

    def send(sock, data):
        # The stock framing (int32 length + JSON) in one write, not two: a second small write waits
        # for the tracker's delayed ACK (~40 ms), which delayed every re-registration after a session.
        body = json.dumps(data).encode("utf-8")
        sock.sendall(struct.pack("<i", len(body)) + body)

    refused = []

    def sendjson(sock, data):
        if (isinstance(data, (list, tuple)) and len(data) == 2 and data[0] == base.TrackerCode.UPDATE_INFO
                and isinstance(data[1], dict)):
            try:
                authenticate(sock, farm_key, "agent", send, base.recvjson)
            except TunefarmError as err:
                if not refused:
                    _log(f"registration refused: {err}; retrying every {REFUSED_RETRY_S:g} s")
                refused.append(1)
                time.sleep(REFUSED_RETRY_S)  # the stock loop reconnects at once after an OSError
                raise OSError(str(err)) from None
            if refused:
                _log("the tracker accepted this agent's farm key")
                refused.clear()
            data = [data[0], {**data[1], INFO_FIELD: info}]
        send(sock, data)

    base.sendjson = sendjson


def _retry_the_tracker_sooner() -> None:
    """Dial a tracker that refuses connections (down, restarting) every :data:`TRACKER_RETRY_S` seconds.

    The stock listen loop reconnects through ``base.connect_with_retry``, which waits 5 s between tries: an
    agent came back up to 5 s after its restarted tracker answered (11.8 s after a restart of which the
    tracker's own start was 6-8 s). A refused connect costs the tracker nothing. Same contract as the stock
    function otherwise (other errors raised, RuntimeError after ``timeout``: the listen loop ends and the
    agent restarts this process), without its warning at every try (the agent logs the tracker's absence)."""
    from tvm.rpc import base  # pylint: disable=import-outside-toplevel

    def connect_with_retry(addr, timeout=60, retry_period=5):  # pylint: disable=unused-argument
        start = time.time()
        while True:
            sock = socket.socket(base.get_addr_family(addr), socket.SOCK_STREAM)
            try:
                sock.connect(addr)
                return sock
            except OSError as err:
                sock.close()
                if err.args[0] != errno.ECONNREFUSED:
                    raise
                if time.time() - start > timeout:
                    raise RuntimeError(f"Failed to connect to server {addr!s}") from None
                time.sleep(TRACKER_RETRY_S)

    base.connect_with_retry = connect_with_retry


def _log_sessions() -> None:
    """A stdout line when a session starts and ends (the stock server logs only to stderr)."""
    from tvm.rpc import server  # pylint: disable=import-outside-toplevel

    original = server._serving  # pylint: disable=protected-access

    def serving(sock, addr, opts, load_library):
        start = time.monotonic()
        timeout = opts.get("timeout")
        _log(f"session from {addr[0]}:{addr[1]} started" + (f" (timeout {timeout:g} s)" if timeout else ""))
        try:
            original(sock, addr, opts, load_library)
        except BaseException as err:
            _log(f"session from {addr[0]}:{addr[1]} failed after {time.monotonic() - start:.1f} s: {err}")
            raise
        _log(f"session from {addr[0]}:{addr[1]} ended after {time.monotonic() - start:.1f} s")

    server._serving = serving  # pylint: disable=protected-access


def _register_globals(info: dict) -> None:
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    info_text = json.dumps(info, sort_keys=True)
    agent_id = str(info.get("agent_id", ""))
    tvm_ffi.register_global_func(AGENT_INFO_FUNC, lambda: info_text, override=True)
    target_text = json.dumps(info.get("target", {}), sort_keys=True)
    tvm_ffi.register_global_func(AGENT_ID_FUNC, lambda: agent_id, override=True)
    tvm_ffi.register_global_func(AGENT_TARGET_FUNC, lambda: target_text, override=True)
    from tunefarm.device_agents.runners import register_rpc_functions  # pylint: disable=import-outside-toplevel

    register_rpc_functions()  # tunefarm.runner.run / .available: TVM, PyTorch, ONNX Runtime, TensorRT runners
    from tunefarm.device_agents import build_service, measure_service  # pylint: disable=import-outside-toplevel

    build_service.register()
    measure_service.register()


SERVE_RE = re.compile(r"^tunefarm(\.[a-z_][a-z0-9_]*)+\Z")


def _register_served(modules: list[str]) -> None:
    """Import each module (a tunefarm module the CLI names, e.g. the host's search worker for ``tunefarm
    search-worker``) and call its ``register()``: its global functions join the agent's own in every session.
    The agent's package does not depend on them; the process that starts the agent chooses them."""
    import importlib  # pylint: disable=import-outside-toplevel

    for name in modules:
        if not SERVE_RE.match(name):
            raise ValueError(f"--serve: not a tunefarm module name: {name!r}")
        importlib.import_module(name).register()


def _die_with_parent(parent_pid: int | None) -> None:
    """Get SIGTERM when the agent dies (Linux), and give up now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # pylint: disable=import-outside-toplevel

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:
        _log(f"agent (pid {parent_pid}) is gone; exiting")
        sys.exit(EXIT_PARENT_GONE)


def _session_dies_with_server() -> None:
    """In each process forked from this one (an RPC session, and what a session forks): SIGKILL when its parent
    dies (Linux), and exit now if the parent is already gone. A session inherits the server's tracker socket:
    one that outlived its server kept the agent listed at the tracker, free to be handed out, for the session's
    whole timeout (issue 36: a killed agent's session, forked in the instant between the stop signal and the exit,
    kept it listed and went on measuring)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # pylint: disable=import-outside-toplevel

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent or parent == 1:
        os._exit(EXIT_PARENT_GONE)  # pylint: disable=protected-access


def _kill_sessions() -> None:
    """End the session processes this server forked (they hold devices and sockets)."""
    try:
        import psutil  # pylint: disable=import-outside-toplevel

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except ImportError:
        pass


def _on_stop_signal(signum, _frame) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked session process inherited this handler: behave as if it had none.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _stopping.is_set():  # the parent-death signal can arrive once per thread
        return
    _stopping.set()
    _log(f"stopping (signal {signum})")
    if _listen_sock:
        try:
            _listen_sock[0].close()  # no session is accepted from now on
        except OSError:
            pass
    _kill_sessions()
    os._exit(0)  # pylint: disable=protected-access  # the listen thread is blocked in select/accept


def _record_loop_error(args) -> None:
    _loop_error.append(f"{args.exc_type.__name__}: {args.exc_value}")
    _log(f"listen loop died: {args.exc_type.__name__}: {args.exc_value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunefarm.device_agents.rpc_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracker", required=True, metavar="HOST:PORT")
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9090, help="first port to try")
    parser.add_argument("--port-end", type=int, default=None, help="end of the port range (default PORT+100)")
    parser.add_argument("--custom-addr", default=None, help="address to advertise to the tracker")
    parser.add_argument("--info-json", default="{}", help="the agent's DeviceInfo as JSON")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the agent) dies")
    parser.add_argument("--serve", action="append", default=[], metavar="MODULE",
                        help="also register MODULE's RPC functions (its register()); repeatable")
    args = parser.parse_args(argv)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_stop_signal)
    _die_with_parent(args.parent_pid)
    info = json.loads(args.info_json)
    tracker_addr = parse_hostport(args.tracker)

    # Sessions are forked from this process, so it must not initialise CUDA. tvm_ffi imports torch when
    # it is installed and calls torch.cuda.is_available(), which does (seen with torch 2.11 + CUDA 13
    # on an H100: every forked session then failed with cudaErrorInitializationError).
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # skip tvm_ffi's torch CUDA hooks
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() via NVML
    from tvm.rpc.server import PopenRPCServerState  # pylint: disable=import-outside-toplevel

    from tunefarm.core.credential import load_farm_key  # pylint: disable=import-outside-toplevel

    _publish_info(info, load_farm_key(create=False))
    _retry_the_tracker_sooner()
    _log_sessions()
    unhardened = rpc_accept.install(_log)  # before PopenRPCServerState starts the listen thread
    if unhardened:
        _log(f"warning: {unhardened}; using TVM's own accept step, which one idle connection blocks")
    _register_globals(info)
    _register_served(args.serve)
    threading.excepthook = _record_loop_error
    port_end = args.port_end or args.port + 100
    try:
        state = PopenRPCServerState(args.host, args.port, port_end, tracker_addr=tracker_addr, key=args.key,
                                    custom_addr=args.custom_addr, silent=False)
    except (OSError, ValueError) as err:
        _log(f"cannot listen on {args.host} ports [{args.port}, {port_end}): {err}")
        return EXIT_LOOP_ENDED
    no_delay(state.sock)  # the handshake's three small writes otherwise wait for a delayed ACK
    state.sock.listen(rpc_accept.MAX_PENDING)  # the stock backlog is 1; handshakes are read concurrently now
    _listen_sock.append(state.sock)
    os.register_at_fork(after_in_child=_session_dies_with_server)
    _log(f"agent {info.get('agent_id', '?')} serving key '{args.key}' on {args.host}:{state.port}, "
         f"registering with tracker {tracker_addr[0]}:{tracker_addr[1]}")
    while state.thread.is_alive():
        state.thread.join(1.0)
        if args.parent_pid and os.getppid() != args.parent_pid:  # no PDEATHSIG off Linux
            _log("the agent is gone; exiting")
            _kill_sessions()
            return EXIT_PARENT_GONE
    _log("listen loop ended" + (f" ({_loop_error[-1]})" if _loop_error else "") + "; exiting for a restart")
    return EXIT_LOOP_ENDED


if __name__ == "__main__":
    sys.exit(main())
