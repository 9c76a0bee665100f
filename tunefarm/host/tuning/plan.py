"""What a tuning job will tune: its target, its model fused into the tuning tasks, and the job directory it
continues."""
from __future__ import annotations

import json
from typing import Any

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import TuningJob
from tunefarm.host.tuning.jobdir import JobDir


def fuse_for_tuning(mod, target):
    """Legalize and fuse once: the module whose TIR functions become the tuning tasks."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    with target:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.pipeline.zero_pipeline()(mod)
    return mod


def resolve_job_target(job: TuningJob, tracker_client):
    """The job's target: the agents' own (``from-agent``), a preset name or a JSON dict."""
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from tunefarm.core.targets import target_from_spec  # pylint: disable=import-outside-toplevel

    if job.target == "from-agent":
        infos = [a for a in tracker_client.agent_infos(job.device.key) if a.target]
        if not infos:
            raise TunefarmError(f"target is 'from-agent' but no agent on key '{job.device.key}' reports a target; "
                                "set target: in the job file")
        distinct = {json.dumps(a.target, sort_keys=True) for a in infos}
        if len(distinct) > 1:
            raise TunefarmError(f"agents on key '{job.device.key}' serve different targets ({len(distinct)}); "
                                "a key must name one kind of device, or set target: in the job file")
        return tvm.target.Target(infos[0].target)
    return target_from_spec(job.target)


def _refuse_unrunnable_target(target, agents, key: str) -> None:
    """A one-line error now, rather than every candidate failing, when no agent on the key can run the target
    (e.g. OpenCL on an agent whose TVM runtime is built with USE_OPENCL=OFF)."""
    from tunefarm.core.targets import runtime_problem, target_to_json  # pylint: disable=import-outside-toplevel

    problems = [runtime_problem(target_to_json(target), a) for a in agents]
    if problems and all(problems):
        raise TunefarmError(f"key '{key}': {problems[0]}")


def _check_state(job_dir: JobDir, state: dict[str, Any]) -> bool:
    """True if the job dir holds an earlier run of this job (resume); refuse a different model/target."""
    if not job_dir.has_state():
        job_dir.write_state(state)
        return False
    old = job_dir.read_state()
    for field in ("model_fingerprint", "target"):
        if old.get(field) != state.get(field):
            raise TunefarmError(f"{job_dir} holds a run of a different {field.replace('_', ' ')}; "
                                "give the job a new name or move that directory away")
    return True
