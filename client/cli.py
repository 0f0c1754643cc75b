"""The `modelhost` command line: up, gateway, setup, install-systemd, logs, keys, ps, top, events,
call, say, transcribe, load, unload, pin, unpin, the model verbs tts,
text-to-audio, talking-head, the pipeline audio-drama, and cluster (modelhost.cluster).

Client commands need only pyzmq and msgpack (the model verbs numpy, and
soundfile to write audio; top the rich library). `up`, `setup` and
`install-systemd` import the broker package lazily, as the layering rules allow.

The commands live by kind, each module declaring its own arguments:
_cli_host (up, setup, install-systemd, gateway, logs, keys), _cli_status (ps,
events, top, load, unload, pin, unpin) and _cli_verbs (call, the model verbs, the
pipelines); _cli_common has what they share, _format the sizes and durations; the
cluster mode's commands are modelhost.cluster.cli's.
"""

import argparse
import sys

from . import _cli_host, _cli_status, _cli_verbs
from ._cli_common import EXIT_ERROR, EXIT_USAGE  # noqa: F401 (the exit statuses, for callers)
from .errors import ModelhostError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="modelhost", description="Serve heavy models as warm daemons behind one broker.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # In this order in the help: the host's commands, the broker's, the models'.
    for commands in (_cli_host, _cli_status, _cli_verbs):
        commands.add_commands(sub)
    from modelhost.cluster import cli as cluster_cli  # declares arguments only: no Ray import

    cluster_cli.add_commands(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ModelhostError as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
