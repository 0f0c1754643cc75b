"""The audio drama pipeline (modelhost.pipelines): its mixing functions on synthetic signals,
the script checks, the timeline, and `modelhost audio-drama` end to end through a real
`modelhost up`.

End to end, speech comes from the real espeak-ng engine (the embedded default's
engine, run on the host interpreter) and ambience and effects from a
text-to-audio STAND-IN (tests/engines/ambience_standin_engine.py: TangoFlux's
`generate` signature, band-passed noise for ambience, a tone burst for
effects). The mix is checked by measurement: loudness per stem, ducking depth,
peaks, the lines' and effects' positions against the timeline the pipeline
writes, and the cache on a re-run (counted from the broker's request events).
"""

import json
import math
import subprocess
import sys
import threading
import time

import pytest

numpy = pytest.importorskip("numpy")
soundfile = pytest.importorskip("soundfile")
pytest.importorskip("soxr")
pytest.importorskip("pyloudnorm")

from modelhost.pipelines import mixing  # noqa: E402
from modelhost.pipelines.drama import DramaOptions, build_timeline, render_drama  # noqa: E402
from modelhost.pipelines.script import ScriptError, load_script  # noqa: E402

from conftest import daemon_yaml  # noqa: E402

RATE = 44100


def tone(seconds, frequency=440.0, amplitude=0.5, rate=RATE):
    t = numpy.arange(int(seconds * rate)) / float(rate)
    return (amplitude * numpy.sin(2 * numpy.pi * frequency * t)).astype(numpy.float32)


def noise(seconds, channels=2, seed=0, amplitude=0.1, rate=RATE):
    rng = numpy.random.default_rng(seed)
    return (amplitude * rng.standard_normal((int(seconds * rate), channels))).astype(
        numpy.float32)


def rms_db(frames):
    frames = numpy.asarray(frames, dtype=numpy.float64)
    return 10 * math.log10(max(1e-20, float((frames ** 2).mean())))


# --- mixing functions ------------------------------------------------------------------


def test_loudness_normalization_hits_its_target_also_for_a_short_clip():
    for clip in (tone(3.0), tone(0.15, 1000.0), noise(2.0)):
        level, gain = mixing.normalize_loudness(clip, RATE, -23.0)
        assert abs(mixing.loudness(level, RATE) - (-23.0)) < 0.05
        assert math.isfinite(gain)
    silent, gain = mixing.normalize_loudness(numpy.zeros(RATE, numpy.float32), RATE, -23.0)
    assert gain == 0.0 and not numpy.any(silent)
    assert mixing.loudness(numpy.zeros(RATE), RATE) == float("-inf")


def test_equal_power_pan_keeps_the_power_and_places_the_sound():
    mono = tone(1.0)
    for pan in (-1.0, -0.4, 0.0, 0.7, 1.0):
        stereo = mixing.to_stereo(mono, pan)
        assert stereo.shape == (len(mono), 2)
        power = (stereo.astype(numpy.float64) ** 2).sum(axis=1)
        assert numpy.allclose(power, mono.astype(numpy.float64) ** 2, atol=1e-6)
    left = mixing.to_stereo(mono, -1.0)
    assert numpy.abs(left[:, 1]).max() < 1e-6
    centre = mixing.to_stereo(mono, 0.0)
    assert numpy.allclose(centre[:, 0], centre[:, 1])
    assert abs(rms_db(centre[:, 0]) - rms_db(mono) + 3.01) < 0.05  # -3 dB per side
    stereo_in = noise(0.5)
    assert mixing.to_stereo(stereo_in, 0.5) is stereo_in  # stereo passes through


def test_resample_changes_the_rate_and_keeps_the_tone():
    clip = tone(1.0, 1000.0, rate=22050)
    up = mixing.resample(clip, 22050, 44100)
    assert up.shape == (44100, 1)
    spectrum = numpy.abs(numpy.fft.rfft(up[:, 0]))
    assert abs(numpy.argmax(spectrum) * 44100 / float(len(up)) - 1000.0) < 2.0
    assert mixing.resample(up, 44100, 44100) is not None


