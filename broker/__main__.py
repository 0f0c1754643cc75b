"""`python -m modelhost.broker [--config FILE]`: the broker process alone.

`modelhost up` starts it under its supervisor; systemd starts it directly.
"""

import argparse
import sys

import zmq

from modelhost import local

from .broker import Broker
from .config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelhost.broker")
    parser.add_argument("--config", help="configuration file (default: the embedded default)")
    parser.add_argument("--parent-pid", type=int,
                        help="exit when this supervising process is gone")
    parser.add_argument("--systemd", choices=("system", "user"),
                        help="the daemons are systemd units (modelhost-daemon@NAME.service) of "
                             "this systemctl scope: stop and start them through systemctl")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("modelhost broker: refusing to start on a bad configuration:\n{}".format(exc),
              file=sys.stderr)
        return 2
    local.configure_logging("broker", config.broker.log_level)
    try:
        broker = Broker(config, parent_pid=args.parent_pid, systemd_scope=args.systemd)
    except (OSError, zmq.ZMQError) as exc:
        print("modelhost broker: cannot listen: {}".format(exc), file=sys.stderr)
        return 2
    return broker.run()


if __name__ == "__main__":
    sys.exit(main())
