"""Warm-start selection (tunefarm.host.tuning.warm_start): which records of which job directories a new job
takes. Real MetaSchedule JSON databases written here, no processes and no tuning."""
from __future__ import annotations

import pytest

from tunefarm.host.tuning.jobdir import JobDir, workload_counts

TARGET = {"kind": "llvm", "num-cores": 1}


def _kernel(n: int):
    import tvm
    from tvm import te

    a = te.placeholder((n, n), name="a")
    k = te.reduce_axis((0, n), "k")
    b = te.compute((n, n), lambda i, j: te.sum(a[i, k] * a[k, j], axis=k), name="b")
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def _trace(mod, factor: int):
    """A schedule's trace of its own: the outer loop split by ``factor``."""
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    i, _, _ = sch.get_loops(sch.get_sblock("b"))
    sch.split(i, factors=[None, factor])
    return sch.trace


def _job_dir(logs, name: str, target: dict, records, last_run: str = "finished", verify=lambda secs: True) -> JobDir:
    """A job directory tuned for ``target`` holding ``records``: (module, split factor, run seconds); its last
    run ended as ``last_run``; the records ``verify(secs)`` picks are in its verified.jsonl, as the timing
    verifier leaves them."""
    import json

    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.jobdir import VERIFIED
    from tunefarm.host.tuning.verify import trace_hash

    job_dir = JobDir(logs / name)
    job_dir.write_state({"model_fingerprint": name, "target": target, "last_run": last_run})
    db = job_dir.database()
    with open(job_dir.file(VERIFIED), "a") as log:
        for mod, factor, secs in records:
            workload = db.commit_workload(mod)
            trace = _trace(mod, factor)
            db.commit_tuning_record(ms.database.TuningRecord(trace, workload,
                                                             [tvm.tirx.FloatImm("float32", s) for s in secs],
                                                             tvm.target.Target(target)))
            if verify(secs):
                log.write(json.dumps({"workload": str(tvm_ffi.structural_hash(mod)), "trace": trace_hash(trace),
                                      "status": "verified"}) + "\n")
    return job_dir


@pytest.fixture(scope="module")
def kernels():
    import tvm_ffi

    mods = {"wanted": _kernel(16), "other": _kernel(8)}
    return mods, {name: str(tvm_ffi.structural_hash(mod)) for name, mod in mods.items()}


def test_the_best_valid_records_of_the_same_target_top_k_once_each(tmp_path, kernels):
    from tunefarm.host.tuning.warm_start import find_warm_start

    mods, keys = kernels
    wanted = mods["wanted"]
    _job_dir(tmp_path, "a-earlier", TARGET, [(wanted, 2, [0.003]), (wanted, 4, [0.001]), (wanted, 8, [1e10]),
                                             (wanted, 4, [0.001])])  # the same trace twice
    _job_dir(tmp_path, "b-earlier", TARGET, [(wanted, 16, [0.002]), (mods["other"], 2, [0.0001])])
    _job_dir(tmp_path, "c-other-target", {"kind": "llvm", "num-cores": 4}, [(wanted, 2, [0.0005])])
    _job_dir(tmp_path, "d-unwanted-only", TARGET, [(mods["other"], 4, [0.0001])])
    _job_dir(tmp_path, "new", TARGET, [(wanted, 8, [0.0001])])  # the new job's own directory is no source
    (tmp_path / "e-broken").mkdir()
    (tmp_path / "e-broken" / "job_state.json").write_text('{"target": {"kind": "llvm", "num-cores": 1}}')

    warm = find_warm_start(JobDir(tmp_path / "new"), tmp_path, TARGET, [keys["wanted"]], top_k=2)
    assert warm.sources == ["a-earlier", "b-earlier"]  # same target, with a valid record of a wanted workload
    assert warm.per_workload == {keys["wanted"]: 2} and warm.records == 2
    best = [min(float(x) for x in r.run_secs) for r in warm.chosen[keys["wanted"]]]
    assert best == pytest.approx([0.001, 0.002])  # best first; the duplicate trace counts once; failed skipped
    assert warm.summary() == {"sources": ["a-earlier", "b-earlier"], "records": 2,
                              "per_workload": {keys["wanted"]: 2}}
    more = find_warm_start(JobDir(tmp_path / "new"), tmp_path, TARGET, [keys["wanted"], keys["other"]], top_k=8)
    assert more.per_workload == {keys["wanted"]: 3, keys["other"]: 2}
    assert more.sources == ["a-earlier", "b-earlier", "d-unwanted-only"]
    none = find_warm_start(JobDir(tmp_path / "new"), tmp_path, {"kind": "cuda"}, [keys["wanted"]], top_k=8)
    assert none.records == 0 and none.sources == []


def test_only_verified_records_of_runs_that_ended_are_taken(tmp_path, kernels):
    """Issue 12: warm start never imports a record that was not measured twice, nor one of a failed run."""
    from tunefarm.host.tuning.warm_start import find_warm_start

    mods, keys = kernels
    wanted = mods["wanted"]
    _job_dir(tmp_path, "a-fake", TARGET, [(wanted, 2, [1e-6]), (wanted, 4, [0.004])],
             verify=lambda secs: secs[0] > 1e-3)  # the fast one was never verified
    _job_dir(tmp_path, "b-failed", TARGET, [(wanted, 8, [0.0001])], last_run="running")  # killed or failed
    _job_dir(tmp_path, "c-stopped", TARGET, [(wanted, 16, [0.002])], last_run="stopped")
    warm = find_warm_start(JobDir(tmp_path / "new"), tmp_path, TARGET, [keys["wanted"]], top_k=8)
    assert warm.sources == ["a-fake", "c-stopped"]
    best = sorted(min(float(x) for x in r.run_secs) for r in warm.chosen[keys["wanted"]])
    assert best == pytest.approx([0.002, 0.004])


def test_the_chosen_records_are_seeded_under_the_new_jobs_workload(tmp_path, kernels):
    from tunefarm.host.tuning.warm_start import find_warm_start, seed_database

    mods, keys = kernels
    _job_dir(tmp_path, "earlier", TARGET, [(mods["wanted"], 2, [0.003]), (mods["wanted"], 4, [0.001])])
    new = JobDir(tmp_path / "new")
    warm = find_warm_start(new, tmp_path, TARGET, [keys["wanted"]], top_k=1)
    database = new.database()
    from tunefarm.host.tuning.jobdir import VERIFIED

    seed_database(database, warm, {keys["wanted"]: mods["wanted"]}, new.file(VERIFIED))
    counts = workload_counts(database)
    assert counts == {keys["wanted"]: {"records": 1, "failed": 0, "best_s": pytest.approx(0.001)}}
    # The seeded record was verified in its source: the new job's log says so, so its export keeps it.
    assert list(new.verified()) == [keys["wanted"]] and len(new.verified()[keys["wanted"]]) == 1
