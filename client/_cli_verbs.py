"""The `modelhost` verbs that run models: call (any method of any daemon), the model
verbs say, transcribe, tts, text-to-audio and talking-head, and the pipelines
audio-drama and chat.

The model verbs need numpy, and soundfile to write audio; the pipelines import their
code only when they run.
"""

import json
import sys
import wave

from . import protocol
from ._cli_common import client_options, endpoint_of
from ._client import Client
from .errors import ModelhostError

# --- call and say ----------------------------------------------------------------


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


def write_wav(path, pcm_s16le, sample_rate, channels=1):
    with wave.open(path, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm_s16le)


def cmd_say(args):
    arguments = {"text": args.text}
    if args.voice:
        arguments["voice"] = args.voice
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        speech = client.call(args.model, "tts", arguments=arguments)
    write_wav(args.output, speech["audio"], speech["sample_rate"], speech.get("channels", 1))
    seconds = speech["samples"] / float(speech["sample_rate"])
    if args.json:
        print(json.dumps({"path": args.output, "seconds": seconds,
                          "sample_rate": speech["sample_rate"]}))
    else:
        print("wrote {}: {:.2f}s of speech at {} Hz".format(args.output, seconds,
                                                           speech["sample_rate"]))
    return 0


def cmd_transcribe(args):
    with open(args.file, "rb") as handle:
        data = handle.read()
    options = {"language": args.language} if args.language else {}
    progress = ProgressLine()
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        try:
            result = client.transcribe(data, model=args.model, on_progress=progress, **options)
        finally:
            progress.finish()
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(result["text"])
    return 0


def _write_audio(args, audio, what):
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


def cmd_tts(args):
    options = {name: getattr(args, name) for name in ("voice", "mode", "prompt_text",
                                                      "instruct_text", "speed")
               if getattr(args, name) is not None}
    if args.prompt_audio:
        options["prompt_audio"] = args.prompt_audio
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        speech = client.tts(args.text, model=args.model, **options)
    return _write_audio(args, speech, "speech")


def cmd_text_to_audio(args):
    options = {name: getattr(args, name) for name in ("duration", "steps", "guidance_scale",
                                                      "seed")
               if getattr(args, name) is not None}
    progress = ProgressLine()
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        try:
            sound = client.text_to_audio(args.prompt, model=args.model, on_progress=progress,
                                         **options)
        finally:
            progress.finish()
    return _write_audio(args, sound, "audio")


def cmd_audio_drama(args):
    from modelhost.pipelines import drama_cli

    return drama_cli.run(args, endpoint_of(args))


def cmd_chat(args):
    from modelhost.pipelines import chat_cli

    return chat_cli.run(args, endpoint_of)


def cmd_talking_head(args):
    progress = ProgressLine()
    with Client(endpoint_of(args), timeout=args.timeout) as client:
        try:
            video = client.talking_head(args.audio, model=args.model, on_progress=progress)
        finally:
            progress.finish()
    with open(args.output, "wb") as handle:
        handle.write(video)
    if args.json:
        print(json.dumps({"path": args.output, "bytes": len(video)}))
    else:
        print("wrote {}: {} bytes of mp4".format(args.output, len(video)))
    return 0


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

    say = sub.add_parser("say", help="speak TEXT into a WAV file with the default TTS daemon")
    client_options(say)
    say.add_argument("text")
    say.add_argument("-o", "--output", required=True, help="the WAV file to write")
    say.add_argument("--voice", help="a voice name (see `modelhost call espeak voices`)")
    say.add_argument("--model", default="espeak", help="the TTS daemon (default: espeak)")
    say.add_argument("--timeout", type=float, default=60.0)
    say.set_defaults(handler=cmd_say)

    transcribe = sub.add_parser("transcribe", help="the text spoken in FILE (WAV or FLAC), "
                                                   "from the speech recognition daemon")
    client_options(transcribe)
    transcribe.add_argument("file", metavar="FILE")
    transcribe.add_argument("--model", default="asr", help="the daemon (default: asr)")
    transcribe.add_argument("--language", help="a language code the daemon's model speaks "
                                               "(default: the daemon's)")
    transcribe.add_argument("--timeout", type=float, default=600.0)
    transcribe.set_defaults(handler=cmd_transcribe)

    tts = sub.add_parser("tts", help="speech for TEXT from CosyVoice2 into an audio file")
    client_options(tts)
    tts.add_argument("text")
    tts.add_argument("-o", "--output", required=True, help="the file to write (.wav, .flac)")
    tts.add_argument("--voice", help="a registered voice id, or a built-in speaker (mode sft)")
    tts.add_argument("--mode", choices=("zero_shot", "cross_lingual", "instruct", "sft"))
    tts.add_argument("--prompt-audio", help="a WAV/FLAC file of the voice to clone (<= 30 s)")
    tts.add_argument("--prompt-text", help="what the prompt audio says")
    tts.add_argument("--instruct-text", help="how to say it (mode instruct)")
    tts.add_argument("--speed", type=float)
    tts.add_argument("--model", default="cosyvoice", help="the daemon (default: cosyvoice)")
    tts.add_argument("--timeout", type=float, default=120.0)
    tts.set_defaults(handler=cmd_tts)

    t2a = sub.add_parser("text-to-audio", help="sound for PROMPT from TangoFlux into a file")
    client_options(t2a)
    t2a.add_argument("prompt")
    t2a.add_argument("-o", "--output", required=True, help="the file to write (.wav, .flac)")
    t2a.add_argument("--duration", type=float, help="seconds, 1 to 30")
    t2a.add_argument("--steps", type=int, help="diffusion steps")
    t2a.add_argument("--guidance-scale", type=float)
    t2a.add_argument("--seed", type=int, help="the same seed gives the same sound")
    t2a.add_argument("--model", default="tangoflux", help="the daemon (default: tangoflux)")
    t2a.add_argument("--timeout", type=float, default=600.0)
    t2a.set_defaults(handler=cmd_text_to_audio)

    head = sub.add_parser("talking-head", help="an mp4 of a TalkingGaussian subject saying "
                                               "AUDIO")
    client_options(head)
    head.add_argument("audio", help="a WAV/FLAC file of speech")
    head.add_argument("-o", "--output", required=True, help="the mp4 to write")
    head.add_argument("--model", default="talkinggaussian",
                      help="the daemon of the subject (default: talkinggaussian)")
    head.add_argument("--timeout", type=float, default=600.0)
    head.set_defaults(handler=cmd_talking_head)

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
