"""A slow search worker: the farm's own search worker on a machine that is slow to start each share's search.

Every share's ``ms.tune_tasks`` waits until the host has asked the share to release tasks (the work stealing of
tunefarm.host.search_workers) or :data:`HOLD_S` have passed, then searches as any worker does. It stands for a
share held back (a slow build, a slower machine) while another worker's share ends: the host must then hand that
worker this share's tasks not begun. Everything else — the search, the builds, the release — is the farm's code.

    python tests/slow_search_worker.py <rpc_server args...>

Used by tests/test_spread.py; never by the farm.
"""
import sys
import threading

HOLD_S = 300.0


def main() -> int:
    from tvm.s_tir import meta_schedule as ms  # pylint: disable=import-outside-toplevel

    from tunefarm.host.search_workers import worker as spread  # pylint: disable=import-outside-toplevel

    asked = threading.Event()
    release, tune_tasks = spread._release, ms.tune_tasks  # pylint: disable=protected-access

    def released(count):
        try:
            return release(count)
        finally:
            asked.set()

    def held_tune_tasks(*args, **kwargs):
        asked.wait(HOLD_S)
        return tune_tasks(*args, **kwargs)

    spread._release, ms.tune_tasks = released, held_tune_tasks  # pylint: disable=protected-access
    from tunefarm.device_agents.rpc_server import main as serve  # pylint: disable=import-outside-toplevel

    return serve(sys.argv[1:] + ["--serve", "tunefarm.host.search_workers.worker"])


if __name__ == "__main__":
    sys.exit(main())
