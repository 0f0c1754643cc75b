"""`modelhost chat`: the command-line face of the voice chat loop (modelhost.pipelines.chat).

    modelhost chat --text "What is two plus two?" --llm-url http://127.0.0.1:8080/v1
    modelhost chat --input question.wav --out replies/ --json
    modelhost chat                       # typed lines, one turn each (--input - is the same)
    modelhost chat --mic --play          # speak; the reply plays; speaking again interrupts

Arguments are declared here (no heavy import: the parser is built on every
`modelhost` command); the loop is imported when the verb runs.

`--config F` is a YAML or JSON file: either a modelhost configuration with a
`chat:` section (the endpoint then comes from its broker section, as for the
other verbs) or a file holding the chat section alone (which may name
`endpoint`). Flags win over the file.

Interruption: Ctrl-C stops the running turn (a second Ctrl-C with no turn
running exits); on a terminal, a new typed line stops the running turn and
starts the next; with the microphone, speaking does. Lines piped in run one
after another, each to its end.

Per turn it prints what was said and replied and the times from the turn's
start to the transcript, the first LLM token, the first audio, the first
video segment and the end; `--json` prints each turn as one JSON line
instead. Exit status: 0, 1 when a turn failed (or the broker, the language
model or a sound device could not be used), 2 for a configuration that is
not valid.
"""

import json
import queue
import sys
import threading

EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_OUT = "chat-out"


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="FILE.wav|-",
                        help="a WAV file to transcribe (one turn), or - for typed lines on "
                             "stdin (the default)")
    source.add_argument("--text", action="append", metavar="TEXT",
                        help="a turn's text (repeatable: one turn each, in order)")
    source.add_argument("--mic", action="store_true",
                        help="listen to the microphone (needs sounddevice); speaking "
                             "interrupts the reply")
    parser.add_argument("--out", metavar="DIR",
                        help="where each turn's turn-NNN.wav (and .mp4) go (default: "
                             "chat.out_dir, else ./{})".format(DEFAULT_OUT))
    parser.add_argument("--play", action="store_true",
                        help="play the replies on the default sound output (needs sounddevice)")
    parser.add_argument("--llm-url", metavar="URL",
                        help="an OpenAI-compatible API's base URL, e.g. "
                             "http://127.0.0.1:8080/v1 (none: replies echo the input)")
    parser.add_argument("--llm-model", metavar="M",
                        help="the model to ask for (default: the first the server lists)")
    parser.add_argument("--llm-key-env", metavar="VAR",
                        help="the environment variable with the API key (default "
                             "OPENAI_API_KEY)")
    parser.add_argument("--system", metavar="TEXT", help="the system prompt")
    parser.add_argument("--tts", metavar="MODEL", help="the TTS daemon (default: espeak)")
    parser.add_argument("--voice", metavar="V", help="the TTS voice (espeak: e.g. en-us)")
    parser.add_argument("--asr", metavar="MODEL",
                        help="the speech recognition daemon (default: asr)")
    parser.add_argument("--video", metavar="MODEL",
                        help="a talking-head daemon (e.g. talkinggaussian): video per turn")
    parser.add_argument("--lookahead", type=int, metavar="N",
                        help="TTS calls outstanding at once (default 2)")


def _configuration(args, endpoint_of):
    """(ChatConfig, endpoint) from --config and the flags."""
    from .chat import ChatConfig, load_config_file

    data = {}
    if args.config:
        config, data = load_config_file(args.config)
    else:
        config = ChatConfig()
    if args.llm_url:
        config.llm.url = args.llm_url
    if args.llm_model:
        config.llm.model = args.llm_model
    if args.llm_key_env:
        config.llm.api_key_env = args.llm_key_env
    if args.system is not None:
        config.llm.system = args.system
    if args.tts:
        config.tts.model = args.tts
    if args.voice:
        config.tts.voice = args.voice
    if args.asr:
        config.asr.model = args.asr
    if args.video:
        from .chat import VideoConfig

        config.video = VideoConfig(model=args.video)
    if args.lookahead is not None:
        config.lookahead = args.lookahead
    if args.out:
        config.out_dir = args.out
    elif not config.out_dir:
        config.out_dir = DEFAULT_OUT
    if args.play:
        config.play = True
    if args.endpoint:
        endpoint = args.endpoint
    elif args.config and ("broker" in data or "daemons" in data):
        endpoint = endpoint_of(args)  # a modelhost configuration: its broker's endpoint
    else:
        endpoint = config.endpoint or endpoint_of(_without_config(args))
    return config, endpoint


def _without_config(args):
    """The arguments with --config dropped: a chat-only file names no broker."""
    import argparse

    plain = argparse.Namespace(**vars(args))
    plain.config = None
    return plain


def _seconds(value):
    return "-" if value is None else "{:.3f}s".format(value)


