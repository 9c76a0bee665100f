"""How the farm's runner measures a candidate over an open RPC session: its transport steps, each a function.

As MetaSchedule's ``runner/rpc_runner.py`` keeps its steps (``default_upload_module``, ``default_alloc_argument``,
``default_run_evaluator``) apart from the runner that schedules them, these are the farm's: one candidate in one
RPC call to a tunefarm agent (``tunefarm.measure.candidate``: the artifact's bytes, its arguments and the
evaluator settings; measured on the agent by stock MetaSchedule's local functions), several in one call over a
slow link (``tunefarm.measure.batch``, :func:`chunk_size` says how many), and stock's own steps on a server that
is not a tunefarm agent. runner.py schedules them over the agents; sessions.py keeps sessions between batches.
"""
from __future__ import annotations

import concurrent.futures
import json


class Candidate:
    """One candidate of a batch: what to measure, and the future its result goes to."""

    __slots__ = ("artifact_path", "device_type", "args_info", "remote_name", "future", "started", "worker",
                 "attempts", "remeasured", "allowance")

    def __init__(self, artifact_path: str, device_type: str, args_info: tuple, remote_name: str):
        self.artifact_path = artifact_path
        self.device_type = device_type
        self.args_info = args_info
        self.remote_name = remote_name
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.started: float | None = None
        self.worker: int | None = None
        self.attempts = 0  # sessions it was started on
        self.remeasured = False  # handed back to the queue once: its first session died under it
        self.allowance = 0.0  # seconds from ``started`` to its deadline (later places of a chunk get more)

    def settle(self, value=None, error: BaseException | None = None) -> bool:
        """Set the result once; False when it was already settled (e.g. timed out meanwhile)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)
            return True
        except concurrent.futures.InvalidStateError:
            return False


def agent_measure_func(session):
    """The agent's one-round-trip measuring function (tunefarm.measure.candidate), or None (a stock server)."""
    from tunefarm.core.wire import MEASURE_FUNC  # pylint: disable=import-outside-toplevel

    try:
        return session.get_function(MEASURE_FUNC)
    except Exception:  # pylint: disable=broad-except
        return None


def agent_measure_batch(session):
    """The agent's several-candidates-per-round-trip function (tunefarm.measure.batch), or None."""
    from tunefarm.core.wire import MEASURE_BATCH_FUNC  # pylint: disable=import-outside-toplevel

    try:
        return session.get_function(MEASURE_BATCH_FUNC)
    except Exception:  # pylint: disable=broad-except
        return None


def evaluator_json(evaluator_config) -> str:
    return json.dumps({"number": evaluator_config.number, "repeat": evaluator_config.repeat,
                       "min_repeat_ms": evaluator_config.min_repeat_ms,
                       "enable_cpu_cache_flush": evaluator_config.enable_cpu_cache_flush})


class CandidateNotRun(Exception):
    """The agent did not measure this candidate of a chunk (an earlier one failed): measure it again."""


def measure_chunk(measure_batch, cands: list[Candidate], evaluator_config) -> list:
    """Several candidates in one RPC call: per candidate, its costs or the exception to settle it with
    (:class:`CandidateNotRun` for the ones the agent skipped after a failure)."""
    from tunefarm.core.wire import MEASURE_NOT_RUN as NOT_RUN  # pylint: disable=import-outside-toplevel

    blobs, header = [], []
    for cand in cands:
        with open(cand.artifact_path, "rb") as fh:
            blob = fh.read()
        blobs.append(blob)
        header.append({"name": cand.remote_name, "size": len(blob), "args_info": list(cand.args_info),
                       "device_type": cand.device_type})
    answer = json.loads(str(measure_batch(bytearray(b"".join(blobs)), json.dumps(header),
                                          evaluator_json(evaluator_config))))
    if not isinstance(answer, list) or len(answer) != len(cands):
        raise RuntimeError(f"the agent answered {type(answer).__name__} for a chunk of {len(cands)} candidates")
    out: list = []
    for item in answer:
        if isinstance(item, dict) and isinstance(item.get("costs"), list):
            out.append([float(c) for c in item["costs"]])
        elif isinstance(item, dict) and item.get("error") == NOT_RUN:
            out.append(CandidateNotRun(NOT_RUN))
        else:
            error = item.get("error") if isinstance(item, dict) else None
            out.append(RuntimeError(str(error)[-2000:] if error else f"malformed answer {str(item)[:80]!r}"))
    return out


# A chunk pays one network round trip for all its candidates: it holds as many as keep that round trip under
# this share of their measuring time (1 where the round trip is negligible, as on a LAN: one at a time keeps
# the load spread over the agents and the fault handling per candidate).
CHUNK_RTT_SHARE = 0.05
MAX_CHUNK = 16


def chunk_size(rtt_s: float, per_candidate_s: float | None, queued: int, workers: int) -> int:
    """How many candidates a worker sends in its next call: enough that ``rtt_s`` is at most
    :data:`CHUNK_RTT_SHARE` of their measuring time (``per_candidate_s``, unknown before the first one), never
    more than :data:`MAX_CHUNK` nor than its share of the ``queued`` candidates among ``workers``."""
    if not per_candidate_s or per_candidate_s <= 0 or rtt_s <= 0:
        return 1
    want = -(-rtt_s // (CHUNK_RTT_SHARE * per_candidate_s))
    share = -(-queued // max(1, workers))
    return int(max(1, min(want, MAX_CHUNK, share)))


def measure_on(session, device, cand: Candidate, evaluator_config, alloc_repeat: int,
               agent_measure=None) -> list[float]:
    """One candidate on an open session. With ``agent_measure`` (a tunefarm agent): one RPC call carrying the
    artifact, measured on the agent with stock MetaSchedule's local alloc/evaluator functions
    (device_agents/measure_service.py); else stock RPCRunner's own upload/alloc/run functions."""
    if agent_measure is not None and alloc_repeat == 1:
        with open(cand.artifact_path, "rb") as fh:
            blob = fh.read()
        out = agent_measure(bytearray(blob), cand.remote_name,
                            json.dumps(list(cand.args_info)), evaluator_json(evaluator_config), cand.device_type)
        return [float(c) for c in json.loads(str(out))]
    from tvm.s_tir.meta_schedule.runner import rpc_runner as stock  # pylint: disable=import-outside-toplevel

    remote = cand.remote_name
    try:
        rt_mod = stock.default_upload_module(session, cand.artifact_path, remote)
        args = stock.default_alloc_argument(session, device, cand.args_info, alloc_repeat)
        return [float(c) for c in stock.default_run_evaluator(session, rt_mod, device, evaluator_config, args)]
    finally:
        # Stock cleanup also removes the session's work dir (remove("")), which a reused session
        # still needs: remove this candidate's files only (the whole dir goes when the session ends).
        for path in (remote, remote + ".so"):
            try:
                session.remove(path)
            except Exception:  # pylint: disable=broad-except
                pass


def suffix(path: str) -> str:
    """The artifact's extension (.tar, .so): the agent's load_module picks its loader by it."""
    name = path.rsplit("/", 1)[-1]
    return "." + name.split(".", 1)[1] if "." in name else ""
