"""MeasuredCache: candidates already measured, shared by the farm's builder and runner.

The builder answers a candidate seen before with a placeholder artifact instead of building it; the
runner answers that placeholder from here instead of measuring it.
"""
from __future__ import annotations

import os
import tempfile

import tvm_ffi


class MeasuredCache:
    """Candidates already measured, by structural hash of the scheduled module.

    Filled from the job's database when a job resumes (each record's trace is replayed on its
    workload) and from every measurement of this run, so that no candidate is measured twice: the
    builder hands such a candidate a ``.cached`` placeholder artifact (a real file in its own
    temporary directory, which MetaSchedule's RemoveBuildArtifact callback deletes as usual) and the
    runner answers it from here.
    """

    SUFFIX = ".cached"

    def __init__(self):
        self.costs: dict[str, list[float]] = {}
        self.by_artifact: dict[str, str] = {}
        self.hits = 0

    @staticmethod
    def key(mod) -> str:
        return str(tvm_ffi.structural_hash(mod))

    @classmethod
    def is_placeholder(cls, artifact_path) -> bool:
        """Whether a builder result's artifact is a cache hit's placeholder (answered here, never measured)."""
        return artifact_path is not None and str(artifact_path).endswith(cls.SUFFIX)

    def has(self, key: str | None) -> bool:
        return key is not None and key in self.costs

    def artifact_for(self, key: str) -> str:
        self.hits += 1
        path = os.path.join(tempfile.mkdtemp(prefix="tunefarm-cached-"), key + self.SUFFIX)
        open(path, "wb").close()  # pylint: disable=consider-using-with
        return path

    def note_artifact(self, artifact_path: str, key: str | None) -> None:
        if key is not None:
            self.by_artifact[artifact_path] = key

    def add_result(self, artifact_path: str, costs: list[float]) -> None:
        key = self.by_artifact.pop(artifact_path, None)
        if key is not None:
            self.costs[key] = list(costs)

    def lookup(self, artifact_path: str) -> list[float] | None:
        if self.is_placeholder(artifact_path):
            return self.costs.get(os.path.basename(artifact_path)[: -len(self.SUFFIX)])
        return None

    def load_database(self, database) -> int:
        """Remember every successfully measured record of ``database``; returns how many."""
        # pylint: disable=import-outside-toplevel
        from tvm.s_tir import Schedule

        count = 0
        for record in database.get_all_tuning_records():
            if record.run_secs is None or not len(record.run_secs):
                continue
            costs = [float(x) for x in record.run_secs]
            if min(costs) >= 1e9:  # MetaSchedule stores failed candidates as 1e10 s
                continue
            try:
                sch = Schedule(record.workload.mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
            except Exception:  # pylint: disable=broad-except
                continue  # a record that no longer replays is simply measured again
            self.costs[self.key(sch.mod)] = costs
            count += 1
        return count
