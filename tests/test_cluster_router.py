"""The cluster router's side of the wire, against fake node agents (no Ray processes): the
existing AsyncClient at its endpoint, replies under the client's own ids, streams, cancels,
and a node whose agent dies under a call."""

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

import modelhost
from modelhost import protocol
from modelhost.cluster.nodes import Node, Nodes, NodeState
from modelhost.cluster.placement import NodeInfo
from modelhost.cluster.router import Router
from modelhost.cluster.settings import ClusterSettings

ray_exceptions = pytest.importorskip("ray.exceptions")


def packed(header, payloads=()):
    return [bytes(part) for part in protocol.encode(header, payloads)]


class Remote(object):
    """What `actor.method.remote` gives a test: the fake's coroutine or stream."""

    def __init__(self, function):
        self.function = function

    def remote(self, *args):
        result = self.function(*args)
        # Like Ray, the work starts now, awaited or not.
        return asyncio.ensure_future(result) if asyncio.iscoroutine(result) else result


class Batches(object):
    """An ObjectRefGenerator's shape: each __anext__ gives something to await."""

    def __init__(self, queue):
        self.queue = queue

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        future = asyncio.get_running_loop().create_future()
        future.set_result(item)
        return future


class FakeAgent(object):
    """Answers each request with what `script(header, payloads)` returns: a list of replies
    (each a header dict, or (header, payloads), or an exception to raise), the first
    given from begin, the rest streamed one batch each."""

    def __init__(self, script):
        self.script = script
        self.cancelled = []
        self.queues = {}
        self.begin = Remote(self._begin)
        self.rest = Remote(lambda key: Batches(self.queues[key]))
        self.cancel = Remote(self._cancel)

    async def _begin(self, key, frame, payloads):
        header = protocol.decode_header(frame)
        replies = list(self.script(header, payloads))
        queue = self.queues[key] = asyncio.Queue()
        first = replies.pop(0)
        if isinstance(first, BaseException):
            raise first
        for reply in replies:
            queue.put_nowait(reply if isinstance(reply, BaseException) else (
                [self._pack(reply, header)], False))
        kind = (first[0] if isinstance(first, tuple) else first)["kind"]
        return [self._pack(first, header)], not replies and kind in protocol.TERMINAL_KINDS

    @staticmethod
    def _pack(reply, request):
        header, payloads = reply if isinstance(reply, tuple) else (reply, [])
        return packed(dict(header, id="local-1"), payloads)

    async def _cancel(self, key):
        self.cancelled.append(key)
        self.queues[key].put_nowait(([packed({"kind": "cancelled", "id": "local-1",
                                              "message": "the call was cancelled"})], True))


def row(name, state="ready"):
    return {"name": name, "state": state, "tier": "resident", "running": 0, "queued": 0,
            "concurrency": 1, "device": "host", "pid": 100}


def node(name, agent, daemons=("echo",), state=NodeState.UP):
    info = NodeInfo(node_id=name * 4, name=name, address="10.0.0.1", gpus=1,
                    labels=frozenset())
    status = {"broker": {"pid": 1}, "memory": {"devices": [{"id": "host", "name": "host"}]},
              "daemons": [row(d) for d in daemons]}
    return Node(info=info, daemons=list(daemons), agent=agent, state=state,
                published={"status": status, "agent_pid": 7})


@pytest.fixture
def run_router():
    """run_router(nodes, test) runs `test(client, router)` against a Router serving `nodes`."""
    def run(nodes, test):
        directory = Path(tempfile.mkdtemp(prefix="mh-r-", dir="/tmp"))
        endpoint = "ipc://{}/run/frontend.sock".format(directory)
        table = Nodes(None, ClusterSettings(), "", None, ["echo", "other"])
        for entry in nodes:
            table.nodes[entry.info.node_id] = entry

        async def main():
            router = Router(table, endpoint)
            router.bind()
            serving = asyncio.ensure_future(router.serve())
            client = modelhost.AsyncClient(endpoint)
            try:
                return await asyncio.wait_for(test(client, router), 30)
            finally:
                await client.aclose()
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
        try:
            return asyncio.run(main())
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return run


