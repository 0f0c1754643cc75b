"""The `modelhost` commands of the broker's host: up, setup, install-systemd, gateway,
logs, and keys (which clients use too).

`up`, `setup`, `install-systemd` and `gateway` import the broker package lazily, as the
layering rules allow; so does --config, to read a configuration.
"""

import os
import re
import sys
from pathlib import Path

from . import local
from ._cli_common import EXIT_ERROR, EXIT_USAGE

# --- up and setup (broker side) ------------------------------------------------


def _load_config_or_exit(path):
    from modelhost.broker.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print("modelhost: the configuration is not valid, nothing was started:\n{}".format(exc),
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _run_setup(config, names, force):
    """(exit status, [SetupResult]): setup of the named daemons (all by default)."""
    from modelhost.broker import envs

    unknown = [name for name in names if name not in config.daemons]
    if unknown:
        print("modelhost: no daemon named {}; the configuration has: {}".format(
            ", ".join(unknown), ", ".join(config.daemons)), file=sys.stderr)
        return EXIT_USAGE, []
    daemons = [config.daemons[name] for name in (names or config.daemons)]
    results = envs.setup_all(daemons, force=force,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    for result in results:
        print("{:<10} {}".format(result.action, result.message), file=sys.stderr)
        for line in getattr(result, "cannot", None) or []:
            print("{:<10} {}: not here: {}".format("", result.name, line), file=sys.stderr)
    return (EXIT_ERROR if any(r.action == "failed" for r in results) else 0), results


def cmd_setup(args):
    config = _load_config_or_exit(args.config)
    return _run_setup(config, args.names, args.force)[0]


def cmd_install_systemd(args):
    from modelhost.broker import systemd_units

    try:
        config = systemd_units.load_for_systemd(args.config, args.user)
    except Exception as exc:  # ConfigError: the broker package's, imported lazily
        print("modelhost: the configuration is not valid:\n{}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    target = Path(args.dir) if args.dir else systemd_units.unit_dir(args.user)
    files = {target / relative: text for relative, text
             in systemd_units.render(config, target, user=args.user).items()}
    if not args.user:
        # The system broker runs as user modelhost: polkit lets it start and stop
        # the daemon units, and nothing else.
        rule, text = systemd_units.polkit_rule(Path(args.dir) if args.dir else None)
        files[rule] = text
    if args.dry_run:
        for path, text in files.items():
            print("# --- {}\n{}".format(path, text))
        return 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print("wrote {}".format(path), file=sys.stderr)
    scope = "--user " if args.user else ""
    if not args.user and not systemd_units.service_user_exists():
        print("create the service user first: useradd --system --home-dir {} --shell "
              "/usr/sbin/nologin {}".format(config.broker.state_dir,
                                            systemd_units.SERVICE_USER), file=sys.stderr)
    print("then: systemctl {0}daemon-reload && systemctl {0}enable --now modelhost.target"
          .format(scope), file=sys.stderr)
    return 0


def cmd_up(args):
    config = _load_config_or_exit(args.config)
    local.configure_logging("supervisor", config.broker.log_level)
    setup_failed = {}
    if not args.no_setup:
        # Idempotent and quick when nothing changed; on a fresh machine this
        # is what builds the daemons' venvs.
        names = [name for name, daemon in config.daemons.items() if daemon.autostart]
        # A daemon whose setup failed is not started from its broken venv (it could
        # only crash-loop); it shows `failed` in ps with the setup's last lines, and
        # the other daemons start.
        for result in _run_setup(config, names, force=False)[1]:
            if result.action == "failed":
                detail = result.message[len(result.name) + 2:] \
                    if result.message.startswith(result.name + ": ") else result.message
                setup_failed[result.name] = "not started: its venv setup failed (fix it, then " \
                    "`modelhost setup {}`): {}".format(result.name, detail)
        if setup_failed:
            print("modelhost: setting up {} failed (see above): not starting {}; the others "
                  "start".format(", ".join(setup_failed), "it" if len(setup_failed) == 1
                                 else "them"), file=sys.stderr)
    from modelhost.broker.supervisor import Supervisor

    print("modelhost: starting {} daemons from {}; Ctrl-C stops everything".format(
        len(config.daemons), config.path), file=sys.stderr)
    return Supervisor(config, setup_failed=setup_failed).run()


def cmd_gateway(args):
    """The OpenAI-compatible gateway in the foreground, for the broker of the configuration."""
    from modelhost.broker.config import ConfigError, gateway_spec

    config = _load_config_or_exit(args.config)
    try:
        spec = gateway_spec(config, listen=args.listen)
    except ConfigError as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.endpoint:
        spec["endpoint"] = args.endpoint
    from modelhost.gateway import serve

    return serve(spec)


def cmd_logs(args):
    from . import _logs

    return _logs.main(args.name, args.lines, args.follow, args.config)


# --- keys ----------------------------------------------------------------------

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _default_keys_dir(config_path):
    if config_path:
        from modelhost.broker.config import load_config

        return load_config(config_path).broker.state_dir / "keys"
    # The broker's default state dir, worked out here: clients make keys too,
    # on machines without the broker package.
    state = os.environ.get("MODELHOST_STATE_DIR")
    if not state:
        xdg = os.environ.get("XDG_STATE_HOME")
        state = os.path.join(xdg, "modelhost") if xdg else "~/.local/state/modelhost"
    return Path(os.path.abspath(os.path.expanduser(state))) / "keys"


def cmd_keys(args):
    import zmq.auth

    if not KEY_NAME.match(args.name):
        print("modelhost: key name {!r}: use letters, digits, '_', '.' and '-'".format(
            args.name), file=sys.stderr)
        return EXIT_USAGE
    directory = Path(os.path.abspath(os.path.expanduser(args.dir))) if args.dir \
        else _default_keys_dir(args.config)
    public, secret = directory / (args.name + ".key"), directory / (args.name + ".key_secret")
    existing = [str(path) for path in (public, secret) if path.exists()]
    if existing and not args.force:
        print("modelhost: {} already exist(s); pass --force to replace the key pair (whoever "
              "holds the old public key is then refused)".format(", ".join(existing)),
              file=sys.stderr)
        return EXIT_ERROR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Owner-only from the first byte: create_certificates writes with the umask.
    old_umask = os.umask(0o077)
    try:
        for path in (public, secret):
            if path.exists():
                path.unlink()
        zmq.auth.create_certificates(str(directory), args.name)
    finally:
        os.umask(old_umask)
    os.chmod(str(secret), 0o600)
    os.chmod(str(public), 0o644)  # a public key is meant to be copied around
    print("wrote {} (public) and {} (secret, owner-only)\n"
          "as the broker's key pair: in its configuration,\n"
          "    broker:\n"
          "      curve:\n"
          "        secret_key: {}\n"
          "        authorized_keys: {}   # the clients' public NAME.key files\n"
          "  and give clients {} (their MODELHOST_CURVE_SERVER_KEY)\n"
          "as a client's key pair: copy {} into the broker's authorized_keys directory,\n"
          "  and on this client: export MODELHOST_CURVE_CLIENT_KEY={}\n"
          "                      export MODELHOST_CURVE_SERVER_KEY=<the broker's NAME.key>"
          .format(public, secret, secret, directory / "authorized", public, public, secret))
    return 0


# --- the parser ----------------------------------------------------------------


def add_commands(sub):
    """Declare these commands on the `modelhost` subparsers."""
    up = sub.add_parser("up", help="run the broker and its daemons in the foreground")
    up.add_argument("--config", help="configuration file (default: the embedded default)")
    up.add_argument("--no-setup", action="store_true",
                    help="do not create or update the daemons' venvs first")
    up.set_defaults(handler=cmd_up)

    units = sub.add_parser("install-systemd", help="render the systemd units from the "
                                                    "configuration and install them")
    units.add_argument("--config", help="configuration file (default: the embedded default)")
    units.add_argument("--user", action="store_true", help="user units (systemctl --user)")
    units.add_argument("--dir", help="where to write them (default: /etc/systemd/system, or "
                                     "~/.config/systemd/user with --user)")
    units.add_argument("--dry-run", action="store_true", help="print them instead")
    units.set_defaults(handler=cmd_install_systemd)

    setup = sub.add_parser("setup", help="create or update the daemons' venvs")
    setup.add_argument("names", nargs="*", metavar="NAME", help="daemons (default: all)")
    setup.add_argument("--config", help="configuration file (default: the embedded default)")
    setup.add_argument("--force", action="store_true", help="recreate even if up to date")
    setup.set_defaults(handler=cmd_setup)

    gateway = sub.add_parser(
        "gateway", help="serve the OpenAI-compatible HTTP API (speech, transcriptions, models) "
        "in the foreground, as a client of the broker",
        description="An OpenAI-compatible HTTP gateway: /v1/audio/speech, "
                    "/v1/audio/transcriptions, /v1/models, /v1/audio/voices. Settings come "
                    "from the configuration's gateway section (or its defaults: "
                    "127.0.0.1:8000, tts-1 -> espeak, whisper-1 -> asr). Needs the gateway "
                    "extra: pip install 'modelhost[gateway]'.")
    gateway.add_argument("--config", help="configuration file (default: the embedded default)")
    gateway.add_argument("--listen", metavar="HOST:PORT",
                         help="where to listen instead of gateway.listen; beyond loopback "
                              "only with API keys in the configuration")
    gateway.add_argument("--endpoint", help="the broker's client endpoint (default: the "
                         "configuration's)")
    gateway.set_defaults(handler=cmd_gateway)

    logs = sub.add_parser("logs", help="a daemon's (or the broker's) recent output under "
                                       "`modelhost up`")
    logs.add_argument("name", metavar="NAME", help="a daemon, or broker")
    logs.add_argument("--config", help="the configuration `modelhost up` runs with (default: "
                      "the embedded default's runtime dir)")
    logs.add_argument("-n", "--lines", type=int, default=100, metavar="LINES",
                      help="how many of the last lines to print (default: 100)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="then print new lines as they come, until Ctrl-C")
    logs.set_defaults(handler=cmd_logs)

    keys = sub.add_parser("keys", help="make a CURVE key pair, for a broker or a client over "
                                       "tcp beyond loopback")
    keys.add_argument("name", nargs="?", default="broker", metavar="NAME",
                      help="the pair's name: NAME.key (public) and NAME.key_secret "
                           "(default: broker)")
    keys.add_argument("--dir", help="where to write them (default: <state_dir>/keys)")
    keys.add_argument("--config", help="take the state dir from this configuration file")
    keys.add_argument("--force", action="store_true", help="replace an existing pair")
    keys.set_defaults(handler=cmd_keys)
