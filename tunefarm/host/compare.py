"""``tunefarm compare``: models x (device key, backend) rows, each checked, timed and plotted.

For each model: import it once (``host.models``), compute the reference outputs once, then run every
row on an agent of the row's key through the tracker and an RPC session:

* ``tvm-tuned``: the tuning job's database applied to exactly the module the farm tunes
  (``tuning.fuse_for_tuning`` then ``evaluate.apply_database``), compiled, run and timed on the agent
  (``evaluate.run_on_device``: Relax VM, ``time_evaluator``);
* ``tvm-untuned``: the same fused module compiled without records (default schedules);
* ``torch``, ``torch-compile``, ``onnxruntime``, ``tensorrt``: the agent's runners
  (``device_agents.runners``), reached as ``tunefarm.runner.run`` in the session.

Every row that runs is compared with the reference by ``core.stats.compare_outputs`` and summarised by
``core.stats.latency_stats``. A row that cannot run (no agent on its key within the wait, a backend the
device does not have, no tuning logs) is kept in the report with its reason, never with a number.
Output: ``report.md``, ``report.json``, ``latency.png`` and ``tuning.png`` in the output directory.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunefarm.core.comparespec import TVM_BACKENDS, CompareConfig, CompareRow, load_compare
from tunefarm.core.errors import NoDeviceError, TuningFailed, TunefarmError, last_line
from tunefarm.core.stats import compare_outputs
from tunefarm.core.wire import AGENT_ID_FUNC, MODEL_FORMAT, RUNNER_AVAILABLE_FUNC, RUNNER_RUN_FUNC, parse_hostport

RUNNER_SESSION_TIMEOUT_S = 1800  # a TensorRT engine build can take minutes
NOT_AVAILABLE = "not available"
NO_AGENT = "no agent"
NOT_RUN = "not run"
FAILED = "failed"
OK = "ok"


class _Farm:
    """The tracker as the compare sees it: agents per key (waited for once, boundedly), sessions."""

    def __init__(self, tracker_addr: tuple[str, int], wait_s: float, console):
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        self.addr = tracker_addr
        self.wait_s = wait_s
        self.console = console
        self.client = TrackerClient(*tracker_addr)
        self.client.summary()  # one-line TrackerUnreachable now if the tracker is not there
        self.missing: dict[str, str] = {}
        self.seen: dict[str, list[dict[str, Any]]] = {}  # key -> what its agents reported, for the report

    def agents(self, key: str):
        """DeviceInfo of the agents on ``key``; raises NoDeviceError (remembered) if none comes in time."""
        if key in self.missing:
            raise NoDeviceError(self.missing[key])

        def on_wait(waited, limit):
            self.console.print(f"[yellow]waiting for an agent on key '{key}': {waited:.0f}/{limit:.0f} s[/]")

        try:
            self.client.wait_for_key(key, self.wait_s, on_wait=on_wait)
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


class _ModelArtifacts:
    """One model imported once; the files and builds its rows need, made on first use."""

    def __init__(self, spec, work_dir: Path, console):
        from tunefarm.host.models import load_model  # pylint: disable=import-outside-toplevel

        self.spec = spec
        self.work_dir = work_dir
        self.console = console
        with console.status(f"loading {spec.name or spec.path}"):
            self.model = load_model(spec)
            self.reference = self.model.reference_outputs()
        self._relax = None
        self._fused: dict[str, Any] = {}
        self._libs: dict[tuple, dict[str, Any]] = {}
        self._files: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.model.name

    def relax(self):
        if self._relax is None:
            from tunefarm.host.models import to_relax  # pylint: disable=import-outside-toplevel

            with self.console.status(f"importing {self.name} into Relax"):
                self._relax = to_relax(self.model)
        return self._relax

    def fused(self, target):
        from tunefarm.core.targets import target_to_json  # pylint: disable=import-outside-toplevel
        from tunefarm.host.tuning.job import fuse_for_tuning  # pylint: disable=import-outside-toplevel

        key = json.dumps(target_to_json(target), sort_keys=True)
        if key not in self._fused:
            self._fused[key] = fuse_for_tuning(self.relax(), target)
        return self._fused[key]

    def library(self, target, logs: Path | None) -> dict[str, Any]:
        """Compile (once) the untuned build, or the build with ``logs``'s database applied."""
        # pylint: disable=import-outside-toplevel
        import tvm

        from tunefarm.core.targets import target_to_json
        from tunefarm.host.tuning.evaluate import apply_database
        from tunefarm.host.tuning.logs import open_database

        cache_key = (json.dumps(target_to_json(target), sort_keys=True), str(logs) if logs else None)
        if cache_key in self._libs:
            return self._libs[cache_key]
        mod = self.fused(target)
        info: dict[str, Any] = {}
        if logs is not None:
            mod, scheduled, unscheduled = apply_database(mod, target, open_database(logs))
            info = {"tuned_functions": len(scheduled), "tir_functions": len(scheduled) + len(unscheduled),
                    "untuned_functions": unscheduled}
        label = "tuned" if logs else "untuned"
        with self.console.status(f"compiling the {label} TVM build of {self.name}"):
            t0 = time.perf_counter()
            ex = tvm.compile(mod, target)
            path = self.work_dir / f"{self.name}-{label}-{len(self._libs)}.so"
            ex.export_library(str(path))
            info["compile_s"] = round(time.perf_counter() - t0, 2)
        self._libs[cache_key] = {"path": str(path), **info}
        return self._libs[cache_key]

    def model_file(self, fmt: str) -> str:
        """The model as a runner takes it: ``onnx``, or ``torch`` (a torchvision model's name and weights as
        ``.pt``, else a ``torch.export`` program as ``.pt2``; no pickled code either way)."""
        if fmt in self._files:
            return self._files[fmt]
        if fmt == "onnx":
            from tunefarm.host.models import export_onnx  # pylint: disable=import-outside-toplevel

            with self.console.status(f"exporting {self.name} to ONNX"):
                path = export_onnx(self.model, self.work_dir / f"{self.name}.onnx")
        else:
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
        self._files[fmt] = str(path)
        return self._files[fmt]

    def inputs_file(self) -> str:
        if "inputs" not in self._files:
            path = self.work_dir / f"{self.name}-inputs.npz"
            np.savez(path, **{f"input{i}": x for i, x in enumerate(self.model.inputs)})
            self._files["inputs"] = str(path)
        return self._files["inputs"]


