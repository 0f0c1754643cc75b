"""What the command line's modules share: exit statuses, where the broker is, and the
options every client command takes."""

import argparse
import os

from . import _curve, local

EXIT_ERROR = 1
EXIT_USAGE = 2


def endpoint_of(args):
    """The broker's client endpoint: --endpoint, else --config's broker, else the default."""
    if getattr(args, "endpoint", None):
        return args.endpoint
    if getattr(args, "config", None):
        from modelhost.broker.config import load_config

        broker = load_config(args.config).broker
        if broker.curve is not None and not (os.environ.get(_curve.SERVER_KEY_ENV)
                                             or os.environ.get(_curve.CLIENT_KEY_ENV)):
            # On the broker's host, as a user who can read its secret key: connect
            # as the broker itself, whose key is always let in.
            os.environ[_curve.SERVER_KEY_ENV] = str(broker.curve.secret_key)
            os.environ[_curve.CLIENT_KEY_ENV] = str(broker.curve.secret_key)
        return broker.frontend
    return local.default_endpoint()


def client_options(parser):
    """--endpoint, --config and --json: the options of every command that asks the broker."""
    parser.add_argument("--endpoint", help="the broker's client endpoint (default: "
                        "$MODELHOST_ENDPOINT or the runtime dir's socket)")
    parser.add_argument("--config", help="take the endpoint from this configuration file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def positive(convert):
    """An argparse type: `convert`, and more than zero."""
    def parse(text):
        value = convert(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be more than 0, got {}".format(text))
        return value
    return parse
