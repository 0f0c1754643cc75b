"""python -m modelhost.gateway --spec FILE: the gateway process `modelhost up` starts."""

import argparse
import json
import sys

from . import serve

# The exit status when the gateway cannot start at all (a taken port, a missing
# extra): the supervisor does not restart it in a loop then.
EXIT_CANNOT_START = 2


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m modelhost.gateway")
    parser.add_argument("--spec", required=True, help="the JSON spec `modelhost up` wrote")
    args = parser.parse_args(argv)
    try:
        with open(args.spec, encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, ValueError) as exc:
        print("modelhost gateway: cannot read its spec {}: {}".format(args.spec, exc),
              file=sys.stderr)
        return EXIT_CANNOT_START
    return serve(spec)


if __name__ == "__main__":
    sys.exit(main())