def _row_result(row: CompareRow, status: str, reason: str = "", **extra) -> dict[str, Any]:
    return {"label": row.label, "backend": row.backend, "key": row.key, "options": row.options,
            "status": status, "reason": reason, **extra}


def _tolerances(row: CompareRow, cfg: CompareConfig) -> tuple[float, float]:
    rtol = row.rtol if row.rtol is not None else cfg.evaluate.rtol
    atol = row.atol if row.atol is not None else cfg.evaluate.atol
    return float(rtol), float(atol)


def _check_tuning_logs(logs: Path, model) -> tuple[dict[str, Any] | None, str]:
    """The job state of a tuning directory made for this model, or why it cannot be used."""
    if not logs.is_dir():
        return None, f"no tuning logs at {logs} (tune first: tunefarm tune configs/jobs/...)"
    state_path = logs / "job_state.json"
    if not state_path.is_file() or not (logs / "database_tuning_record.json").is_file():
        return None, f"{logs} is not a tuning job directory (no job_state.json / MetaSchedule database)"
    state = json.loads(state_path.read_text())
    if state.get("model_fingerprint") != model.fingerprint:
        return None, (f"{logs} holds the tuning of a different model (fingerprint {state.get('model_fingerprint')}, "
                      f"this model {model.fingerprint})")
    return state, ""


