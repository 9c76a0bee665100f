"""A rogue search worker that holds the farm key: the farm's own search worker, except that it searches nothing
and answers the host's polls with records the host must refuse (a task it was never given, a trace that is not
a trace, one that does not replay on the task, NaN and negative run times, a wrong count), with markup and
control characters in its error text and a fake agent in its per-agent counts.

    python tests/rogue_search_worker.py <rpc_server args...>

Used by tests/test_spread.py; never by the farm.
"""
import json
import sys


def main() -> int:
    from tunefarm.host.search_workers import worker as spread  # pylint: disable=import-outside-toplevel

    got = {}

    def start(share_json):
        got["share"] = json.loads(share_json)
        return "started"

    def poll(since):
        share = got["share"]
        task = share["tasks"][0]
        real = (task.get("records") or [None])[0]
        bogus_trace = {"insts": [["NotAnInstruction", [], [], ["x"]]], "decisions": []}
        records = [
            {"task": 99, "record": real or [bogus_trace, [1e-3], share["target"], []]},
            {"task": 0, "record": "not a record"},
            {"task": 0, "record": [bogus_trace, [1e-3], share["target"], []]},
            {"task": True, "record": [bogus_trace, [1e-3], share["target"], []]},
            {"task": 0, "record": [bogus_trace, [float("nan")], share["target"], []]},
            {"task": 0, "record": [bogus_trace, [-1.0], share["target"], []]},
        ]
        if since:
            return json.dumps({"records": [], "next": since, "done": True, "error": "[bold red]pwned[/] \x1b[2J",
                               "per_agent": {"[red]fake-agent[/]": 10 ** 6}})
        return json.dumps({"records": records, "next": len(records), "done": False, "error": "",
                           "per_agent": {"[red]fake-agent[/]": 10 ** 6}})

    spread._start, spread._poll = start, poll  # pylint: disable=protected-access  # registered by --serve
    from tunefarm.device_agents.rpc_server import main as serve  # pylint: disable=import-outside-toplevel

    return serve(sys.argv[1:] + ["--serve", "tunefarm.host.search_workers.worker"])


if __name__ == "__main__":
    sys.exit(main())
