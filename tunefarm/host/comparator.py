"""The Comparator: run one model on several backends of the farm, then check every output against one reference.

As Polygraphy's ``Comparator`` (run every runner first, then compare, with typed results), where the
runners are the agents' (``device_agents.runners``: TVM, PyTorch, ONNX Runtime, TensorRT). Each
:class:`Row` (a backend, a device key, runner options) runs on an agent of its key through one RPC
session of its own: the model file and the inputs are uploaded, ``tunefarm.runner.run`` runs and
times the model there (``core.stats``), the outputs come back. Once every row has run, each row that
ran is compared with the reference (``core.stats.compare_outputs``).

A row that cannot run keeps its place with a status and the reason, never a number:
``no agent`` (none on its key within the wait), ``not available`` (the device cannot run the backend,
or the server on the key is not a tunefarm agent), ``not run`` (the caller could not prepare it: no
tuning logs, no model file for the backend), ``failed`` (it ran and broke).

Every row of one comparison (one :class:`Comparator`) on a key runs on the same agent: the first row's
session pins the key to the agent it got, and later rows ask the tracker for that agent again (the tracker
hands out any free server of a key, so sessions it hands out on the key's other agents are held, busy,
until the pinned one's comes, then closed). A row that cannot run there (the agent left the tracker, was
not free within the wait, could not be reached) runs on another agent of the key with ``agent_note``
saying why, and the pin moves with it; :func:`agents_of_rows` sums this up per key for the reports.

Used by ``tunefarm tune``'s evaluation (``tuning/evaluate.py``), ``tunefarm compare`` (``compare.py``)
and ``bench/gpu_study.py``; they prepare the rows (TVM rows: the build, compiled on the host) and read
the results.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tunefarm.core.errors import AgentUnreachable, NoDeviceError, TunefarmError, last_line
from tunefarm.core.stats import compare_outputs
from tunefarm.core.wire import (AGENT_ID_FUNC, MODEL_FORMAT, RUNNER_AVAILABLE_FUNC, RUNNER_RUN_FUNC, DeviceInfo,
                                runner_name)

OK = "ok"
NOT_AVAILABLE = "not available"
NO_AGENT = "no agent"
NOT_RUN = "not run"
FAILED = "failed"
STATUSES = (OK, NOT_AVAILABLE, NO_AGENT, NOT_RUN, FAILED)
# How reports name a status in front of its reason.
STATUS_TEXT = {NOT_AVAILABLE: "not available on this device", NO_AGENT: "no agent", NOT_RUN: "not run",
               FAILED: "FAILED"}

SESSION_TIMEOUT_S = 1800  # one row's session; a TensorRT engine build can take minutes
INPUTS_FILE = "inputs.npz"  # the inputs' name in a session's work directory
# What an agent's answer holds besides the row's details.
_ANSWER_FIELDS = ("backend", "available", "outputs_file", "latency", "throughput_per_s", "threads", "precision",
                  "version")


@dataclasses.dataclass
class MeasureSettings:
    """How every row is timed (``core.stats``): warm-up runs, timed samples, and the time one row may take."""

    warmup: int = 10
    repeat: int = 50
    budget_s: float = 60.0


@dataclasses.dataclass
class Row:
    """One thing to run: ``backend`` on an agent of ``key``, with the runner's ``options``."""

    backend: str
    key: str
    label: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rtol: float = 1e-3
    atol: float = 1e-3
    model_file: str | None = None  # a prepared build (TVM rows); else the artifacts' file for the runner
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the caller knows (compile time...)
    target: dict[str, Any] | None = None  # TVM rows: the target the build is for

    def __post_init__(self) -> None:
        self.label = self.label or f"{self.backend}@{self.key}"


