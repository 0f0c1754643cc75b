"""The audio drama's generation: the daemon calls a script needs (plan_items), the
audio in a daemon's result (decode_audio), the content-addressed cache of generated
items (Cache), and the run of the uncached items on worker threads, one Client each,
with retries (_Generator, _generate). Split out of drama.py unchanged (issue 13).
"""

import collections
import concurrent.futures
import hashlib
import json
import os
import tempfile
import threading
import time

import numpy

from .._client import Client
from ..errors import ModelhostError, RequestError

from .drama_types import SEED_RANGE, STAGES, Item, _event


# --- items -------------------------------------------------------------------------------

def _seed_of(prompt):
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12], 16) % SEED_RANGE


def plan_items(script, options):
    """Every daemon call the script needs, in script order, each kind in its stage."""
    items = []
    for scene in script.scenes:
        for line in scene.lines:
            arguments = dict(line.options)
            arguments["text"] = line.text
            if line.voice:
                arguments["voice"] = line.voice
            items.append(Item("dialogue", line, options.tts_model, options.tts_method,
                              arguments))
        if scene.ambience is not None:
            items.append(Item("ambience", scene.ambience, options.sfx_model,
                              options.sfx_method, _sfx_arguments(
                                  scene.ambience, options.ambience_seconds, options)))
        for effect in scene.effects:
            items.append(Item("effects", effect, options.sfx_model, options.sfx_method,
                              _sfx_arguments(effect, options.effect_seconds, options)))
    return items


def _sfx_arguments(source, default_seconds, options):
    arguments = dict(options.sfx_arguments)
    arguments.update(prompt=source.prompt, duration=float(source.duration or default_seconds),
                     seed=source.seed if source.seed is not None else _seed_of(source.prompt))
    return arguments


def _submission_order(items, order):
    """Stage after stage (by_kind), or round-robin over the stages (interleaved)."""
    if order == "by_kind":
        return sorted(items, key=lambda item: STAGES.index(item.stage))
    queues = [collections.deque(i for i in items if i.stage == stage) for stage in STAGES]
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.popleft())
    return ordered


# --- audio from a daemon's result ---------------------------------------------------------

def decode_audio(result):
    """(float32 frames (n, channels), sample rate) from a TTS or text-to-audio result:
    {"audio": bytes (format "s16le" or "f32le") or an array, "sample_rate", "channels"}."""
    if not isinstance(result, dict) or "audio" not in result or "sample_rate" not in result:
        raise ValueError("the result has no audio and sample_rate: {}".format(
            sorted(result) if isinstance(result, dict) else type(result).__name__))
    audio, rate = result["audio"], int(result["sample_rate"])
    channels = int(result.get("channels") or 1)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        kind = result.get("format", "s16le")
        if kind == "s16le":
            samples = numpy.frombuffer(audio, dtype="<i2").astype(numpy.float32) / 32768.0
        elif kind == "f32le":
            samples = numpy.frombuffer(audio, dtype="<f4").astype(numpy.float32)
        else:
            raise ValueError("audio format {!r} is not one of s16le, f32le".format(kind))
    else:
        samples = numpy.asarray(audio)
        if samples.dtype.kind in "iu":
            scale = float(2 ** (8 * samples.dtype.itemsize - 1))
            samples = samples.astype(numpy.float32) / scale
        samples = samples.astype(numpy.float32)
    if samples.ndim == 1:
        samples = samples[:len(samples) - len(samples) % channels].reshape(-1, channels)
    return numpy.ascontiguousarray(samples, dtype=numpy.float32), rate


# --- the cache ---------------------------------------------------------------------------

class Cache(object):
    """Finished items by key: <dir>/<key[:2]>/<key>.npz (samples, rate, what it was)."""

    def __init__(self, directory, enabled=True):
        self.directory = directory
        self.enabled = enabled

    def _path(self, key):
        return os.path.join(self.directory, key[:2], key + ".npz")

    def get(self, item):
        if not self.enabled:
            return None
        path = self._path(item.key)
        try:
            with numpy.load(path, allow_pickle=False) as data:
                return numpy.array(data["samples"], dtype=numpy.float32), int(data["rate"])
        except (OSError, KeyError, ValueError):
            return None  # absent or unreadable: generated again, then rewritten

    def put(self, item, samples, rate):
        if not self.enabled:
            return
        path = self._path(item.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = json.dumps({"model": item.model, "method": item.method,
                           "arguments": item.arguments, "where": item.where})
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz",
                                             dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "wb") as out:
                numpy.savez(out, samples=samples, rate=numpy.int64(rate),
                            meta=numpy.array(meta))
            os.replace(temporary, path)  # atomic: a reader sees all of it or nothing
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise


