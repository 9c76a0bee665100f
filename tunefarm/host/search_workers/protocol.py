"""The search workers' protocol: the RPC functions a worker serves, their bounds, and the checks the host
applies to a worker's answers. This module is the protocol's specification; the share itself is
:class:`tunefarm.core.share.SearchShare`.

The RPC functions (in the worker's session process, which ends with the session, its search with it):

* ``tunefarm.search.start(share_json)``: the share (``SearchShare.to_json()``: tasks as ``tvm.ir.save_json``
  text, each with its trials left and the job's best records so far, the target, the job's
  search/builder/runner settings, the tracker and device key, the seed); starts the search in a thread;
* ``tunefarm.search.poll(since)``: JSON ``{records, next, done, error, unstarted, per_agent, failures,
  build_failures, requeued, unreachable, verification, setup_s, profile}``, the records measured from
  ``since`` on (at most :data:`MAX_POLL_RECORDS` per call), each ``{task, record, error}`` with ``task`` a
  position in the share's task list and ``record`` MetaSchedule's JSON of a TuningRecord;
* ``tunefarm.search.stop()``: no new candidates (the job's deadline or stop hook);
* ``tunefarm.search.release(count)``: JSON ``{released, trials}``: the share gives up at most ``count`` of its
  tasks whose search has not begun (the last ones in its order) and the trials they take with them (their even
  part of the share's trials left): the host hands them to a search worker whose own share has ended (work
  stealing, driver.py), so that one slow share does not hold the run while other workers idle.

A worker's reply is the network's word: the host bounds its size (:func:`check_reply`,
:func:`check_release`), takes only records of the tasks it sent (the workload is the host's own module, never
the worker's), replays every trace on the task's module before committing it, keeps run times finite and
positive, and counts no more records than the share's trials (driver.py).
"""
from __future__ import annotations

import json
import math
from typing import Any

from tunefarm.core.share import MAX_SHARE_TASKS, SEED_RECORDS  # noqa: F401  # part of the protocol

START_FUNC = "tunefarm.search.start"
POLL_FUNC = "tunefarm.search.poll"
STOP_FUNC = "tunefarm.search.stop"
RELEASE_FUNC = "tunefarm.search.release"
MAX_SHARE_BYTES = 256 << 20  # a share: its tasks' modules and best records
MAX_REPLY_BYTES = 64 << 20  # one poll's answer
MAX_POLL_RECORDS = 256
# the runner's and the builder's words for a failed candidate (runner.FAILURE_KINDS, and the builder's "no agent")
FAILURE_KINDS = ("timeout", "error", "no agent", "not measured", "session lost")
MAX_RUN_SECS = 1024  # samples in one record
MAX_PROFILE_SCOPES = 64  # MetaSchedule profiler scopes a share reports (about 20 in a CPU tuning loop)
FAILED_RUN_S = 1e10  # what MetaSchedule commits for a failed candidate


class WorkerLied(ValueError):
    """A search worker's answer that is not what the protocol allows."""


def check_reply(text: Any, since: int) -> dict[str, Any]:
    """A worker's poll answer, shape-checked (ValueError otherwise): records is a list, next moves forward by
    at most their count, the counters are small dicts of ints."""
    if not isinstance(text, str) or len(text) > MAX_REPLY_BYTES:
        raise WorkerLied("a poll answer must be JSON text of at most 64 MiB")
    try:
        reply = json.loads(text)
    except ValueError:
        raise WorkerLied("a poll answer that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("records"), list):
        raise WorkerLied("a poll answer must be a JSON object with a list of records")
    records = reply["records"]
    nxt = reply.get("next")
    if (len(records) > MAX_POLL_RECORDS or not isinstance(nxt, int) or isinstance(nxt, bool)
            or nxt != since + len(records)):
        raise WorkerLied("a poll answer's record count and position do not add up")
    counts = {}
    for field, what, keys in (("per_agent", "per-agent counts", None), ("failures", "failure counts", FAILURE_KINDS),
                              ("build_failures", "build failure counts", FAILURE_KINDS)):
        value = reply.get(field, {})
        if not (isinstance(value, dict) and len(value) <= 1024
                and all(isinstance(k, str) and len(k) <= 256 and (keys is None or k in keys)
                        and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10 ** 9
                        for k, v in value.items())):
            raise WorkerLied(f"a poll answer's {what} are malformed")
        counts[field] = value
    unstarted = reply.get("unstarted", 0)
    if not isinstance(unstarted, int) or isinstance(unstarted, bool) or not 0 <= unstarted <= MAX_SHARE_TASKS:
        raise WorkerLied("a poll answer's count of tasks not begun is malformed")
    setup_s, profile = reply.get("setup_s"), reply.get("profile", {})
    if setup_s is not None and not _seconds(setup_s):
        raise WorkerLied("a poll answer's setup time is malformed")
    if not (isinstance(profile, dict) and len(profile) <= MAX_PROFILE_SCOPES
            and all(isinstance(k, str) and 0 < len(k) <= 100 and k.isprintable() and _seconds(v)
                    for k, v in profile.items())):
        raise WorkerLied("a poll answer's profile is malformed")
    return {"records": records, "next": nxt, "done": reply.get("done") is True, "unstarted": unstarted,
            "error": clean(str(reply.get("error") or ""))[:500], "setup_s": setup_s,
            "profile": {k: float(v) for k, v in profile.items()}, **counts}


def _seconds(value: Any) -> bool:
    """A time a worker reports: a finite number of seconds, not negative, under a week."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value < 7 * 86400)


def check_release(text: Any, tasks: int, gone: set[int], count: int, trials_left: int) -> tuple[list[int], int]:
    """A worker's answer to ``release(count)`` (WorkerLied otherwise): at most ``count`` distinct positions of
    the session's ``tasks`` not released before (``gone``), and the trials they take, at most the share's
    ``trials_left`` (none without a task)."""
    if not isinstance(text, str) or len(text) > 1 << 20:
        raise WorkerLied("a release answer must be JSON text of at most 1 MiB")
    try:
        reply = json.loads(text)
    except ValueError:
        raise WorkerLied("a release answer that is not JSON") from None
    released, trials = (reply.get("released"), reply.get("trials")) if isinstance(reply, dict) else (None, None)
    if (not isinstance(released, list) or len(released) > count
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < tasks and p not in gone
                       for p in released) or len(set(released)) != len(released)):
        raise WorkerLied("a release answer's tasks are not tasks of its share it still had")
    if (not isinstance(trials, int) or isinstance(trials, bool) or not 0 <= trials <= trials_left
            or (trials and not released)):
        raise WorkerLied("a release answer's trials are more than its share has left")
    return released, trials


def clean(text: str) -> str:
    """An id a worker or agent reported (its own word): printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