def _run_tvm_row(row: CompareRow, art: _ModelArtifacts, farm: _Farm, cfg: CompareConfig) -> dict[str, Any]:
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.core.targets import runtime_problem, target_from_spec, target_to_json
    from tunefarm.host.tuning.evaluate import device_type_of, run_on_device

    logs = row.logs_for(art.name) if row.backend == "tvm-tuned" else None
    state = None
    if logs is not None:
        state, why = _check_tuning_logs(logs, art.model)
        if state is None:
            return _row_result(row, NOT_RUN, why)
    try:
        agents = farm.agents(row.key)
    except NoDeviceError as err:
        return _row_result(row, NO_AGENT, str(err))
    if state is not None:
        target = tvm.target.Target(state["target"])
    elif row.target in (None, "from-agent"):
        targets = {json.dumps(a.target, sort_keys=True) for a in agents if a.target}
        if len(targets) != 1:
            return _row_result(row, NOT_RUN, f"agents on key '{row.key}' report {len(targets)} different targets; "
                                             "set target: in the row")
        target = tvm.target.Target(json.loads(targets.pop()))
    else:
        target = target_from_spec(row.target)
    target_json = target_to_json(target)
    problems = [runtime_problem(target_json, a) for a in agents]
    if agents and all(problems):
        return _row_result(row, NOT_AVAILABLE, problems[0], target=target_json)
    lib = art.library(target, logs)
    ev = cfg.evaluate
    with art.console.status(f"{art.name}: running {row.label} on key '{row.key}'"):
        try:
            res = run_on_device(farm.addr, row.key, lib["path"], art.model.inputs, ev.warmup, ev.repeat,
                                budget_s=ev.budget_s, device_type=device_type_of(target), wait_s=farm.wait_s)
        except TunefarmError as err:
            return _row_result(row, FAILED, str(err), target=target_json)
        except Exception as err:  # pylint: disable=broad-except  # TVM raises several types
            return _row_result(row, FAILED, f"running on key '{row.key}' failed: {last_line(err)}",
                               target=target_json)
    rtol, atol = _tolerances(row, cfg)
    details = {k: v for k, v in lib.items() if k != "path"}
    if logs is not None:
        details["logs"] = str(logs)
        details.update(_tuning_summary(logs))
    return _row_result(row, OK, where=f"agent {res['agent']}", latency=res["latency"], threads=res["threads"],
                       numerics=compare_outputs(res["outputs"], art.reference, rtol, atol),
                       throughput_per_s=_throughput(art.model.inputs, res["latency"]), target=target_json,
                       details=details, version=f"TVM {tvm.__version__}")


def _tuning_summary(logs: Path) -> dict[str, Any]:
    """Trials measured and tuning wall time of a job directory, from its progress log."""
    path = logs / "progress.jsonl"
    if not path.is_file():
        return {}
    events = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    if not events:
        return {}
    return {"trials": max(e.get("trials", 0) for e in events),
            "tuning_wall_s_last_run": round(max(e.get("elapsed_s", 0.0) for e in events), 1)}


def _throughput(inputs, latency: dict[str, Any]) -> float:
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
    return batch * 1e3 / latency["mean_ms"]


def _run_runner_row(row: CompareRow, art: _ModelArtifacts, farm: _Farm, cfg: CompareConfig) -> dict[str, Any]:
    try:
        agents = farm.agents(row.key)
    except NoDeviceError as err:
        return _row_result(row, NO_AGENT, str(err))
    if agents and not any(row.backend in a.runners for a in agents):
        # The agents say so at registration; ask one for the reason (cheap: no model is sent).
        reason = _ask_unavailable_reason(row, farm) or (
            f"the agents on key '{row.key}' do not list {row.backend} among their runners "
            f"({', '.join(agents[0].runners)})")
        return _row_result(row, NOT_AVAILABLE, reason)
    try:
        model_path = art.model_file(MODEL_FORMAT[row.backend])
    except TunefarmError as err:
        return _row_result(row, NOT_RUN, str(err))
    options = {"budget_s": cfg.evaluate.budget_s, **row.options}
    with art.console.status(f"{art.name}: running {row.label} on key '{row.key}'"):
        try:
            sess = farm.session(row.key, RUNNER_SESSION_TIMEOUT_S)
            try:
                agent_id = str(sess.get_function(AGENT_ID_FUNC)())
                run = sess.get_function(RUNNER_RUN_FUNC)
            except Exception:  # pylint: disable=broad-except
                return _row_result(row, NOT_AVAILABLE, f"the server on key '{row.key}' is not a tunefarm agent "
                                                       "with runners (a stock tvm.rpc server?)")
            remote_model = f"model-{Path(model_path).name}"
            sess.upload(model_path, remote_model)
            sess.upload(art.inputs_file(), "inputs.npz")
            result = json.loads(str(run(row.backend, remote_model, "inputs.npz", cfg.evaluate.warmup,
                                        cfg.evaluate.repeat, json.dumps(options))))
            if result.get("available") is False:
                return _row_result(row, NOT_AVAILABLE, result.get("reason", ""), where=f"agent {agent_id}")
            if "error" in result:
                return _row_result(row, FAILED, result["error"], where=f"agent {agent_id}",
                                   details={"traceback": result.get("traceback")})
            with np.load(io.BytesIO(bytes(sess.download(result["outputs_file"])))) as data:
                outputs = [data[name] for name in data.files]
        except TunefarmError as err:
            return _row_result(row, FAILED, str(err))
        except Exception as err:  # pylint: disable=broad-except  # RPC errors come as several types
            return _row_result(row, FAILED, f"{row.backend} on key '{row.key}' failed: {last_line(err)}")
    rtol, atol = _tolerances(row, cfg)
    details = {k: v for k, v in result.items()
               if k not in ("latency", "throughput_per_s", "outputs_file", "available", "backend")}
    return _row_result(row, OK, where=f"agent {agent_id}", latency=result["latency"], threads=result.get("threads"),
                       numerics=compare_outputs(outputs, art.reference, rtol, atol),
                       throughput_per_s=result["throughput_per_s"], details=details,
                       version=f"{row.backend} {result.get('version', '')}".strip())


