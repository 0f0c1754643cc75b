"""The `modelhost` verbs that run models: call (any method of any daemon), the model
verbs say, transcribe, tts, text-to-audio and talking-head, and the pipelines
audio-drama and chat.

The model verbs need numpy, and soundfile to write audio; the pipelines import their
code only when they run.
"""

import collections
import json
import sys
import wave

from . import protocol
from ._cli_common import client_options, endpoint_of
from ._client import Client
from .errors import ModelhostError
from .models import audio_bytes

# --- call and the pipelines ------------------------------------------------------


def parse_assignment(text):
    """key=value: value as JSON when it parses, else a string; key=@file reads bytes."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError("expected key=value, got {!r}".format(text))
    if value.startswith("@"):
        with open(value[1:], "rb") as handle:
            return key, handle.read()
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _printable(value):
    if isinstance(value, (bytes, bytearray)):
        return "<{} bytes>".format(len(value))
    if type(value).__name__ == "ndarray":
        return "<array {} {}>".format(value.dtype, list(value.shape))
    if isinstance(value, dict):
        return {key: _printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_printable(item) for item in value]
    return value


def _binary_of(value):
    """The one binary value in a result, for -o."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if type(value).__name__ == "ndarray":
        return value.tobytes()
    if isinstance(value, dict):
        found = [item for item in value.values()
                 if isinstance(item, (bytes, bytearray)) or type(item).__name__ == "ndarray"]
        if len(found) == 1:
            return _binary_of(found[0])
        raise ModelhostError("the result has {} binary fields, so -o cannot tell which to "
                             "write; fields: {}".format(len(found), ", ".join(value)))
    raise ModelhostError("the result holds no binary data to write; leave out -o")