class Printer(object):
    """Turns and notices to the terminal (or JSON lines)."""

    def __init__(self, as_json, live):
        self.as_json = as_json
        self.live = live and not as_json  # sentences as they are spoken
        self.lock = threading.Lock()

    def event(self, event):
        if event.kind == "notice":
            self._err("modelhost chat: " + event.fields["message"])
        elif event.kind == "load" and event.fields.get("state") == "failed":
            self._err("modelhost chat: could not make {} resident: {}".format(
                event.fields["model"], event.fields.get("error")))
        elif self.live and event.kind == "sentence":
            self._out("  bot: " + event.fields["text"])
        elif self.live and event.kind == "transcript":
            self._out("  you: " + (event.fields["text"] or ""))

    def turn(self, result):
        if self.as_json:
            self._out(json.dumps(result.to_dict()))
            return
        lines = []
        if not self.live:
            lines.append("you: " + (result.transcript or ""))
            lines.append("bot: " + " ".join(result.spoken if result.outcome == "interrupted"
                                            else result.sentences))
        m = result.metrics
        line = ("[turn {} {}] transcript {}, first token {}, first audio {}, first video {}, "
                "total {}".format(result.turn, result.outcome, _seconds(m["transcript_s"]),
                                  _seconds(m["first_token_s"]), _seconds(m["first_audio_s"]),
                                  _seconds(m["first_video_s"]), _seconds(m["total_s"])))
        written = [result.files[key] for key in ("wav", "mp4") if key in result.files]
        if written:
            line += " -> " + ", ".join(written)
        lines.append(line)
        for error in result.errors:
            lines.append("  error: " + error)
        if "mp4_problem" in result.files:
            lines.append("  video: " + result.files["mp4_problem"])
        self._out("\n".join(lines))

    def _out(self, text):
        with self.lock:
            print(text, flush=True)

    def _err(self, text):
        with self.lock:
            print(text, file=sys.stderr, flush=True)


def run(args, endpoint_of):
    from . import chat_io
    from .chat import Chat, ChatConfigError
    from .llm import LLMError

    try:
        config, endpoint = _configuration(args, endpoint_of)
    except ChatConfigError as exc:
        print("modelhost chat: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    printer = Printer(args.json, live=sys.stdout.isatty())
    microphone = None
    try:
        if args.mic:
            microphone = chat_io.Microphone(sample_rate=config.vad.sample_rate)
        chat = Chat(config, endpoint=endpoint, on_event=printer.event)
    except BaseException as exc:
        if microphone is not None:
            microphone.close()
        if isinstance(exc, (chat_io.AudioDeviceError, LLMError)):
            print("modelhost chat: {}".format(exc), file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, ChatConfigError):
            print("modelhost chat: {}".format(exc), file=sys.stderr)
            return EXIT_USAGE
        raise
    results = []
    try:
        if args.mic:
            _listen(chat, microphone, printer, results)
        elif args.text:
            for text in args.text:
                results.append(_wait(chat, chat.submit(text=text)))
                printer.turn(results[-1])
        elif args.input and args.input != "-":
            results.append(_wait(chat, chat.submit(audio=args.input)))
            printer.turn(results[-1])
        else:
            _typed(chat, printer, results)
    except (LLMError, OSError) as exc:
        print("modelhost chat: {}".format(exc), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        if microphone is not None:
            microphone.close()
        chat.close()
    return EXIT_FAILED if any(result.outcome == "failed" for result in results) else 0


def _wait(chat, future):
    """A turn's result; Ctrl-C interrupts the turn (its result comes back all the same)."""
    while True:
        try:
            return future.result()
        except KeyboardInterrupt:
            if chat.interrupt() is None:
                raise


def _typed(chat, printer, results):
    """Typed lines: on a terminal a new line interrupts the running turn; piped lines run
    one after another."""
    interactive = sys.stdin.isatty()
    if not interactive:
        for line in sys.stdin:
            if line.strip():
                results.append(_wait(chat, chat.submit(text=line.strip())))
                printer.turn(results[-1])
        return
    lines = queue.Queue()

    def read():
        for line in sys.stdin:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()
    print("modelhost chat: type a line and Enter; a new line interrupts the reply; Ctrl-C "
          "stops it, Ctrl-D ends", file=sys.stderr)
    running = []
    while True:
        try:
            line = lines.get()
        except KeyboardInterrupt:
            if chat.interrupt() is None:
                raise
            continue
        if line is None:
            break
        if not line.strip():
            continue
        future = chat.submit(text=line.strip())  # interrupts the running turn, if any
        future.add_done_callback(lambda f: f.cancelled() or f.exception() or printer.turn(
            f.result()))
        running.append(future)
    for future in running:
        results.append(_wait(chat, future))


def _listen(chat, microphone, printer, results):
    print("modelhost chat: listening; speak, and pause to let it answer (headphones keep it "
          "from hearing itself); Ctrl-C stops a reply, twice exits", file=sys.stderr)

    def on_turn(result):
        results.append(result)
        printer.turn(result)

    future = chat.listen(microphone, sample_rate=microphone.sample_rate, on_turn=on_turn)
    while True:
        try:
            future.result()
            return
        except KeyboardInterrupt:
            if chat.interrupt() is None:
                microphone.close()
                raise
