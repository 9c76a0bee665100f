"""The laptop's client of the host service's HTTP API: :class:`FarmClient` (submit, list, follow, cancel,
resume, pull, delete). The commands that print what it returns are :mod:`tunefarm.client.commands`.

HTTP through ``requests`` (streams a response line by line for ``follow``, multipart uploads for
``submit``). Every failure is a one-line :class:`TunefarmError`: the farm's own ``{"error": ...}``
message for a refused request, or what went wrong reaching it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tunefarm.core.errors import TunefarmError
from tunefarm.core.farm import CONNECT_TIMEOUT_S, FarmHTTP, FarmUnreachable
from tunefarm.core.jobspec import load_job

BUNDLE_WAIT_S = 600.0  # the farm packs a bundle (TVM exports the best records) before its first byte


class FarmClient(FarmHTTP):
    """The laptop's view of one farm: submit, list, follow, cancel, resume, pull."""

    def submit(self, job_file: str | Path, skip_eval: bool = False) -> dict[str, Any]:
        job = load_job(job_file)  # validated here first: a bad file is a one-line error before any upload
        files = {"job": (None, Path(job_file).read_text(), "application/x-yaml")}
        if job.model.source == "onnx":
            model = Path(job.model.path)
            if not model.is_file():
                raise TunefarmError(f"ONNX model file not found: {model}")
            limit = self.info()["max_upload_bytes"]
            size = model.stat().st_size
            if size > limit:
                raise TunefarmError(f"{model} is {size / 2**20:.1f} MiB; the farm takes uploads up to "
                                    f"{limit / 2**20:.0f} MiB (max_upload_mb in its config)")
            files["model"] = (model.name, model.open("rb"), "application/octet-stream")
        files["skip_eval"] = (None, "1" if skip_eval else "0")
        try:
            return self.request("POST", "/api/jobs", files=files).json()
        finally:
            if "model" in files:
                files["model"][1].close()

    def jobs(self) -> list[dict[str, Any]]:
        return self.get_json("/api/jobs")["jobs"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get_json(f"/api/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.post_json(f"/api/jobs/{job_id}/cancel")

    def resume(self, job_id: str, trials: int | None = None) -> dict[str, Any]:
        return self.post_json(f"/api/jobs/{job_id}/resume", {"trials": trials} if trials else {})

    def delete(self, job_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/api/jobs/{job_id}").json()

    def devices(self) -> dict[str, Any]:
        return self.get_json("/api/devices")

    def events(self, job_id: str, start: int = 0, follow: bool = True) -> Iterator[dict[str, Any]]:
        """The job's progress lines from line ``start`` on, then (``follow``) each new one as it lands."""
        import requests  # pylint: disable=import-outside-toplevel

        # the farm sends a line at least every 10 s
        resp = self.request("GET", f"/api/jobs/{job_id}/progress", params={"from": start, "follow": int(follow)},
                            stream=True, timeout=(CONNECT_TIMEOUT_S, 60))
        try:
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)
        except requests.RequestException as err:
            raise FarmUnreachable(f"lost the connection to the farm at {self.url}: {type(err).__name__}") from None
        finally:
            resp.close()

    def download_bundle(self, job_id: str, dest: Path) -> None:
        resp = self.request("GET", f"/api/jobs/{job_id}/bundle", stream=True,
                            timeout=(CONNECT_TIMEOUT_S, BUNDLE_WAIT_S))
        with open(dest, "wb") as fh:
            for chunk in resp.iter_content(1 << 20):
                fh.write(chunk)

