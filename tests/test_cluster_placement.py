"""The cluster mode's pure parts: the `cluster:` section, and the placement decisions (which
Ray nodes get an agent, which daemons each node runs, which node takes a call)."""

import pytest

from modelhost.cluster import placement
from modelhost.cluster.placement import Candidate, NodeInfo
from modelhost.cluster.settings import ClusterConfigError, ClusterSettings, DaemonRule, \
    parse_cluster


# --- the cluster: section -----------------------------------------------------------------


def test_the_cluster_section_is_optional_and_has_defaults():
    settings = parse_cluster("daemons: {a: {}}\n", "f.yaml", ["a"])
    assert settings == ClusterSettings()
    assert settings.rule("a") == DaemonRule(replicas=1, labels=frozenset())


def test_the_cluster_section_is_read():
    text = ("daemons: {a: {}, b: {}}\n"
            "cluster:\n"
            "  frontend: ipc://{runtime_dir}/c.sock\n"
            "  node_label: gpu-box\n"
            "  status_s: 0.25\n"
            "  daemons:\n"
            "    a: {replicas: 2, labels: [tts, big]}\n"
            "    b: {replicas: all}\n")
    settings = parse_cluster(text, "f.yaml", ["a", "b"])
    assert settings.frontend == "ipc://{runtime_dir}/c.sock"
    assert settings.node_label == "gpu-box" and settings.status_s == 0.25
    assert settings.rule("a") == DaemonRule(replicas=2, labels=frozenset({"tts", "big"}))
    assert settings.rule("b") == DaemonRule(replicas=None)


def test_a_bad_cluster_section_names_each_key_and_line():
    text = ("daemons: {a: {}}\n"
            "cluster:\n"
            "  status_s: fast\n"
            "  nodes: 3\n"
            "  daemons:\n"
            "    a: {replicas: 0}\n"
            "    nope: {replicas: 1}\n")
    with pytest.raises(ClusterConfigError) as caught:
        parse_cluster(text, "f.yaml", ["a"])
    assert caught.value.errors == [
        "f.yaml:3: cluster.status_s: expected a number of seconds from 0.05 to 60",
        "f.yaml:4: cluster.nodes: unknown key (expected one of: frontend, node_label, "
        "status_s, daemons)",
        "f.yaml:6: cluster.daemons.a.replicas: expected a number of nodes (1 or more) or all",
        "f.yaml:7: cluster.daemons.nope: no daemon of that name in the daemons section (it has: "
        "a)"]


def test_the_broker_accepts_a_cluster_section_and_leaves_it_alone(tmp_path):
    from modelhost.broker.config import parse_config

    text = ("daemons:\n  a: {engine: 'm:E', python: '3.12'}\n"
            "cluster: {daemons: {a: {replicas: 2}}}\n")
    assert list(parse_config(text, tmp_path / "c.yaml").daemons) == ["a"]


# --- placement ------------------------------------------------------------------------------


def node(name, gpus=1, labels=()):
    return NodeInfo(node_id=name * 8, name=name, address="10.0.0.1", gpus=gpus,
                    labels=frozenset(labels))


def test_node_labels_are_custom_resources_and_ray_labels():
    info = placement.node_info({
        "NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7",
        "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 1.0, "object_store_memory": 1.0,
                      "node:10.0.0.7": 1.0, "node:__internal_head__": 1.0,
                      "accelerator_type:A100": 1.0, "tts": 1.0},
        "Labels": {"ray.io/node-id": "abab", "zone": "b"}})
    assert info.name == "abababab" and info.gpus == 2 and info.address == "10.0.0.7"
    assert info.labels == {"tts", "zone=b"}
    assert placement.wants_agent(info, ClusterSettings())
    assert not placement.wants_agent(node("c", gpus=0), ClusterSettings())
    assert placement.wants_agent(node("c", gpus=0, labels=["box"]),
                                 ClusterSettings(node_label="box"))
    assert not placement.wants_agent(info, ClusterSettings(node_label="box"))


def test_daemons_spread_over_the_nodes_their_labels_allow_up_to_their_replicas():
    settings = ClusterSettings(daemons={
        "tts": DaemonRule(replicas=2, labels=frozenset({"tts"})),
        "video": DaemonRule(replicas=None),
        "asr": DaemonRule(replicas=1)})
    nodes = [node("a", labels=["tts"]), node("b", labels=["tts"]), node("c")]
    plan = placement.plan_daemons(["tts", "video", "asr", "extra"], settings, nodes, {})
    # tts on both tts nodes; video everywhere; asr, then extra (one replica by default),
    # each on the node that runs the fewest so far.
    assert plan == {"a": ["tts", "video", "extra"], "b": ["tts", "video"], "c": ["video", "asr"]}


def test_a_node_that_comes_back_takes_what_its_loss_left_short():
    settings = ClusterSettings(daemons={"tts": DaemonRule(replicas=2)})
    serving = {"b": frozenset({"tts", "asr"})}
    plan = placement.plan_daemons(["tts", "asr"], settings, [node("a")], serving)
    assert plan == {"a": ["tts"]}  # asr has its one replica on b


def row(state="ready", tier="resident", running=0, queued=0, concurrency=1, device="gpu0",
        resident=None, peak=None, held=0):
    return {"state": state, "tier": tier, "running": running, "queued": queued,
            "concurrency": concurrency, "device": device, "memory_bytes": held,
            "footprint": {"declared": {"resident": resident, "peak": peak}, "measured": {}}}


def gpu(threshold, committed):
    return [{"id": "gpu0", "threshold": threshold, "committed": committed}]


def test_a_call_goes_where_its_daemon_is_resident_and_least_loaded():
    cold = Candidate("a", row(state="unloaded", tier="unloaded"), gpu(100, 0))
    busy = Candidate("b", row(running=1), gpu(100, 50))
    idle = Candidate("c", row(), gpu(100, 50))
    assert placement.choose([cold, busy, idle]).node == "c"
    assert placement.choose([cold, busy]).node == "b"
    # The router's own calls in flight count before the node's status shows them, and a
    # status read before the router's last call there ended no longer counts that call.
    assert placement.choose([Candidate("b", row(), in_flight=1),
                             Candidate("c", row(), in_flight=0)]).node == "c"
    assert placement.choose([Candidate("b", row(running=1), row_is_fresh=False),
                             Candidate("c", row(), in_flight=1)]).node == "b"
    assert placement.choose([]) is None


def test_a_load_under_way_beats_a_cold_node_and_a_failed_node_comes_last():
    loading = Candidate("b", row(state="loading", tier="unloaded"))
    cold = Candidate("a", row(state="unloaded", tier="unloaded"))
    failed = Candidate("0", row(state="failed", tier="unloaded"))
    assert placement.choose([cold, loading, failed]).node == "b"
    assert placement.choose([failed, cold]).node == "a"
    assert placement.choose([failed]).node == "0"


def test_where_no_node_has_it_resident_the_call_goes_where_it_fits_with_least_eviction():
    needs = dict(state="unloaded", tier="unloaded", resident=40, peak=10)
    full = Candidate("a", row(**needs), gpu(100, 90))  # needs 50, 10 free: 40 to evict
    roomy = Candidate("b", row(**needs), gpu(100, 70))  # 30 free: 20 to evict
    assert placement.eviction_need(full) == 40 and placement.eviction_need(roomy) == 20
    assert placement.choose([full, roomy]).node == "b"
    fits = Candidate("c", row(**needs), gpu(100, 40))
    assert placement.eviction_need(fits) == 0
    assert placement.choose([full, roomy, fits]).node == "c"
