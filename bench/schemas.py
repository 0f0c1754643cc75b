"""What the per-message schema check costs, against decoding the same header.

Every message the broker receives is decoded (msgpack) and then checked
against the schema of its kind (modelhost.protocol.check_*). Both run in the
same process on the same headers here, so the ratio holds on a noisy machine.

    .venv/bin/python bench/schemas.py [--n 200000]
"""

import argparse
import timeit

from modelhost import protocol

# Each message as its peer builds it: its frames.
MESSAGES = {
    "call": (protocol.check_request, protocol.call_message(
        12345, "espeak", "tts", {"text": "hello there", "voice": "en"},
        protocol.Priority.NORMAL, True, 30.0)),
    "result": (protocol.check_reply, protocol.result_reply(
        12345, {"sample_rate": 22050}, b"c-4242-0123456789ab",
        {"rss_peak": 123456789, "cuda_peak": None})),
    "heartbeat": (protocol.check_daemon_message, protocol.heartbeat_message(
        protocol.DaemonState.READY, 1, {"rss": 1, "rss_peak": 2, "cuda": None, "cuda_peak": None})),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200000)
    args = parser.parse_args()
    print("{:<10} {:>12} {:>12} {:>8}".format("message", "decode us", "check us", "ratio"))
    for name, (check, frames) in MESSAGES.items():
        frame = frames[0]
        decode = min(timeit.repeat(lambda: protocol.decode_header(frame), number=args.n,
                                   repeat=5)) / args.n
        decoded = protocol.decode_header(frame)
        checked = min(timeit.repeat(lambda: check(decoded), number=args.n, repeat=5)) / args.n
        print("{:<10} {:>12.2f} {:>12.2f} {:>7.2f}x".format(name, decode * 1e6, checked * 1e6,
                                                           checked / decode))


if __name__ == "__main__":
    main()
