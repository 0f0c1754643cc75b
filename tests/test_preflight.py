"""An engine's preflight(): what it lacks here, shown by setup and by a daemon that refuses to start."""

import sys

from modelhost.broker import envs
from modelhost.broker.config import DaemonConfig
from modelhost.daemons.preflight import problems_of

from conftest import ENGINES, daemon_yaml


def test_preflight_lists_what_the_engine_lacks(tmp_path):
    sys.path.insert(0, str(ENGINES))
    try:
        missing = problems_of("probe_engine:NeedsWeightsEngine", {"weights": str(tmp_path / "no")})
        present = problems_of("probe_engine:NeedsWeightsEngine", {"weights": str(tmp_path)})
        broken = problems_of("no_such_module:Engine", {})
    finally:
        sys.path.remove(str(ENGINES))
    assert missing == ["weights not found at {}: expected a directory holding model.pt (see its "
                       "README for where to download it)".format(tmp_path / "no")]
    assert present == []
    assert broken[0].startswith("cannot import engine no_such_module:Engine")


def test_setup_asks_the_engine_in_the_daemons_own_interpreter(tmp_path):
    daemon = DaemonConfig(name="needs", engine="probe_engine:NeedsWeightsEngine",
                          python=sys.executable, options={"weights": str(tmp_path / "no")},
                          pythonpath=(ENGINES,))
    assert envs.preflight(daemon) == [
        "weights not found at {}: expected a directory holding model.pt (see its README for "
        "where to download it)".format(tmp_path / "no")]


def test_a_daemon_whose_weights_are_missing_shows_failed_with_the_path(make_host, tmp_path):
    missing = tmp_path / "weights"
    host = make_host([daemon_yaml("needs", engine="probe_engine:NeedsWeightsEngine",
                                  options="{{weights: {}}}".format(missing))]).start()
    status = host.wait_for(lambda s: s["daemons"][0]["state"] == "failed",
                           what="the daemon to fail")
    assert str(missing) in status["daemons"][0]["last_error"]
