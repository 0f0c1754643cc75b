"""`python -m modelhost.daemons.preflight ENGINE OPTIONS_JSON [PYTHONPATH...]`.

Run by `modelhost setup` with the daemon's own interpreter, after its venv is
built: imports the engine class and prints, as a JSON list, what its
preflight() says keeps it from loading here (weights not downloaded, a CUDA
extension not built). An engine that cannot even be imported is one line of
that list. Exits 0 either way: setup reports, the daemon's start refuses.

Runs on Python 3.7 with only pyzmq and msgpack.
"""

import json
import sys


def problems_of(engine, options):
    from modelhost.daemons.runtime import import_engine

    try:
        engine_class = import_engine(engine)
    except Exception as exc:
        return ["cannot import engine {}: {}: {}".format(engine, type(exc).__name__, exc)]
    preflight = getattr(engine_class, "preflight", None)
    if preflight is None:
        return []
    try:
        return [str(line) for line in preflight(options)]
    except Exception as exc:
        return ["{}.preflight() raised {}: {}".format(engine, type(exc).__name__, exc)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    engine, options = argv[0], json.loads(argv[1])
    for entry in reversed(argv[2:]):
        sys.path.insert(0, entry)
    print(json.dumps(problems_of(engine, options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