@dataclasses.dataclass
class RowResult:
    """What became of one row. ``latency`` etc. are set only when ``status`` is ``ok``."""

    label: str
    backend: str
    key: str
    options: dict[str, Any]
    status: str
    reason: str = ""
    where: str = ""  # "agent hostname:pid"
    agent: str = ""  # the agent's id (hostname:pid) where the row reached one
    agent_note: str = ""  # why the row ran on another agent than its comparison's (its key's pinned agent)
    latency: dict[str, Any] | None = None  # core.stats.latency_stats
    threads: int | None = None  # CPU rows: the threads the backend ran with
    precision: str | None = None  # the precision class: fp32, tf32, fp16
    version: str | None = None
    throughput_per_s: float | None = None
    numerics: dict[str, Any] | None = None  # core.stats.compare_outputs, after compare()
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    target: dict[str, Any] | None = None
    wall_s: float | None = None
    rtol: float = 1e-3
    atol: float = 1e-3
    outputs: list[np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}; known: {', '.join(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        """The row as reports keep it: status and reason always; the measurement where the row ran."""
        out: dict[str, Any] = {"label": self.label, "backend": self.backend, "key": self.key,
                               "options": self.options, "status": self.status, "reason": self.reason}
        measured = ("where", "latency", "threads", "precision", "numerics", "throughput_per_s", "details", "version")
        for name in measured + ("agent", "agent_note", "target", "wall_s"):
            value = getattr(self, name)
            if (self.ok and name in measured) or value not in (None, "", {}):
                out[name] = value
        return out


def result(row: Row, status: str, reason: str = "", **fields) -> RowResult:
    """A result for ``row`` that carries no measurement (or the fields given)."""
    fields.setdefault("details", dict(row.details))
    fields.setdefault("target", row.target)
    return RowResult(label=row.label, backend=row.backend, key=row.key, options=row.options, status=status,
                     reason=reason, rtol=row.rtol, atol=row.atol, **fields)


def not_an_agent_reason(key: str) -> str:
    return f"the server on key '{key}' is not a tunefarm agent with runners (a stock tvm.rpc server?)"


def clean_agent_id(value: Any) -> str:
    """An id an agent reported (its own word, hostile until shown otherwise): printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:200]


def result_from_answer(row: Row, answer: dict[str, Any], agent_id: str,
                       outputs: list[np.ndarray] | None, agent_note: str = "") -> RowResult:
    """The result of ``row`` from what the agent's ``tunefarm.runner.run`` answered (no I/O); ``agent_note``:
    why the row ran on this agent and not on its comparison's."""
    on = {"where": f"agent {agent_id}", "agent": agent_id, "agent_note": agent_note}
    if answer.get("available") is False:
        return result(row, NOT_AVAILABLE, str(answer.get("reason", "")), **on)
    if "error" in answer:
        return result(row, FAILED, str(answer["error"]), **on,
                      details={**row.details, "traceback": answer.get("traceback")})
    if outputs is None or "latency" not in answer:
        return result(row, FAILED, f"the agent's answer has no {'outputs' if outputs is None else 'latency'}",
                      **on)
    details = {k: v for k, v in answer.items() if k not in _ANSWER_FIELDS}
    if "pool_spin" in details:
        spin = clean_pool_spin(details.pop("pool_spin"))
        if spin:
            details["pool_spin"] = spin
    return result(row, OK, **on, latency=answer["latency"], threads=answer.get("threads"),
                  precision=answer.get("precision") or str(row.options.get("precision", "fp32")),
                  version=f"{row.backend} {answer.get('version', '')}".strip(),
                  throughput_per_s=answer.get("throughput_per_s"), details={**row.details, **details},
                  outputs=outputs)


def clean_pool_spin(value: Any) -> dict[str, str]:
    """An agent's ``pool_spin`` (how idle TVM and OpenMP threads waited in a row: core.threads.MIXED_POOLS) as the
    report may keep it: the known variables with short decimal values only, anything else dropped."""
    from tunefarm.core.threads import MIXED_POOLS  # pylint: disable=import-outside-toplevel

    if not isinstance(value, dict):
        return {}
    return {name: text for name in MIXED_POOLS if isinstance(text := value.get(name), str)
            and 0 < len(text) <= 12 and text.isascii() and text.isdigit()}


def agents_of_rows(results: list[RowResult]) -> dict[str, dict[str, Any]]:
    """Per key, where a comparison's rows ran: ``{"agents": [ids, first first], "rows": {id: [labels]},
    "same_agent": bool, "why": ["label: why it ran elsewhere", ...]}`` (rows that reached no agent left out)."""
    out: dict[str, dict[str, Any]] = {}
    for res in results:
        if not res.agent:
            continue
        entry = out.setdefault(res.key, {"agents": [], "rows": {}, "same_agent": True, "why": []})
        if res.agent not in entry["agents"]:
            entry["agents"].append(res.agent)
        entry["rows"].setdefault(res.agent, []).append(res.label)
        if res.agent_note:
            entry["why"].append(f"{res.label}: {res.agent_note}")
    for entry in out.values():
        entry["same_agent"] = len(entry["agents"]) == 1
    return out


def agents_text(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One plain sentence per key of :func:`agents_of_rows` (agent text as reported: escape it to print)."""
    lines = []
    for key, entry in summary.items():
        if entry["same_agent"]:
            lines.append(f"every row on key '{key}' ran on agent {entry['agents'][0]}")
            continue
        spread = "; ".join(f"{', '.join(entry['rows'][a])} on agent {a}" for a in entry["agents"])
        why = "; ".join(entry["why"]) or "no reason recorded"
        lines.append(f"rows on key '{key}' ran on {len(entry['agents'])} agents ({spread}) because {why}")
    return lines


def compare_results(results: list[RowResult], reference: list[np.ndarray]) -> list[RowResult]:
    """Set the numerics of every row that ran (its outputs against ``reference``, its own tolerances)."""
    for res in results:
        if res.ok and res.outputs is not None:
            res.numerics = compare_outputs(res.outputs, reference, res.rtol, res.atol, res.precision or "fp32")
    return results


class ModelArtifacts:
    """One model, imported once: its inputs, its reference outputs, and the files runners take (written on
    first use into ``work_dir``)."""

    def __init__(self, model, spec, work_dir: Path, console, reference: list[np.ndarray] | None = None):
        self.model = model
        self.spec = spec
        self.work_dir = Path(work_dir)
        self.console = console
        self.reference = reference if reference is not None else model.reference_outputs()
        self._files: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.model.name

    def model_file(self, fmt: str) -> str:
        """The model as a runner takes it: ``onnx``, or ``torch`` (a torchvision model's name and weights as
        ``.pt``, else a ``torch.export`` program as ``.pt2``; no pickled code either way)."""
        if fmt in self._files:
            return self._files[fmt]
        if fmt == "onnx":
            from tunefarm.host.models import export_onnx  # pylint: disable=import-outside-toplevel

            with self.console.status(f"exporting {self.name} to ONNX"):
                path = export_onnx(self.model, self.work_dir / f"{self.name}.onnx")
        elif fmt == "torch":
            if self.model.kind != "torch":
                raise TunefarmError(f"{self.name} is an ONNX model; PyTorch rows need a PyTorch model")
            import torch  # pylint: disable=import-outside-toplevel

            if self.spec.source == "torchvision":
                path = str(self.work_dir / f"{self.name}.pt")
                torch.save({"torchvision": self.spec.name, "state_dict": self.model.torch_module.state_dict()}, path)
            else:
                with self.console.status(f"exporting {self.name} with torch.export"):
                    example = tuple(torch.from_numpy(x) for x in self.model.inputs)
                    path = str(self.work_dir / f"{self.name}.pt2")
                    torch.export.save(torch.export.export(self.model.torch_module, example), path)
        else:
            raise TunefarmError(f"no {fmt} file for {self.name}: the row must bring its own (a TVM build)")
        self._files[fmt] = str(path)
        return self._files[fmt]

    def inputs_file(self) -> str:
        if "inputs" not in self._files:
            path = self.work_dir / f"{self.name}-inputs.npz"
            np.savez(path, **{f"input{i}": x for i, x in enumerate(self.model.inputs)})
            self._files["inputs"] = str(path)
        return self._files["inputs"]


class FarmAgents:
    """The tracker as the Comparator sees it: the agents of each key (waited for once, boundedly) and
    sessions on them. ``seen`` keeps what the agents of each key reported, for the report."""

    def __init__(self, tracker_addr: tuple[str, int], wait_s: float, console,
                 on_wait: Callable[[str, float, float], Any] | None = None):
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        self.addr = tracker_addr
        self.wait_s = wait_s
        self.console = console
        self.on_wait = on_wait or self._print_wait
        self.client = TrackerClient(*tracker_addr)
        self.client.summary()  # one-line TrackerUnreachable now if the tracker is not there
        self.missing: dict[str, str] = {}
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def _print_wait(self, key: str, waited: float, limit: float) -> None:
        from rich.markup import escape  # pylint: disable=import-outside-toplevel

        self.console.print(f"[yellow]waiting for an agent on key '{escape(key)}': {waited:.0f}/{limit:.0f} s[/]")

    def agents(self, key: str) -> list[DeviceInfo]:
        """DeviceInfo of the tunefarm agents on ``key`` (stock servers: none); NoDeviceError (remembered) if no
        server serves the key in time."""
        if key in self.missing:
            raise NoDeviceError(self.missing[key])
        try:
            self.client.wait_for_key(key, self.wait_s, on_wait=lambda waited, limit: self.on_wait(key, waited, limit))
        except NoDeviceError:
            self.missing[key] = (f"no agent on key '{key}' at {self.addr[0]}:{self.addr[1]} within "
                                 f"{self.wait_s:.0f} s")
            raise NoDeviceError(self.missing[key]) from None
        infos = self.client.agent_infos(key)
        if key not in self.seen:
            self.seen[key] = [{"agent_id": a.agent_id, "hostname": a.hostname, "cpu": a.cpu_model,
                               "cores": a.num_cores, "threads": a.threads, "cuda": [d.get("name") for d in a.cuda],
                               "runners": a.runners, "tvm": a.tvm_version} for a in infos]
        return infos

    def session(self, key: str, session_timeout: int):
        from tunefarm.tracker.client import request_session  # pylint: disable=import-outside-toplevel

        return request_session(self.addr, key, self.wait_s, session_timeout)

    def session_on(self, key: str, session_timeout: int, agent_id: str | None = None) -> tuple[Any, str | None, str]:
        """``(session, its agent's id, note)``: a session on an agent of ``key`` (the id is None for a server
        that is not a tunefarm agent), on ``agent_id`` where given.

        The tracker hands out any free server of a key and cannot be asked for one: the sessions it hands
        out on the key's other agents are held (so the next request goes elsewhere) until ``agent_id``'s
        comes, then closed. Where ``agent_id`` cannot be had (it left the tracker, was not free within the
        wait, could not be reached) the session is on another agent of the key and ``note`` says why; with
        no other agent free either, TunefarmError.
        """
        from tunefarm.tracker.client import request_session  # pylint: disable=import-outside-toplevel

        if agent_id is None:
            sess = self.session(key, session_timeout)
            return sess, session_agent_id(sess), ""
        held: list[tuple[Any, str | None]] = []
        deadline = time.monotonic() + self.wait_s
        why = ""
        try:
            while True:
                listed = self.client.agent_infos(key)
                if agent_id not in {clean_agent_id(a.agent_id) for a in listed} and (
                        listed or not self.client.servers_for_key(key)):
                    why = "is no longer on the tracker"
                    break
                left = deadline - time.monotonic()
                busy = f"was not free within {self.wait_s:.0f} s" + (f" ({why})" if why else "")
                if left <= 0:
                    why = busy
                    break
                try:
                    sess = request_session(self.addr, key, left, session_timeout)
                except AgentUnreachable as err:
                    # that server is not handed out again before its session would have ended: ask on
                    why = f"the tracker handed out an agent this host cannot reach: {err}"
                    continue
                except TunefarmError:
                    why = busy
                    break
                got = session_agent_id(sess)
                if got == agent_id:
                    return sess, got, ""
                held.append((sess, got))  # busy while held: the tracker hands out the next free server
            note = f"agent {agent_id}, where this comparison's rows on key '{key}' ran, {why}"
            other = next((i for i, (_, got) in enumerate(held) if got is not None), None)
            if other is not None:
                sess, got = held.pop(other)
                return sess, got, note
            if why.startswith("was not free"):
                raise TunefarmError(f"no session on key '{key}': {note}, and no other agent of the key was free")
            sess = self.session(key, session_timeout)
            return sess, session_agent_id(sess), note
        finally:
            held.clear()  # closes them: those agents are free again

    def close(self) -> None:
        self.client.close()


def session_agent_id(sess) -> str | None:
    """The id of the agent a session is on (None: the server is not a tunefarm agent)."""
    try:
        return clean_agent_id(sess.get_function(AGENT_ID_FUNC)())
    except Exception:  # pylint: disable=broad-except  # a stock server has no such function
        return None


class Comparator:
    """Runs rows on the farm's agents (:meth:`run`), then compares their outputs (:meth:`compare`).

    One Comparator is one comparison: every row it runs on a key goes to the same agent (``pins``), see the
    module's text."""

    def __init__(self, agents: FarmAgents, settings: MeasureSettings, console,
                 session_timeout: int = SESSION_TIMEOUT_S):
        self.agents = agents
        self.settings = settings
        self.console = console
        self.session_timeout = session_timeout
        self.pins: dict[str, str] = {}  # key -> the agent this comparison's rows on it run on

    def run(self, artifacts: ModelArtifacts, rows: list[Row | RowResult]) -> list[RowResult]:
        """Every row, in order, each in its own session; a ``RowResult`` (a row its caller could not
        prepare) is kept as it is."""
        results = []
        for row in rows:
            if isinstance(row, RowResult):
                results.append(row)
                continue
            t0 = time.monotonic()
            res = self.run_row(artifacts, row)
            res.wall_s = round(time.monotonic() - t0, 1)
            results.append(res)
        return results

    def compare(self, results: list[RowResult], reference: list[np.ndarray]) -> list[RowResult]:
        return compare_results(results, reference)

    def run_and_compare(self, artifacts: ModelArtifacts, rows: list[Row | RowResult]) -> list[RowResult]:
        return self.compare(self.run(artifacts, rows), artifacts.reference)

    def run_row(self, artifacts: ModelArtifacts, row: Row) -> RowResult:
        try:
            agents = self.agents.agents(row.key)
        except NoDeviceError as err:
            return result(row, NO_AGENT, str(err))
        runner = runner_name(row.backend)
        if agents and not any(runner in a.runners for a in agents):
            # The agents say so at registration; ask one for the reason (cheap: no model is sent).
            reason = self._unavailable_reason(row, runner) or (
                f"the agents on key '{row.key}' do not list {runner} among their runners "
                f"({', '.join(agents[0].runners)})")
            return result(row, NOT_AVAILABLE, reason)
        try:
            model_path = row.model_file or artifacts.model_file(MODEL_FORMAT.get(runner, runner))
        except TunefarmError as err:
            return result(row, NOT_RUN, str(err))
        with self.console.status(f"{artifacts.name}: running {row.label} on key '{row.key}'"):
            try:
                return self._run_in_session(artifacts, row, model_path)
            except TunefarmError as err:
                return result(row, FAILED, str(err))
            except Exception as err:  # pylint: disable=broad-except  # RPC errors come as several types
                return result(row, FAILED, f"{row.backend} on key '{row.key}' failed: {last_line(err)}")

    def _run_in_session(self, artifacts: ModelArtifacts, row: Row, model_path: str) -> RowResult:
        sess, agent_id, note = self.agents.session_on(row.key, self.session_timeout, self.pins.get(row.key))
        try:
            if agent_id is None:
                return result(row, NOT_AVAILABLE, not_an_agent_reason(row.key))
            self.pins[row.key] = agent_id  # the first row's agent; a row that had to move takes the pin along
            on = {"where": f"agent {agent_id}", "agent": agent_id, "agent_note": note}
            try:
                run = sess.get_function(RUNNER_RUN_FUNC)
            except Exception:  # pylint: disable=broad-except  # a server that says it is an agent but is not
                return result(row, NOT_AVAILABLE, not_an_agent_reason(row.key), **on)
            try:
                remote_model = f"model-{Path(model_path).name}"
                sess.upload(model_path, remote_model)
                sess.upload(artifacts.inputs_file(), INPUTS_FILE)
                options = {"budget_s": self.settings.budget_s, **row.options}
                answer = json.loads(str(run(row.backend, remote_model, INPUTS_FILE, self.settings.warmup,
                                            self.settings.repeat, json.dumps(options))))
                outputs = None
                if answer.get("outputs_file") and "error" not in answer:
                    with np.load(io.BytesIO(bytes(sess.download(answer["outputs_file"])))) as data:
                        outputs = [data[name] for name in data.files]
            except Exception as err:  # pylint: disable=broad-except  # RPC errors come as several types
                return result(row, FAILED, f"{row.backend} on key '{row.key}' failed: {last_line(err)}", **on)
            return result_from_answer(row, answer, agent_id, outputs, note)
        finally:
            del sess  # ends the session: the agent is free for the next row

    def _unavailable_reason(self, row: Row, runner: str) -> str | None:
        try:
            sess = self.agents.session(row.key, 60)
            answer = json.loads(str(sess.get_function(RUNNER_AVAILABLE_FUNC)(json.dumps(row.options))))
            agent_id = str(sess.get_function(AGENT_ID_FUNC)())
            del sess
        except Exception:  # pylint: disable=broad-except  # a stock server, a busy key: fall back to DeviceInfo
            return None
        reason = answer.get(runner)
        return f"{reason} (agent {agent_id})" if reason else None