class ProgressLine(object):
    """A one-line progress bar on stderr, redrawn in place (silent when not a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.active = stream.isatty()
        self.drawn = False
        self.fraction = 0.0

    def __call__(self, progress):
        if not self.active:
            return
        # A stage without a fraction (a decode after the steps) keeps the bar where it was.
        if progress.fraction is not None:
            self.fraction = progress.fraction
        fraction = self.fraction
        bar = "#" * int(fraction * 30)
        text = " ".join(filter(None, [progress.stage, progress.message]))
        self.stream.write("\r[{:<30}] {:3.0f}% {}".format(bar, fraction * 100, text)[:120])
        self.stream.flush()
        self.drawn = True

    def finish(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def cmd_call(args):
    arguments = dict(parse_assignment(item) for item in args.arguments)
    progress = ProgressLine()
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        try:
            if args.stream:
                stream = client.stream(args.model, args.method, on_progress=progress,
                                       priority=args.priority, arguments=arguments)
                for chunk in stream:
                    print(json.dumps(_printable(chunk), default=str), flush=True)
                result = stream.result
            else:
                result = client.call(args.model, args.method, on_progress=progress,
                                     priority=args.priority, arguments=arguments)
        finally:
            progress.finish()
    if args.output:
        data = _binary_of(result)
        with open(args.output, "wb") as handle:
            handle.write(data)
        print("wrote {} bytes to {}".format(len(data), args.output), file=sys.stderr)
    else:
        print(json.dumps(_printable(result), indent=None if args.json else 2, default=str))
    return 0


def cmd_audio_drama(args):
    from modelhost.pipelines import drama_cli

    return drama_cli.run(args, endpoint_of(args))


def cmd_chat(args):
    from modelhost.pipelines import chat_cli

    return chat_cli.run(args, endpoint_of)


# --- the model verbs: one table, one runner ----------------------------------------


class Argument(collections.namedtuple("Argument", "flags options forward")):
    """One argparse argument of a model verb; `forward`: its value goes to the daemon
    (as a keyword of the client's helper) when the command line sets it."""

    __slots__ = ()

    @property
    def dest(self):
        return self.flags[-1].lstrip("-").replace("-", "_")


def argument(*flags, **options):
    """The verb's positional input, or one of its own options (passed on to the daemon)."""
    return Argument(flags, options, flags[0].startswith("-"))


def output(help):
    return Argument(("-o", "--output"), {"required": True, "help": help}, False)


def daemon(default, what="the daemon"):
    return Argument(("--model",), {"default": default,
                                   "help": "{} (default: {})".format(what, default)}, False)


def timeout(seconds):
    return Argument(("--timeout",), {"type": float, "default": seconds}, False)


class ModelVerb(collections.namedtuple("ModelVerb", "name help arguments request show")):
    """A command that makes one call of a model daemon and writes or prints its result.

    `arguments` in the order --help lists them (each verb has --model and --timeout);
    `request(client, args, options, progress)` makes the call, with `options` the
    forwarded arguments the command line set; `show(args, result)` writes the output
    and returns the exit status.
    """

    __slots__ = ()

    def add_to(self, sub):
        parser = sub.add_parser(self.name, help=self.help)
        client_options(parser)
        for spec in self.arguments:
            parser.add_argument(*spec.flags, **spec.options)
        parser.set_defaults(handler=self.run)

    def run(self, args):
        # Unset or empty: the daemon's default stands.
        options = {spec.dest: getattr(args, spec.dest) for spec in self.arguments
                   if spec.forward and getattr(args, spec.dest) not in (None, "")}
        progress = ProgressLine()
        with Client(endpoint_of(args), timeout=args.timeout) as client:
            try:
                result = self.request(client, args, options, progress)
            finally:
                progress.finish()
        return self.show(args, result)


def write_wav(path, pcm_s16le, sample_rate, channels=1):
    with wave.open(path, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm_s16le)


def _show_pcm_speech(args, speech):
    write_wav(args.output, speech["audio"], speech["sample_rate"], speech.get("channels", 1))
    seconds = speech["samples"] / float(speech["sample_rate"])
    if args.json:
        print(json.dumps({"path": args.output, "seconds": seconds,
                          "sample_rate": speech["sample_rate"]}))
    else:
        print("wrote {}: {:.2f}s of speech at {} Hz".format(args.output, seconds,
                                                           speech["sample_rate"]))
    return 0


def _show_transcript(args, result):
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(result["text"])
    return 0


def _show_audio(what):
    def show(args, audio):
        audio.write(args.output)
        if args.json:
            print(json.dumps({"path": args.output, "seconds": audio.seconds,
                              "sample_rate": audio.sample_rate,
                              "info": _printable(audio.info)}, default=str))
        else:
            extra = " (seed {})".format(audio.info["seed"]) if "seed" in audio.info else ""
            print("wrote {}: {:.2f}s of {} at {} Hz{}".format(args.output, audio.seconds, what,
                                                             audio.sample_rate, extra))
        return 0
    return show


def _show_video(args, video):
    with open(args.output, "wb") as handle:
        handle.write(video)
    if args.json:
        print(json.dumps({"path": args.output, "bytes": len(video)}))
    else:
        print("wrote {}: {} bytes of mp4".format(args.output, len(video)))
    return 0


MODEL_VERBS = (
    ModelVerb(
        "say", "speak TEXT into a WAV file with the default TTS daemon", (
            argument("text"),
            output("the WAV file to write"),
            argument("--voice", help="a voice name (see `modelhost call espeak voices`)"),
            daemon("espeak", "the TTS daemon"),
            timeout(60.0)),
        # espeak's own tts: 16-bit PCM, written as it comes.
        lambda client, args, options, progress: client.call(
            args.model, "tts", arguments=dict(text=args.text, **options)),
        _show_pcm_speech),
    ModelVerb(
        "transcribe", "the text spoken in FILE (WAV or FLAC), from the speech recognition "
        "daemon", (
            argument("file", metavar="FILE"),
            daemon("asr"),
            argument("--language", help="a language code the daemon's model speaks (default: "
                                     "the daemon's)"),
            timeout(600.0)),
        lambda client, args, options, progress: client.transcribe(
            audio_bytes(args.file), model=args.model, on_progress=progress, **options),
        _show_transcript),
    ModelVerb(
        "tts", "speech for TEXT from CosyVoice2 into an audio file", (
            argument("text"),
            output("the file to write (.wav, .flac)"),
            argument("--voice", help="a registered voice id, or a built-in speaker (mode sft)"),
            argument("--mode", choices=("zero_shot", "cross_lingual", "instruct", "sft")),
            argument("--prompt-audio", help="a WAV/FLAC file of the voice to clone (<= 30 s)"),
            argument("--prompt-text", help="what the prompt audio says"),
            argument("--instruct-text", help="how to say it (mode instruct)"),
            argument("--speed", type=float),
            daemon("cosyvoice"),
            timeout(120.0)),
        lambda client, args, options, progress: client.tts(
            args.text, model=args.model, **options),
        _show_audio("speech")),
    ModelVerb(
        "text-to-audio", "sound for PROMPT from TangoFlux into a file", (
            argument("prompt"),
            output("the file to write (.wav, .flac)"),
            argument("--duration", type=float, help="seconds, 1 to 30"),
            argument("--steps", type=int, help="diffusion steps"),
            argument("--guidance-scale", type=float),
            argument("--seed", type=int, help="the same seed gives the same sound"),
            daemon("tangoflux"),
            timeout(600.0)),
        lambda client, args, options, progress: client.text_to_audio(
            args.prompt, model=args.model, on_progress=progress, **options),
        _show_audio("audio")),
    ModelVerb(
        "talking-head", "an mp4 of a TalkingGaussian subject saying AUDIO", (
            argument("audio", help="a WAV/FLAC file of speech"),
            output("the mp4 to write"),
            daemon("talkinggaussian", "the daemon of the subject"),
            timeout(600.0)),
        lambda client, args, options, progress: client.talking_head(
            args.audio, model=args.model, on_progress=progress),
        _show_video),
)


# --- the parser ----------------------------------------------------------------


def add_commands(sub):
    """Declare these commands on the `modelhost` subparsers."""
    call = sub.add_parser("call", help="call METHOD of MODEL with key=value arguments")
    client_options(call)
    call.add_argument("model")
    call.add_argument("method")
    call.add_argument("arguments", nargs="*", metavar="key=value",
                      help="values are JSON when they parse, else strings; key=@FILE sends "
                           "the file's bytes")
    call.add_argument("-o", "--output", help="write the result's binary data to this file")
    call.add_argument("--stream", action="store_true", help="print streamed chunks as they come")
    call.add_argument("--timeout", type=float, help="seconds before the call is abandoned")
    call.add_argument("--priority", default=protocol.Priority.NORMAL,
                      choices=protocol.Priority.ALL)
    call.set_defaults(handler=cmd_call)

    for verb in MODEL_VERBS:
        verb.add_to(sub)

    from modelhost.pipelines import drama_cli  # declares arguments only: no heavy import

    drama = sub.add_parser("audio-drama", help="an audio drama from a JSON script: dialogue, "
                                               "ambience and effects mixed into one file")
    client_options(drama)
    drama_cli.add_arguments(drama)
    drama.set_defaults(handler=cmd_audio_drama)

    from modelhost.pipelines import chat_cli  # declares arguments only: no heavy import

    chat = sub.add_parser("chat", help="a voice chat: speech or text in, a language model's "
                                       "reply spoken (and a talking head) out, streamed")
    client_options(chat)
    chat_cli.add_arguments(chat)
    chat.set_defaults(handler=cmd_chat)
