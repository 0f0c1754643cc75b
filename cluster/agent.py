"""The node agent: a Ray actor pinned to one GPU node, holding that node's GPUs.

It runs the node's own modelhost (`modelhost.cluster.node`: setup, then `modelhost up`)
as a child process, with its own runtime dir, and is that broker's one client: the
router's calls reach it as actor calls, and it relays each one to its broker over ipc,
raw (header and payload frames as they are, only the request id its own): `begin`
answers with the first replies, `rest` (an async generator, which Ray streams item by
item) with the batches after them. It publishes its broker's `ps` for the router, read
again every `status_s`.

Nothing here imports Ray: `ray.remote(NodeAgent)` is applied by the node watcher.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time

from modelhost import protocol
from modelhost._async_client import AsyncClient
from modelhost.errors import Cancelled, ModelhostError

from . import node as node_process

# A node process that exits is started again after this (doubling, capped).
RESTART_BACKOFF_S = (1.0, 30.0)
# How long a new agent waits for the node process of an agent before it to exit.
PREVIOUS_EXIT_S = 60.0
STOP_S = 30.0
LOG_TAIL_BYTES = 4000
# Cancels that arrived before their call: remembered, the oldest forgotten first.
EARLY_CANCELS = 1024


class _BrokerLink(AsyncClient):
    """The agent's client of its node's broker, relaying requests raw."""

    async def relay(self, header: dict, payloads: list, on_id):
        """Yield the frames of each reply to one tracked request (call, load, unload, pin,
        unpin) until its terminal reply; an error is an error reply too. The request goes
        on as the router's client sent it, with only its id this link's own."""
        local_id = self._new_id()
        on_id(local_id)
        frames = protocol.encode(dict(header, id=local_id), payloads)
        try:
            async for reply, payload_frames in self._exchange(local_id, frames,
                                                              header.get("timeout")):
                yield protocol.encode(reply, payload_frames)
        except Cancelled as exc:
            yield protocol.cancelled_reply(local_id, exc.message)
        except ModelhostError as exc:
            yield protocol.error_reply(local_id, exc)


class NodeAgent:
    def __init__(self, spec: dict):
        """spec: node (its name), config_text and config_path (the cluster's configuration),
        daemons (what this node runs), setup (run `modelhost setup` first), status_s."""
        self.spec = spec
        self.paths = None
        self.process = None
        self.link = None
        self.started_at = time.time()
        self.status = None  # the broker's last `ps`
        self.status_at = None
        self.problem = "starting"  # why there is no status, for `modelhost cluster ps`
        self.exits = 0
        self.calls = {}  # router key -> local request id
        self.relays = {}  # router key -> queue of its replies not yet taken (None: the end)
        self.tasks = set()
        self.early_cancels = collections.OrderedDict()
        self.watcher = None

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> dict:
        """Write the node's configuration and start its process; returns where things are.

        Returns at once: the broker answers once setup is done (minutes on a fresh node)."""
        spec = self.spec
        self.paths = node_process.prepare(spec["config_text"], spec.get("config_path"),
                                          spec["node"], list(spec["daemons"]))
        await self._wait_for_previous()
        self.link = _BrokerLink(self.paths["frontend"], broker_timeout=30.0)
        self._start_process()
        self.watcher = asyncio.ensure_future(self._watch())
        return dict(self.paths, agent_pid=os.getpid())

    def _start_process(self) -> None:
        command = [sys.executable, "-m", "modelhost.cluster.node", "--config",
                   self.paths["config"], "--parent-pid", str(os.getpid())]
        if self.spec.get("setup", True):
            command += ["--setup", "--setup-lock", self.paths["setup_lock"]]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Ray sets it to the actor's CPUs (1 for this one): not the daemons' business.
        env.pop("OMP_NUM_THREADS", None)
        with open(self.paths["log"], "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        with open(self.paths["pidfile"], "w") as handle:
            handle.write(str(self.process.pid))

    async def _wait_for_previous(self) -> None:
        """A node process left by an agent that died stops within a second or so (it
        watches its agent), then stops its daemons: wait, so that two brokers never
        serve one runtime dir."""
        try:
            with open(self.paths["pidfile"]) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + PREVIOUS_EXIT_S
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if _alive(pid):
            _kill_group(pid, signal.SIGKILL)

    async def _watch(self) -> None:
        """Read the broker's status every status_s; start the node process again when it
        exits (after a backoff)."""
        interval = float(self.spec.get("status_s", 0.5))
        backoff = RESTART_BACKOFF_S[0]
        while True:
            code = self.process.poll()
            if code is not None:
                self.exits += 1
                self.status = None
                self.problem = "the node process exited with {}; starting it again in {:.0f}s; " \
                               "its output: {}".format(code, backoff, self.paths["log"])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
                self._start_process()
                continue
            try:
                self.status = await self.link.ps(timeout=max(2.0, interval * 4))
                self.status_at = time.time()
                self.problem = None
            except ModelhostError:
                self.status = None
                self.problem = "setting up or starting its broker (output: {})".format(
                    self.paths["log"])
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """Stop the node's process (its supervisor stops the daemons first)."""
        if self.watcher is not None:
            self.watcher.cancel()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_S
            while self.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.process.poll() is None:
                _kill_group(self.process.pid, signal.SIGKILL)
        if self.link is not None:
            await self.link.aclose()

    # --- what the router asks -------------------------------------------------

    async def published(self) -> dict:
        """This node as `modelhost cluster ps` shows it, with its broker's last `ps`."""
        return {"node": self.spec["node"], "agent_pid": os.getpid(),
                "node_pid": self.process.pid if self.process is not None else None,
                "daemons": list(self.spec["daemons"]), "status": self.status,
                "status_age_s": None if self.status_at is None else time.time() - self.status_at,
                "problem": self.problem, "exits": self.exits,
                "runtime_dir": (self.paths or {}).get("runtime_dir"),
                "log_tail": self._log_tail() if self.status is None else None}

    async def begin(self, key, header_frame: bytes, payloads: list) -> tuple[list, bool]:
        """Send one request from the router to the broker; returns (replies, done) as soon
        as there is a reply: a call without progress costs the router one actor call.
        The rest, when not done, come from `rest`. A reply is its frames as bytes: headers
        cross Ray packed, as on the wire (Ray's own msgpack would take the payload
        references in them for its own)."""
        queue = self.relays[key] = asyncio.Queue()
        header = protocol.decode_header(header_frame)
        self._spawn(self._pump(key, header, payloads, queue))
        return await self._batch(key, queue)

    async def rest(self, key):
        """The replies after `begin`'s, in batches of what has come, up to the terminal one."""
        queue = self.relays.get(key)
        while queue is not None:
            replies, done = await self._batch(key, queue)
            yield replies, done
            if done:
                return

    async def _batch(self, key, queue) -> tuple[list, bool]:
        replies = [await queue.get()]
        while not queue.empty():
            replies.append(queue.get_nowait())
        done = replies[-1] is None
        if done:
            replies.pop()
            self.relays.pop(key, None)
        return replies, done

    async def _pump(self, key, header: dict, payloads: list, queue) -> None:
        def on_id(local_id):
            self.calls[key] = local_id
            if self.early_cancels.pop(key, None):
                # Runs at the relay's first wait, once the request has left.
                self._spawn(self.link.cancel(local_id))

        try:
            async for frames in self.link.relay(header, payloads, on_id):
                queue.put_nowait([part.bytes if hasattr(part, "bytes") else bytes(part)
                                  for part in frames])
        finally:
            self.calls.pop(key, None)
            queue.put_nowait(None)  # the end: the terminal reply was the one before

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel(self, key) -> None:
        local_id = self.calls.get(key)
        if local_id is not None:
            await self.link.cancel(local_id)
            return
        self.early_cancels[key] = True
        while len(self.early_cancels) > EARLY_CANCELS:
            self.early_cancels.popitem(last=False)

    def _log_tail(self) -> str | None:
        try:
            with open(self.paths["log"], "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
                return handle.read().decode(errors="replace")
        except (OSError, TypeError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/{}/stat".format(pid)) as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