def _ask_unavailable_reason(row: CompareRow, farm: _Farm) -> str | None:
    try:
        sess = farm.session(row.key, 60)
        answer = json.loads(str(sess.get_function(RUNNER_AVAILABLE_FUNC)(json.dumps(row.options))))
        agent_id = str(sess.get_function(AGENT_ID_FUNC)())
    except Exception:  # pylint: disable=broad-except  # a stock server, a busy key: fall back to DeviceInfo
        return None
    reason = answer.get(row.backend)
    return f"{reason} (agent {agent_id})" if reason else None


def run_compare(config_path: str, tracker_override: str | None = None, output: str | None = None,
                console=None) -> dict[str, Any]:
    """Run every row of every model in the compare file; write the report and plots; return the report."""
    if console is None:
        from rich.console import Console  # pylint: disable=import-outside-toplevel

        console = Console(highlight=False)
    cfg = load_compare(config_path)
    if tracker_override:
        cfg.tracker = tracker_override
    out_dir = Path(output) if output else Path("logs") / f"compare-{cfg.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    farm = _Farm(parse_hostport(cfg.tracker), cfg.device_wait_sec, console)
    work_dir = Path(tempfile.mkdtemp(prefix=f"tunefarm-compare-{cfg.name}-"))
    t_start = time.time()
    load_start = _load_avg()
    models_out = []
    for spec in cfg.models:
        art = _ModelArtifacts(spec, work_dir, console)
        console.print(f"[bold]{art.name}[/]: input {[list(x.shape) for x in art.model.inputs]}, reference "
                      f"{'PyTorch' if art.model.kind == 'torch' else 'ONNX Runtime'}")
        rows = []
        for row in cfg.rows:
            t0 = time.time()
            try:
                result = (_run_tvm_row if row.backend in TVM_BACKENDS else _run_runner_row)(row, art, farm, cfg)
            except TunefarmError as err:
                result = _row_result(row, FAILED, str(err))
            result["wall_s"] = round(time.time() - t0, 1)
            rows.append(result)
            console.print(f"  {row.label:<28} {_one_line_summary(result)}")
        _add_speedups(rows, cfg.baseline)
        models_out.append({"name": art.name, "source": spec.source,
                           "input_shapes": [list(x.shape) for x in art.model.inputs],
                           "fingerprint": art.model.fingerprint,
                           "reference": "PyTorch" if art.model.kind == "torch" else "ONNX Runtime",
                           "rows": rows})
    from tunefarm.host.reports.compare import write_compare_report  # pylint: disable=import-outside-toplevel

    # Other work on a shared machine skews every figure: the report says how busy it was.
    report = write_compare_report(cfg, models_out, out_dir, wall_s=time.time() - t_start,
                                  load_avg={"load_avg_start": load_start, "load_avg_end": _load_avg(),
                                            "cpus": os.cpu_count()}, agents=farm.seen)
    console.print(f"report: {out_dir / 'report.md'}")
    bad = [f"{m['name']}/{r['label']}" for m in models_out for r in m["rows"]
           if r["status"] == OK and not r["numerics"]["ok"]]
    if bad:
        raise TuningFailed(f"outputs differ from the reference in: {', '.join(bad)} (see {out_dir / 'report.md'})")
    return report


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _one_line_summary(result: dict[str, Any]) -> str:
    if result["status"] != OK:
        return f"{result['status']}: {result['reason']}"
    lat, num = result["latency"], result["numerics"]
    return (f"median {lat['median_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, {lat['samples']} samples; "
            f"numerics {'ok' if num['ok'] else 'FAILED'} (max abs err {num['max_abs_err']:.2g})")


def _add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    base = next((r for r in rows if r["label"] == baseline and r["status"] == OK), None)
    for row in rows:
        if row["status"] == OK and base is not None:
            row["speedup_vs_baseline"] = base["latency"]["median_ms"] / row["latency"]["median_ms"]
        else:
            row["speedup_vs_baseline"] = None
