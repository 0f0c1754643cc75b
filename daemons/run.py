"""`python -m modelhost.daemons.run NAME [--spec FILE]`: one daemon, in its own venv.

The spec (JSON, written by `modelhost up` or the systemd renderer) names the
engine class, its options and the broker's backend endpoint. It comes from
--spec, else $MODELHOST_DAEMON_SPEC (the JSON text itself), else
<runtime dir>/daemons/NAME.json.
"""

import argparse
import json
import logging
import os
import sys

from modelhost import local


def load_spec(name, path):
    if path is None and os.environ.get("MODELHOST_DAEMON_SPEC"):
        spec = json.loads(os.environ["MODELHOST_DAEMON_SPEC"])
    else:
        path = path or os.path.join(local.default_runtime_dir(), "daemons", name + ".json")
        with open(path) as handle:
            spec = json.load(handle)
    if spec.get("name") != name:
        raise SystemExit("the spec is for daemon {!r}, not {!r}".format(spec.get("name"), name))
    return spec


def name_of(spec):
    return spec.get("name") or spec.get("engine")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m modelhost.daemons.run")
    parser.add_argument("name")
    parser.add_argument("--spec", help="the daemon's JSON spec file")
    args = parser.parse_args(argv)
    spec = load_spec(args.name, args.spec)
    local.configure_logging("daemon=" + args.name, spec.get("log_level", "info"))
    log = logging.getLogger("modelhost.daemon")
    for entry in reversed(spec.get("pythonpath") or []):
        sys.path.insert(0, entry)

    # Imported after sys.path is set up: the runtime and engine may live there.
    from modelhost.daemons.runtime import Runtime, import_engine

    engine, engine_error = None, None
    options = spec.get("options") or {}
    try:
        engine_class = import_engine(spec["engine"])
        problems = engine_class.preflight(options) if hasattr(engine_class, "preflight") else []
        if problems:
            engine_error = "cannot start {}: {}".format(name_of(spec), "; ".join(problems))
            log.error("%s", engine_error)
        else:
            engine = engine_class(**options)
    except Exception as exc:
        # Stay up and show `failed` with the reason in `modelhost ps`: a crash
        # loop would only bury the message in restarts.
        engine_error = "cannot create engine {}: {}: {}".format(
            spec.get("engine"), type(exc).__name__, exc)
        log.error("%s", engine_error)
    log.info("starting: %s, engine %s, pid %d", local.interpreter_description(),
             spec.get("engine"), os.getpid())
    return Runtime(spec, engine, engine_error).run()


if __name__ == "__main__":
    sys.exit(main())