# --- generation --------------------------------------------------------------------------

class _Outcome(object):
    def __init__(self, item, samples=None, rate=None, cached=False, attempts=0, error=None,
                 retried=True):
        self.item = item
        self.samples = samples
        self.rate = rate
        self.cached = cached
        self.attempts = attempts
        self.error = error
        self.retried = retried


class _Generator(object):
    """Runs the items on `workers` threads, each with its own Client."""

    def __init__(self, options, cache, on_event):
        self.options = options
        self.cache = cache
        self.on_event = on_event
        self._local = threading.local()
        self._clients = []  # list.append is atomic: closed at the end

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.options.endpoint)
            self._local.client = client
            self._clients.append(client)
        return client

    def close(self):
        for client in self._clients:
            client.close()

    def run_one(self, item):
        options = self.options
        attempt = 0
        while True:
            attempt += 1
            self.on_event(_event("item_start", item.stage, item, attempt=attempt))

            def progress(report, item=item):
                self.on_event(_event("item_progress", item.stage, item,
                                     fraction=report.fraction,
                                     message=" ".join(filter(None, [report.stage,
                                                                    report.message]))))
            try:
                result = self._client().call(item.model, item.method, timeout=options.timeout,
                                             on_progress=progress, priority=options.priority,
                                             arguments=item.arguments)
                samples, rate = decode_audio(result)
                if len(samples) == 0:
                    raise ValueError("the daemon returned no audio")
            except RequestError as exc:  # resending cannot fix it
                return _Outcome(item, attempts=attempt, error=exc, retried=False)
            except (ModelhostError, ValueError) as exc:
                if attempt > options.retries:
                    return _Outcome(item, attempts=attempt, error=exc)
                self.on_event(_event("item_retry", item.stage, item, attempt=attempt,
                                     error=exc))
                time.sleep(options.retry_delay_s * attempt)
                continue
            self.cache.put(item, samples, rate)
            return _Outcome(item, samples, rate, attempts=attempt)


def _generate(items, options, cache, on_event, result):
    """({key: _Outcome}, [failed _Outcome]): from the cache, else from the daemons."""
    totals = collections.Counter(item.stage for item in items)
    done = collections.Counter()
    for stage in STAGES:
        on_event(_event("stage_start", stage, total=totals[stage], done=0))
        if totals[stage] == 0:
            on_event(_event("stage_done", stage, done=0, total=0))
    outcomes = {}

    def finished(item, outcome):
        stage = item.stage
        done[stage] += 1
        kind = "item_failed" if outcome.error is not None else (
            "item_cached" if outcome.cached or outcome.item is not item else "item_done")
        on_event(_event(kind, stage, item, done=done[stage], total=totals[stage],
                        attempt=outcome.attempts, error=outcome.error))
        if done[stage] == totals[stage]:
            on_event(_event("stage_done", stage, done=done[stage], total=totals[stage]))

    # The same call twice in a script (a repeated line, a recurring effect) is made once.
    first_of = collections.OrderedDict()
    for item in _submission_order(items, options.order):
        first_of.setdefault(item.key, item)
    to_run = []
    for key, item in first_of.items():
        hit = cache.get(item)
        if hit is None:
            to_run.append(item)
        else:
            outcomes[key] = _Outcome(item, hit[0], hit[1], cached=True)
            finished(item, outcomes[key])
    generator = _Generator(options, cache, on_event)
    try:
        if to_run:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(int(options.workers), len(to_run)),
                    thread_name_prefix="drama") as pool:
                futures = [pool.submit(generator.run_one, item) for item in to_run]
                for future in concurrent.futures.as_completed(futures):
                    outcome = future.result()
                    result.calls += outcome.attempts
                    outcomes[outcome.item.key] = outcome
                    finished(outcome.item, outcome)
    finally:
        generator.close()
    for item in items:
        if first_of[item.key] is not item:
            finished(item, outcomes[item.key])
    failed = [outcome for outcome in outcomes.values() if outcome.error is not None]
    return outcomes, failed