def echo_script(header, payloads):
    value = protocol.internalize(header["args"], payloads)
    frames = []
    result = protocol.externalize(value.get("data"), frames)
    return [{"kind": "progress", "fraction": 0.5, "stage": "half"},
            ({"kind": "result", "value": result}, frames)]


def test_a_call_goes_to_a_node_and_comes_back_under_the_clients_id(run_router):
    agent = FakeAgent(echo_script)

    async def test(client, router):
        progress = []
        data = bytes(range(256)) * 1000
        assert await client.call("echo", "echo", data=data, on_progress=progress.append) == data
        assert [p.stage for p in progress] == ["half"]
        status = await client.ps()
        assert status["broker"]["cluster"] is True
        assert [(r["name"], r["node"], r["device"]) for r in status["daemons"]] == \
            [("echo", "a", "a/host")]
        assert status["nodes"][0]["served"] == 1
        with pytest.raises(modelhost.UnknownModel, match="no daemon named 'nope'"):
            await client.call("nope", "x")
        with pytest.raises(modelhost.DaemonUnavailable, match="no node runs 'other' yet"):
            await client.call("other", "x")
    run_router([node("a", agent)], test)


def test_streams_pass_through_and_a_cancel_reaches_the_node(run_router):
    def script(header, payloads):
        if header["method"] == "chunks":
            return [{"kind": "partial", "value": i} for i in range(3)] + [
                {"kind": "result", "value": 3}]
        return [{"kind": "progress", "fraction": 0.1}]  # runs until cancelled

    agent = FakeAgent(script)

    async def test(client, router):
        assert [chunk async for chunk in client.stream("echo", "chunks")] == [0, 1, 2]
        task = asyncio.ensure_future(client.call("echo", "forever"))
        while not any(r.node for r in router.requests.values()):
            await asyncio.sleep(0.01)
        key = next(iter(router.requests.values())).key
        task.cancel()  # the AsyncClient cancels the remote work
        await asyncio.gather(task, return_exceptions=True)
        while agent.cancelled != [key]:
            await asyncio.sleep(0.01)
    run_router([node("a", agent)], test)


def test_a_node_lost_under_a_call_ends_it_with_daemon_crashed_and_takes_no_more(run_router):
    lost = FakeAgent(lambda header, payloads: [
        {"kind": "progress", "fraction": 0.1},
        ray_exceptions.ActorDiedError()])
    alive = FakeAgent(lambda header, payloads: [{"kind": "result", "value": "b"}])
    a, b = node("a", lost), node("b", alive)

    async def test(client, router):
        b.in_flight["echo"] = 1  # a looks less loaded: the first call goes there
        with pytest.raises(modelhost.DaemonCrashed, match="node a .* was lost") as caught:
            await client.call("echo", "x")
        assert caught.value.details["node"] == "a"
        assert a.state is NodeState.LOST and "its agent died" in a.reason
        b.in_flight["echo"] = 0
        assert await client.call("echo", "x") == "b"
        assert [n["state"] for n in (await client.ps())["nodes"]] == ["lost", "up"]
    run_router([a, b], test)


def test_a_call_waits_for_a_starting_node_and_ops_the_router_does_not_take(run_router):
    starting = node("a", FakeAgent(lambda header, payloads: [
        {"kind": "result", "value": "up"}]), state=NodeState.STARTING)

    async def test(client, router):
        call = asyncio.ensure_future(client.call("echo", "x"))
        await asyncio.sleep(0.3)
        assert not call.done()
        starting.state = NodeState.UP
        router.nodes.changed.set()
        assert await call == "up"
        with pytest.raises(modelhost.Timeout, match="came up within the request's timeout"):
            starting.state = NodeState.STARTING
            await client.call("echo", "x", timeout=0.5)
        # A supervisor report, on a socket of its own: only a node's supervisor sends those.
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(router.endpoint)
        try:
            await socket.send_multipart(protocol.supervisor_message("s1", {}, "t"))
            reply = protocol.decode(await socket.recv_multipart())[0]
        finally:
            socket.close()
        assert reply["kind"] == "error" and reply["code"] == "bad_message"
        assert "does not take 'supervisor'" in reply["message"]
    run_router([starting], test)
