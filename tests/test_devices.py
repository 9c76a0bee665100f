"""Device summaries (tunefarm.tracker.client.devices_from_summary): a tracker SUMMARY grouped by key.

Pure logic on the SUMMARY's JSON, as the farm's tracker returns it: no processes."""
from __future__ import annotations

from tunefarm.core.wire import VERIFIED_FIELD, DeviceInfo
from tunefarm.tracker.client import devices_from_summary, devices_to_json


def _server(key: str, port: int, info: dict | None = None) -> dict:
    entry = {"key": f"server:{key}", "addr": ["10.0.0.7", port]}
    if info is not None:  # an agent that proved the farm key: the tracker marks it verified
        entry["tunefarm"] = info
        entry[VERIFIED_FIELD] = True
    return entry


def test_agents_are_grouped_by_key_with_free_busy_and_pending():
    nuc = DeviceInfo(key="nuc", hostname="nuc1", agent_id="nuc1:11", num_cores=4, threads=4,
                     target={"kind": "llvm", "num-cores": 4})
    summary = {"queue_info": {"nuc": {"free": 1, "pending": 2}, "gpu": {"free": 1, "pending": 0}},
               "server_info": [_server("nuc", 9090, nuc.to_json()), _server("nuc", 9091),
                               _server("gpu", 9092, DeviceInfo(key="gpu", agent_id="g:1").to_json())]}
    gpu, nuc_entry = devices_from_summary(summary)  # sorted by key
    assert nuc_entry["key"] == "nuc" and gpu["key"] == "gpu"
    assert (nuc_entry["total"], nuc_entry["free"], nuc_entry["busy"], nuc_entry["pending"]) == (2, 1, 1, 2)
    assert nuc_entry["agents"][0] == nuc  # a tunefarm agent: its DeviceInfo
    assert nuc_entry["agents"][1] == "10.0.0.7:9091"  # a stock tvm.rpc server: its address only
    assert nuc_entry["addrs"] == ["10.0.0.7:9090", "10.0.0.7:9091"]
    assert (gpu["total"], gpu["free"], gpu["busy"]) == (1, 1, 0)
    as_json = devices_to_json([nuc_entry])[0]["agents"]
    assert as_json[0]["agent_id"] == "nuc1:11" and as_json[0]["addr"] == "10.0.0.7:9090"
    assert as_json[1] == {"addr": "10.0.0.7:9091"}


def test_keys_with_nobody_are_left_out_but_waiting_requests_are_shown():
    summary = {"queue_info": {"old": {"free": 0, "pending": 0}, "wanted": {"free": 0, "pending": 3}},
               "server_info": [{"key": "client:whatever", "addr": ["1.2.3.4", 1]}]}
    (wanted,) = devices_from_summary(summary)  # "old": a queue the tracker keeps for a key it once saw
    assert wanted == {"key": "wanted", "agents": [], "addrs": [], "total": 0, "free": 0, "busy": 0, "pending": 3,
                      "refused": []}
    assert devices_from_summary({}) == []
    assert devices_from_summary({"queue_info": None, "server_info": None}) == []


def test_an_agent_info_that_is_not_a_device_info_counts_as_a_plain_server():
    summary = {"queue_info": {"k": {"free": 2}},
               "server_info": [_server("k", 1, {"hostname": "no key field"}), _server("k", 2, {"key": "k",
                                                                                              "future_field": 1})]}
    (entry,) = devices_from_summary(summary)
    assert entry["agents"][0] == "10.0.0.7:1"  # unreadable info: shown as an address, not dropped
    assert entry["agents"][1] == DeviceInfo(key="k")  # fields this version does not know are ignored
    assert (entry["total"], entry["free"], entry["busy"]) == (2, 2, 0)


def test_unverified_agents_and_refused_servers():
    """A DeviceInfo from a connection that did not prove the farm key is not believed; servers the tracker
    refused are listed under their key."""
    unverified = {"key": "server:k", "addr": ["10.0.0.7", 3], "tunefarm": DeviceInfo(key="k", agent_id="a:1").to_json()}
    refused = {"key": "k", "addr": "10.0.0.8:9090", "time": 1.0, "reason": "no farm key (a stock or foreign server)"}
    (entry,) = devices_from_summary({"queue_info": {"k": {"free": 1}}, "server_info": [unverified],
                                     "tunefarm_refused": [refused, "junk"]})
    assert entry["agents"] == ["10.0.0.7:3"] and entry["refused"] == [refused]