def test_fades_ramp_from_and_to_silence():
    clip = numpy.ones((RATE, 2), numpy.float32)
    faded = mixing.fade(clip, RATE, 0.1, 0.2)
    assert faded[0, 0] == 0.0 and abs(faded[-1, 0]) < 1e-6
    assert faded[int(0.1 * RATE):-int(0.2 * RATE)].min() == 1.0
    assert numpy.all(numpy.diff(faded[:int(0.1 * RATE), 0]) >= 0)
    assert numpy.all(numpy.diff(faded[-int(0.2 * RATE):, 0]) <= 0)
    assert not numpy.any(clip != 1.0)  # a copy


def test_a_looped_bed_has_no_seam_in_its_level():
    bed = noise(2.0, seed=3)
    looped = mixing.loop_to_length(bed, RATE, int(7.3 * RATE), crossfade_s=0.5)
    assert looped.shape == (int(7.3 * RATE), 2)
    assert numpy.array_equal(looped[:RATE], bed[:RATE])
    window = int(0.1 * RATE)
    levels = [rms_db(looped[i:i + window]) for i in range(0, len(looped) - window, window)]
    assert max(levels) - min(levels) < 1.5  # equal-power crossfades: no dip, no bump
    assert numpy.array_equal(mixing.loop_to_length(bed, RATE, RATE), bed[:RATE])


def test_trim_silence_cuts_both_ends_and_keeps_a_little():
    clip = numpy.concatenate([numpy.zeros(RATE // 2), tone(1.0), numpy.zeros(RATE)])
    trimmed, cut = mixing.trim_silence(clip, RATE, keep_s=0.02)
    assert abs(cut - (RATE // 2 - int(0.02 * RATE))) <= 1
    assert abs(len(trimmed) - (RATE + 2 * int(0.02 * RATE))) <= 2
    silent = numpy.zeros(100, numpy.float32)
    assert len(mixing.trim_silence(silent, RATE)[0]) == 100


def test_duck_gain_ducks_under_the_key_with_lookahead_attack_hold_and_release():
    key = numpy.zeros(4 * RATE, numpy.float32)
    key[RATE:2 * RATE] = tone(1.0, 200.0, 0.3)
    gain = mixing.duck_gain(key, RATE, depth_db=12.0, attack_s=0.1, release_s=0.5,
                            hold_s=0.2)
    db = 20 * numpy.log10(gain)
    assert abs(db[int(0.5 * RATE)]) < 0.01  # before: untouched
    # Half way down 50 ms early (look-ahead), give or take the detector's 10 ms.
    assert abs(db[int(0.95 * RATE)] + 6.0) < 1.5
    assert db[RATE] < -11.5  # fully down as the key starts
    assert abs(db[int(1.5 * RATE)] + 12.0) < 0.01
    assert db[int(2.15 * RATE)] < -11.5  # held
    assert -8.0 < db[int(2.45 * RATE)] < -4.0  # rising: 12 dB over 0.5 s
    assert abs(db[int(3.0 * RATE)]) < 0.01  # back
    assert numpy.all(gain <= 1.0)


def test_limiter_keeps_the_true_peak_under_the_ceiling_and_leaves_quiet_audio_alone():
    quiet = noise(1.0, amplitude=0.05)
    out, reduction = mixing.limit(quiet, RATE, -1.0)
    assert numpy.array_equal(out, quiet) and reduction == 0.0
    loud = noise(3.0, amplitude=0.1, seed=5)
    loud[RATE:RATE + 400] *= 12.0  # a burst far over full scale
    # A tone at a quarter of the rate, 45 degrees off the samples: its peaks fall
    # between them, 3 dB over the sample peak.
    n = numpy.arange(RATE)
    between = 0.98 * numpy.sin(numpy.pi / 2 * n + numpy.pi / 4)
    loud[2 * RATE:] += numpy.stack([between, between], axis=1).astype(numpy.float32)
    out, reduction = mixing.limit(loud, RATE, -1.0)
    assert mixing.true_peak_db(out) <= -1.0 + 1e-3
    assert numpy.abs(out).max() < 1.0
    assert reduction > 10.0
    # Away from the burst (past look-ahead and release) the level is untouched.
    assert abs(rms_db(out[int(0.5 * RATE):int(0.9 * RATE)])
               - rms_db(loud[int(0.5 * RATE):int(0.9 * RATE)])) < 0.01


def test_true_peak_sees_between_the_samples():
    n = numpy.arange(RATE)
    between = numpy.sin(numpy.pi / 2 * n + numpy.pi / 4).astype(numpy.float32)
    assert abs(numpy.abs(between).max() - 0.7071) < 1e-3
    assert 0.98 < mixing.true_peak(between) < 1.03


# --- the script --------------------------------------------------------------------------


def test_script_problems_are_all_named_by_their_place():
    with pytest.raises(ScriptError) as caught:
        load_script({
            "speakers": {"Ada": {"voice": "en", "pan": 3}},
            "scenes": [
                {"lines": [{"speaker": "Ada", "text": "fine"},
                           {"speaker": "Bob", "text": "who?"},
                           {"speaker": "Ada", "text": "", "paws_after": 1}],
                 "effects": [{"prompt": "bang", "line": 5}, {"at": 1.0}]},
                {"ambience": {"prompt": "rain"}},
                "not a scene",
            ]})
    problems = caught.value.problems
    expected = [
        "speakers.Ada.pan: must be from -1 to 1, got 3",
        "scenes[0].lines[1].speaker: 'Bob' is not one of the speakers (Ada)",
        "scenes[0].lines[2].paws_after: unknown key; did you mean 'pause_after'?",
        'scenes[0].lines[2].text: expected a non-empty string, got ""',
        "scenes[0].effects[0].line: scene 0 has 3 lines (0 to 2), there is no line 5",
        "scenes[0].effects[1].prompt: required: a non-empty string",
        "scenes[1]: a scene without lines needs `min_duration` (seconds)",
        "scenes[2]: expected an object, got a string",
    ]
    assert problems == expected
    assert "the script has 8 problems" in str(caught.value)
    with pytest.raises(ScriptError, match="not valid JSON"):
        load_script("{nope")
    with pytest.raises(ScriptError, match="scenes: required"):
        load_script({"title": "empty"})


def test_a_valid_script_takes_speaker_defaults_and_line_overrides():
    script = load_script({
        "speakers": {"Ada": {"voice": "en-us", "pan": -0.5, "options": {"rate": 150}}},
        "scenes": [{"ambience": "rain", "lines": [
            {"speaker": "Ada", "text": "one"},
            {"speaker": "Ada", "text": "two", "voice": "en-gb", "pan": 0.5,
             "options": {"pitch": 30}}]}]})
    first, second = script.lines
    assert (first.voice, first.pan, first.options) == ("en-us", -0.5, {"rate": 150})
    assert (second.voice, second.pan, second.options) == ("en-gb", 0.5,
                                                          {"rate": 150, "pitch": 30})
    assert script.scenes[0].ambience.prompt == "rain"


# --- the timeline ------------------------------------------------------------------------


def test_timeline_places_lines_by_their_real_lengths_and_effects_by_their_anchors():
    script = load_script({"scenes": [
        {"ambience": "rain", "lead_in": 1.0, "gap": 0.5, "tail": 2.0, "lines": [
            {"speaker": "A", "text": "one"},
            {"speaker": "B", "text": "two", "pause_after": 1.25},
            {"speaker": "A", "text": "three"}],
         "effects": [{"prompt": "bang", "at": 0.25},
                     {"prompt": "door", "line": 1, "anchor": "end", "at": 0.1},
                     {"prompt": "early", "line": 0, "at": -5.0}]},
        {"min_duration": 3.0, "effects": [{"prompt": "late", "at": 4.0}]}]})
    rate = 1000
    scene = script.scenes[0]
    clips = {scene.lines[0]: numpy.zeros((1500, 2)), scene.lines[1]: numpy.zeros((700, 2)),
             scene.lines[2]: numpy.zeros((300, 2)), scene.ambience: numpy.zeros((9000, 2))}
    for index, length in enumerate((200, 300, 100)):
        clips[scene.effects[index]] = numpy.zeros((length, 2))
    clips[script.scenes[1].effects[0]] = numpy.zeros((500, 2))
    timeline = build_timeline(script, clips, DramaOptions(sample_rate=rate))
    first, second = timeline["scenes"]
    assert [(l["start"], l["end"]) for l in first["lines"]] == [
        (1.0, 2.5), (3.0, 3.7), (4.95, 5.25)]
    assert first["end"] == 7.25 and first["ambience"]["end"] == 7.25
    assert [(e["start"], e["anchor"], e["clamped"]) for e in first["effects"]] == [
        (0.25, "scene start", False), (3.8, "line 1 end", False), (0.0, "line 0 start", True)]
    # An effect past min_duration makes the scene longer; scenes follow each other.
    assert (second["start"], second["end"]) == (7.25, 11.75)
    assert second["effects"][0]["start"] == 11.25
    assert timeline["duration"] == 11.75 and timeline["frames"] == 11750


# --- end to end through `modelhost up` ----------------------------------------------------

SCRIPT = {
    "title": "The harbour light",
    "speakers": {"Ada": {"voice": "en-us", "pan": -0.4},
                 "Ben": {"voice": "en-gb", "pan": 0.4, "options": {"rate": 190}}},
    "scenes": [
        {"name": "harbour",
         "ambience": {"prompt": "harbour at night, water against stone", "duration": 6},
         "lead_in": 1.5, "gap": 2.0, "tail": 1.5,
         "lines": [{"speaker": "Ada", "text": "The boat is late again tonight"},
                   {"speaker": "Ben", "text": "It always comes back in the end"},
                   {"speaker": "Ada", "text": "Then we wait by the light"}],
         "effects": [{"prompt": "a bell rings once", "at": 0.5},
                     {"prompt": "a door creaks shut", "line": 1, "anchor": "end",
                      "at": 0.6}]},
        {"name": "lamp room", "ambience": "wind in a lamp room, glass rattling",
         "lead_in": 1.2, "gap": 2.0,
         "lines": [{"speaker": "Ben", "text": "Light the lamp now"},
                   {"speaker": "Ada", "text": "It is lit"}],
         "effects": [{"prompt": "a match strikes", "line": 0, "at": -0.4}]},
    ],
}
ITEMS = 5 + 2 + 3  # lines, ambiences, effects


@pytest.fixture(scope="module")
def drama_host(tmp_path_factory):
    from conftest import Host

    calls_log = tmp_path_factory.mktemp("drama-calls") / "calls.jsonl"
    host = Host([
        daemon_yaml("espeak", engine="modelhost.daemons.espeak.engine:EspeakEngine",
                    options="{voice: en}"),
        daemon_yaml("ambience", engine="ambience_standin_engine:AmbienceStandInEngine",
                    options="{{calls_log: {}, call_s: 0.2}}".format(json.dumps(str(calls_log))),
                    max_payload="64MiB"),
    ]).start()
    host.calls_log = calls_log
    try:
        host.wait_ready("espeak", "ambience", timeout=60)
        yield host
    finally:
        host.stop()


def drama_cli(host, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "modelhost", "audio-drama", *args,
                           "--endpoint", host.endpoint, "--sfx", "ambience"],
                          capture_output=True, text=True, timeout=timeout)


def logged_calls(host):
    if not host.calls_log.exists():
        return []
    return [json.loads(line) for line in host.calls_log.read_text().splitlines()]


class RequestCounter(object):
    """Counts the broker's `request` events (one per finished call, any daemon) from a
    subscription that is proven live by a call of its own first."""

    def __init__(self, host):
        self.host = host
        self.seen = []
        self._stream = host.client().events(kinds=["request"], timeout=2.0)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        with host.client() as client:
            deadline = time.monotonic() + 10
            while not any(e.get("method") == "voices" for e in self.seen):
                client.call("espeak", "voices")
                assert time.monotonic() < deadline, "the event subscription never saw a call"
                time.sleep(0.2)
        time.sleep(0.3)
        self.seen.clear()

    def _read(self):
        for event in self._stream:
            self.seen.append(event)

    def stop(self):
        time.sleep(1.0)  # events of calls just finished
        return [e for e in self.seen if e.get("method") != "voices"]


def onsets(frames, rate, relative_db=-30.0, quiet_s=0.15, hop_s=0.002):
    """Times where the level rises above peak + relative_db after quiet_s below it."""
    level = numpy.abs(frames).max(axis=1)
    hop = int(hop_s * rate)
    envelope = level[:len(level) // hop * hop].reshape(-1, hop).max(axis=1)
    threshold = envelope.max() * 10 ** (relative_db / 20.0)
    found, quiet = [], int(quiet_s / hop_s)
    below = quiet
    for i, value in enumerate(envelope):
        if value > threshold:
            if below >= quiet:
                found.append(i * hop / float(rate))
            below = 0
        else:
            below += 1
    return found


@pytest.mark.slow
def test_audio_drama_end_to_end_measured_then_cached(drama_host, tmp_path):
    script_path = tmp_path / "drama.json"
    script_path.write_text(json.dumps(SCRIPT))
    out, stems, cache = tmp_path / "drama.wav", tmp_path / "stems", tmp_path / "cache"
    args = [str(script_path), "-o", str(out), "--stems", str(stems), "--cache", str(cache)]

    run = drama_cli(drama_host, *args, "--json")
    assert run.returncode == 0, run.stderr + run.stdout
    summary = json.loads(run.stdout)
    assert summary["ok"] and summary["items"] == {"total": ITEMS, "generated": ITEMS,
                                                  "cached": 0, "failed": 0}
    assert summary["calls"] == ITEMS
    # Per-item progress lines (stderr is not a terminal here), one per finished item.
    assert run.stderr.count("] generated scene ") == ITEMS
    assert len(logged_calls(drama_host)) == 5  # ambience and effects, once each

    timeline = json.loads((tmp_path / "drama.timeline.json").read_text())
    mix, rate = soundfile.read(str(out), dtype="float32", always_2d=True)
    assert rate == RATE and mix.shape == (timeline["frames"], 2)
    assert soundfile.info(str(out)).subtype == "PCM_24"
    layers = {}
    for stage in ("dialogue", "ambience", "effects"):
        layers[stage], stem_rate = soundfile.read(str(stems / (stage + ".wav")),
                                                  dtype="float32", always_2d=True)
        assert stem_rate == RATE and layers[stage].shape == mix.shape

    # Loudness per stem within 1 LU of its target (the defaults).
    for stage, target in (("dialogue", -16.0), ("ambience", -30.0), ("effects", -22.0)):
        measured = mixing.loudness(layers[stage], RATE)
        assert abs(measured - target) < 1.0, (stage, measured)
        assert abs(summary["loudness_lufs"][stage] - measured) < 0.05

    # No sample at or over full scale; the true peak under the -1 dBTP ceiling.
    assert numpy.abs(mix).max() < 1.0
    assert mixing.true_peak_db(mix) <= -1.0 + 0.01
    assert summary["true_peak_dbtp"] <= -1.0
    # The stems are what entered the limiter: the mix is their sum times a gain from
    # 1 down to the largest reduction it reports (espeak's speech is peaky: at -16 LUFS
    # its peaks go over full scale), and 1 between the lines, where nothing is loud.
    bus = layers["dialogue"] + layers["ambience"] + layers["effects"]
    audible = numpy.abs(bus) > 0.01
    ratio = mix[audible] / bus[audible]
    lowest = 10 ** (-summary["limiter_reduction_db"] / 20.0)
    assert ratio.min() > lowest - 0.01 and ratio.max() < 1.0 + 1e-3
    for scene in json.loads((tmp_path / "drama.timeline.json").read_text())["scenes"]:
        for before, after in zip(scene["lines"], scene["lines"][1:]):
            span = slice(int((before["end"] + 0.8) * RATE), int((after["start"] - 0.1) * RATE))
            assert numpy.all(numpy.abs(mix[span] - bus[span])
                             <= 1e-3 * numpy.abs(bus[span]) + 1e-6)  # 0.01 dB, PCM_24

    scenes = timeline["scenes"]
    lines = [line for scene in scenes for line in scene["lines"]]
    assert [line["text"] for line in lines] == [
        line["text"] for scene in SCRIPT["scenes"] for line in scene["lines"]]
    dialogue = layers["dialogue"]
    for scene, spec in zip(scenes, SCRIPT["scenes"]):
        # The timeline follows the script's rule from the lines' real lengths...
        assert abs(scene["lines"][0]["start"] - scene["start"] - spec["lead_in"]) < 1e-3
        for before, after in zip(scene["lines"], scene["lines"][1:]):
            assert abs(after["start"] - before["end"] - spec["gap"]) < 1e-3
        assert abs(scene["end"] - scene["lines"][-1]["end"] - spec.get("tail", 1.5)) < 1e-3
        for line in scene["lines"]:
            assert 0.4 < line["duration"] < 4.0  # real speech, not a placeholder
            # ... and the speech in the dialogue stem is where the timeline says.
            lo, hi = int((line["start"] - 0.1) * RATE), int((line["end"] + 0.1) * RATE)
            loud = numpy.nonzero(numpy.abs(dialogue[lo:hi]).max(axis=1) > 1e-4)[0]
            assert abs((lo + loud[0]) / RATE - line["start"]) < 0.04, line
            assert abs((lo + loud[-1]) / RATE - line["end"]) < 0.04, line
        for before, after in zip(scene["lines"], scene["lines"][1:]):
            gap = dialogue[int((before["end"] + 0.01) * RATE):int((after["start"] - 0.01)
                                                                  * RATE)]
            assert numpy.abs(gap).max() < 1e-6  # silence between lines

    # Ducking: the ambience under speech is at least the depth (10 dB) minus 1.5 dB
    # below the ambience between lines (away from hold, release and look-ahead).
    ambience = layers["ambience"]
    for scene in scenes:
        for before, after in zip(scene["lines"], scene["lines"][1:]):
            between = ambience[int((before["end"] + 1.0) * RATE):int((after["start"] - 0.2)
                                                                     * RATE)]
            for line in (before, after):
                span = line["end"] - line["start"]
                under = ambience[int((line["start"] + 0.2 * span) * RATE):
                                 int((line["end"] - 0.2 * span) * RATE)]
                depth = rms_db(between) - rms_db(under)
                assert depth >= 10.0 - 1.5, (line["text"], depth)
                assert depth <= 10.0 + 1.0, (line["text"], depth)

    # Effects at their times: onsets found in the effects stem where the script puts
    # them (the stand-in's 0.1 s of leading silence is trimmed, 20 ms kept).
    first, second = scenes
    expected = [first["start"] + 0.5,
                first["lines"][1]["end"] + 0.6,
                second["lines"][0]["start"] - 0.4]
    placed = [effect["start"] for scene in scenes for effect in scene["effects"]]
    assert numpy.allclose(placed, expected, atol=1e-3)
    found = onsets(layers["effects"], RATE)
    assert len(found) == 3, found
    for onset, wanted in zip(found, expected):
        assert abs(onset - wanted) < 0.035, (found, expected)

    # A re-run takes every item from the cache: no daemon call at all.
    calls_before = len(logged_calls(drama_host))
    counter = RequestCounter(drama_host)
    again = drama_cli(drama_host, *args, "--json")
    requests = counter.stop()
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert rerun["items"] == {"total": ITEMS, "generated": 0, "cached": ITEMS, "failed": 0}
    assert rerun["calls"] == 0
    assert requests == [], requests
    assert len(logged_calls(drama_host)) == calls_before
    remixed, _rate = soundfile.read(str(out), dtype="float32", always_2d=True)
    assert numpy.array_equal(remixed, mix)

    # The human summary names the mix, the stems and the counts.
    plain = drama_cli(drama_host, *args)
    assert plain.returncode == 0, plain.stderr
    assert "wrote {}".format(out) in plain.stdout
    assert "items: {} (0 generated, {} cached, 0 failed), 0 daemon calls".format(
        ITEMS, ITEMS) in plain.stdout


FAILING = {
    "speakers": {"Ada": {"voice": "en-us"}},
    "scenes": [{
        "ambience": "rain on a window [flaky]",
        "lines": [{"speaker": "Ada", "text": "This line is fine"},
                  {"speaker": "Ada", "text": "This voice does not exist",
                   "voice": "no-such-voice"}],
        "effects": [{"prompt": "thunder [fail]", "at": 0.5},
                    {"prompt": "a cup set down", "line": 0, "anchor": "end"}]}],
}


@pytest.mark.slow
def test_a_failing_item_is_retried_then_reported_with_its_script_line(drama_host, tmp_path):
    script_path = tmp_path / "failing.json"
    script_path.write_text(json.dumps(FAILING))
    out = tmp_path / "failing.wav"
    before = len(logged_calls(drama_host))
    run = drama_cli(drama_host, str(script_path), "-o", str(out), "--cache",
                    str(tmp_path / "cache"), "--retries", "2", "--json")
    assert run.returncode == 1, run.stderr
    assert not out.exists()  # nothing mixed
    summary = json.loads(run.stdout)
    assert not summary["ok"]
    assert summary["items"] == {"total": 5, "generated": 3, "cached": 0, "failed": 2}
    failures = {f["where"]: f for f in summary["failures"]}
    assert set(failures) == {"scene 0 effect 0", "scene 0 line 1"}
    thunder = failures["scene 0 effect 0"]
    assert (thunder["text"], thunder["attempts"]) == ("thunder [fail]", 3)
    assert "engine_error" in thunder["error"] and "always fails" in thunder["error"]
    voice = failures["scene 0 line 1"]
    assert (voice["scene"], voice["line"], voice["text"]) == (0, 1, "This voice does not exist")
    assert voice["attempts"] == 1 and "bad_arguments" in voice["error"]  # not retried
    # Three tries of the failing effect, two of the flaky ambience, one of the cup.
    made = [call["prompt"] for call in logged_calls(drama_host)[before:]]
    assert sorted(made) == sorted(["thunder [fail]"] * 3 + ["rain on a window [flaky]"] * 2
                                  + ["a cup set down"])
    assert "2 of 5 items failed, so nothing was mixed" in run.stderr
    assert "scene 0 line 1 (Ada) 'This voice does not exist': [bad_arguments]" in run.stderr
    assert "not retried" in run.stderr
    assert "scene 0 effect 0 'thunder [fail]': [engine_error]" in run.stderr
    assert "(3 attempts)" in run.stderr
    assert "retrying scene 0 ambience: 'rain on a window [flaky]' after try 1" in run.stderr

    # A bad script is refused before anything is sent, with its places named.
    script_path.write_text(json.dumps({"scenes": [{"lines": [{"speaker": "Ada"}]}]}))
    bad = drama_cli(drama_host, str(script_path), "-o", str(out))
    assert bad.returncode == 2
    assert "scenes[0].lines[0].text: required" in bad.stderr


@pytest.mark.slow
def test_the_library_reports_stages_items_and_progress(drama_host, tmp_path):
    events = []
    script = {"scenes": [{"ambience": {"prompt": "a quiet room", "duration": 4},
                          "lines": [{"speaker": "A", "text": "Hello there"},
                                    {"speaker": "B", "text": "Hello there"}],  # one call
                          "effects": [{"prompt": "a click", "at": 0.2}]}]}
    result = render_drama(script, str(tmp_path / "lib.wav"), options=DramaOptions(
        endpoint=drama_host.endpoint, sfx_model="ambience", cache_dir=str(tmp_path / "c"),
        workers=3, dialogue_lufs=-18.0, ambience_lufs=-34.0, effects_lufs=-20.0),
        on_event=events.append)
    assert result.ok, [str(f) for f in result.failures]
    assert result.items == 4 and result.generated == 3 and result.calls == 3
    kinds = [(e.kind, e.stage) for e in events]
    for stage, total in (("dialogue", 2), ("ambience", 1), ("effects", 1)):
        assert ("stage_start", stage) in kinds and ("stage_done", stage) in kinds
        assert [e.total for e in events if e.kind == "stage_start" and e.stage == stage] == [
            total]
    assert sum(1 for e in events if e.kind == "item_done") == 3
    assert sum(1 for e in events if e.kind == "item_cached") == 1  # the repeated line
    assert any(e.kind == "item_progress" and e.stage == "ambience" and e.fraction is not None
               for e in events)
    assert [e.message for e in events if e.kind == "mix"] == ["timeline", "mixing", "writing",
                                                              "done"]
    for stage, target in (("dialogue", -18.0), ("ambience", -34.0), ("effects", -20.0)):
        assert abs(result.loudness[stage] - target) < 1.0
    assert result.true_peak_dbtp <= -1.0
    assert not result.stems  # none asked for
