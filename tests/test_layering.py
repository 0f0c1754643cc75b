"""The import rules of the design, checked on the sources (read with ast: nothing is imported).

From the design (../shared/DESIGN.md, "Import rules"):
- `broker` and `daemons` use only `modelhost.protocol` (and the error types) from
  the root package; they never import each other.
- the client never imports the broker or a daemon (the `modelhost up` command may
  import the broker lazily to start it).
- everything a daemon process imports runs on Python 3.7 with only pyzmq and msgpack.

Every exception is an entry of an allow-list below, with its reason; a new import
that breaks a rule fails with the file, the line and the list it would need an
entry in, and an entry that no longer matches anything fails too, so the lists
stay short and true. The checker runs on a synthetic tree of violating modules as
well, to show that it fails.
"""

import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# What broker and daemon code may import from the root package (the client's
# modules), and why. One place to update when a module joins them.
ROOT_MODULES_FOR_BROKER_AND_DAEMONS = {
    "modelhost.protocol": "the wire contract both ends speak",
    "modelhost.errors": "the one error tree, whose codes travel on the wire",
    "modelhost.local": "what every process on this machine agrees on apart from the wire: "
                       "the runtime dir, the default endpoint, logging set-up",
    "modelhost._shm": "the shared-memory segments that the wire's references name: daemons "
                      "write and map them, the broker unlinks and sweeps them",
}

# Further imports of the root package by one broker or daemon file: (file, module) -> why.
ROOT_IMPORT_EXCEPTIONS = {
    ("broker/envs.py", "modelhost"):
        "project_root() reads the package's __file__ (lazily) to find the source tree "
        "that daemon venvs install editable",
}

# The broker modules a client file may import, only inside a function (never when
# `import modelhost` runs): (file, broker module) -> the commands that need it.
CLIENT_LAZY_BROKER_IMPORTS = {
    ("client/_cli_common.py", "modelhost.broker.config"):
        "--config of the client commands takes the endpoint (and keys) from the configuration",
    ("client/_cli_host.py", "modelhost.broker.config"):
        "`up`, `setup`, `gateway` and `keys --config` read the configuration",
    ("client/_cli_host.py", "modelhost.broker.envs"): "`modelhost setup` builds the daemons' venvs",
    ("client/_cli_host.py", "modelhost.broker.supervisor"): "`modelhost up` runs the supervisor",
    ("client/_cli_host.py", "modelhost.broker.systemd_units"):
        "`modelhost install-systemd` renders the units",
    ("client/_logs.py", "modelhost.broker.config"):
        "`modelhost logs --config` finds that configuration's runtime dir",
    # modelhost.cluster (cluster/) counts with the client: a client of the nodes' brokers
    # that starts them, as `modelhost up` does (cluster/DESIGN.md).
    ("cluster/cli.py", "modelhost.broker.config"):
        "`modelhost cluster up` (and `cluster ps --config`) read the configuration",
    ("cluster/node.py", "modelhost.broker.config"):
        "a node agent derives its node's configuration, checked as its `modelhost up` reads it",
    ("cluster/router.py", "modelhost.broker.broker"):
        "the cluster router readies its ipc endpoint as a broker does (prepare_ipc)",
}

# Besides every module of modelhost.daemons (a daemon runs one of them, or an
# engine named in its configuration), these and what they import run on 3.7.
PY37_ENTRY_MODULES = {
    "modelhost.testing": "the fake broker of users' tests, on any Python the client runs on",
}

PY37 = sorted(glob.glob("/root/.pyenv/versions/3.7*/bin/python")
              + glob.glob(os.path.expanduser("~/.pyenv/versions/3.7*/bin/python")))


# --- reading the sources ---------------------------------------------------------------------


class Source(object):
    def __init__(self, root, path, module, is_package):
        self.root = root
        self.path = path  # relative to the tree's root, with forward slashes
        self.module = module
        self.is_package = is_package

    @property
    def package(self):
        return self.module if self.is_package else self.module.rpartition(".")[0]


class Import(object):
    def __init__(self, source, line, target, lazy):
        self.source = source
        self.line = line
        self.target = target  # the modelhost module (or package) it loads
        self.lazy = lazy  # inside a function: runs only when the function does

    def where(self):
        return "{}:{}".format(self.source.path, self.line)


def package_dirs(root=ROOT):
    """{import name: folder} from pyproject.toml's [tool.setuptools.package-dir]."""
    with open(str(root / "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["tool"]["setuptools"]["package-dir"]


def sources_in(root, dirs):
    """{module name: Source} of every .py file under the package folders."""
    found = {}
    for package, folder in dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            module = ".".join([package] + parts)
            found[module] = Source(root, path.relative_to(root).as_posix(), module, is_package)
    return found


class _ImportFinder(ast.NodeVisitor):
    """The modelhost imports of one file: statements, and import_module/__import__ of a literal."""

    def __init__(self, source, modules):
        self.source = source
        self.modules = modules
        self.found = []
        self.depth = 0  # functions around the node

    def _add(self, node, name, member=None):
        if member is not None and name + "." + member in self.modules:
            name = name + "." + member  # `from package import module`
        if name == "modelhost" or name.startswith("modelhost."):
            self.found.append(Import(self.source, node.lineno, name, self.depth > 0))

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.source.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module
        for alias in node.names:
            self._add(node, name, alias.name)

    def visit_Call(self, node):
        function = node.func
        called = getattr(function, "attr", None) or getattr(function, "id", None)
        if called in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


def imports_of(source, modules):
    path = source.root / source.path
    finder = _ImportFinder(source, modules)
    finder.visit(ast.parse(path.read_text(), str(path)))
    return finder.found


def part_of(module):
    """Which part of the design a module belongs to: broker, daemons, config or client."""
    for part in ("broker", "daemons", "config"):
        if module == "modelhost." + part or module.startswith("modelhost." + part + "."):
            return part
    return "client"


# --- the rules -------------------------------------------------------------------------------


def layering_violations(modules, root_modules=None, root_exceptions=None,
                        client_lazy_broker=None):
    """(violations: lines for people, the allow-list entries that were used)."""
    root_modules = ROOT_MODULES_FOR_BROKER_AND_DAEMONS if root_modules is None else root_modules
    root_exceptions = ROOT_IMPORT_EXCEPTIONS if root_exceptions is None else root_exceptions
    client_lazy_broker = CLIENT_LAZY_BROKER_IMPORTS if client_lazy_broker is None \
        else client_lazy_broker
    violations, used = [], set()
    for source in modules.values():
        owner = part_of(source.module)
        for found in imports_of(source, modules):
            target, key = found.target, (source.path, found.target)
            into = part_of(target)
            if {owner, into} == {"broker", "daemons"}:
                violations.append("{}: {} imports {}: broker and daemons never import each "
                                  "other".format(found.where(), owner, target))
            elif owner in ("broker", "daemons") and into == "client":
                if target in root_modules:
                    continue
                if key in root_exceptions:
                    used.add(key)
                    continue
                violations.append(
                    "{}: {} imports {} from the root package, which gives broker and daemons "
                    "only {} (ROOT_MODULES_FOR_BROKER_AND_DAEMONS); an exception needs an "
                    "entry in ROOT_IMPORT_EXCEPTIONS".format(
                        found.where(), owner, target, ", ".join(sorted(root_modules))))
            elif owner == "client" and into == "daemons":
                violations.append("{}: the client imports {}: the client never imports a "
                                  "daemon".format(found.where(), target))
            elif owner == "client" and into == "broker":
                if not found.lazy:
                    violations.append(
                        "{}: the client imports {} at module top level: `import modelhost` "
                        "must never load the broker; import it inside the command's "
                        "function".format(found.where(), target))
                elif key in client_lazy_broker:
                    used.add(key)
                else:
                    violations.append(
                        "{}: the client imports {} (lazily); a command that runs the broker "
                        "needs an entry in CLIENT_LAZY_BROKER_IMPORTS: ({!r}, {!r}): "
                        "\"why\"".format(found.where(), target, source.path, target))
    return sorted(violations), used


def daemon_side(modules, extra_entries=()):
    """{module: the import chain that reaches it} of everything a daemon process (and the
    extra entry modules) may import: imports in functions too, and parent packages."""
    entries = sorted(name for name in modules if part_of(name) == "daemons")
    entries += [name for name in extra_entries if name in modules]
    chains = {name: [name] for name in entries}
    todo = list(entries)
    while todo:
        name = todo.pop()
        reached = [found.target for found in imports_of(modules[name], modules)]
        parts = name.split(".")
        reached += [".".join(parts[:end]) for end in range(1, len(parts))]
        for target in reached:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]  # `import a.b.name` of a name in a.b
            if target in modules and target not in chains:
                chains[target] = chains[name] + [target]
                todo.append(target)
    return chains


def daemon_side_violations(chains):
    return sorted("a daemon process would load broker code: {}".format(" -> ".join(chain))
                  for name, chain in chains.items() if part_of(name) == "broker")


def py37_compile_failures(python, paths):
    """{path: error} for each file that Python 3.7 cannot compile."""
    script = (
        "import json, py_compile, sys, tempfile\n"
        "failed = {}\n"
        "with tempfile.TemporaryDirectory() as out:\n"
        "    for index, path in enumerate(sys.argv[1:]):\n"
        "        try:\n"
        "            py_compile.compile(path, cfile='{}/{}.pyc'.format(out, index), doraise=True)\n"
        "        except py_compile.PyCompileError as exc:\n"
        "            failed[path] = exc.msg.strip().splitlines()[-1]\n"
        "print(json.dumps(failed))\n")
    out = subprocess.run([python, "-c", script] + [str(path) for path in paths],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert out.returncode == 0, out.stdout.decode()
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


# --- the real tree ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules():
    return sources_in(ROOT, package_dirs())


def test_the_sources_keep_the_import_rules(modules):
    violations, _ = layering_violations(modules)
    assert not violations, "\n".join(violations)


def test_every_allow_list_entry_is_still_needed(modules):
    _, used = layering_violations(modules)
    stale = sorted(set(ROOT_IMPORT_EXCEPTIONS) | set(CLIENT_LAZY_BROKER_IMPORTS))
    stale = [entry for entry in stale if entry not in used]
    assert not stale, "allow-list entries that match no import any more; remove them: {}".format(
        stale)
    missing = sorted(name for name in list(ROOT_MODULES_FOR_BROKER_AND_DAEMONS)
                     + list(PY37_ENTRY_MODULES) if name not in modules)
    assert not missing, "listed modules that do not exist: {}".format(missing)


def test_a_daemon_process_never_loads_broker_code(modules):
    chains = daemon_side(modules, PY37_ENTRY_MODULES)
    assert "modelhost.daemons.runtime" in chains and "modelhost.protocol" in chains
    violations = daemon_side_violations(chains)
    assert not violations, "\n".join(violations)


@pytest.mark.skipif(not PY37, reason="no Python 3.7 interpreter under ~/.pyenv")
def test_what_a_daemon_process_imports_compiles_on_python37(modules):
    chains = daemon_side(modules, PY37_ENTRY_MODULES)
    paths = [ROOT / modules[name].path for name in sorted(chains)]
    failures = py37_compile_failures(PY37[-1], paths)
    assert not failures, "\n".join("{}: {}".format(path, error)
                                   for path, error in sorted(failures.items()))


PY37_IMPORTS = r"""
import importlib, json, sys, traceback
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc().strip().splitlines()[-1]
print(json.dumps({"python": sys.version.split()[0], "failed": failed}))
"""


@pytest.mark.slow
def test_what_a_daemon_process_imports_imports_on_python37(modules, test_venvs, tmp_path):
    names = sorted(daemon_side(modules, PY37_ENTRY_MODULES))
    out = subprocess.run([str(test_venvs["py37"] / "bin" / "python"), "-c", PY37_IMPORTS]
                         + names, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stdout.decode()
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["python"].startswith("3.7.")
    assert not report["failed"], "\n".join("{}: {}".format(name, error)
                                           for name, error in sorted(report["failed"].items()))


# --- the checker fails: a synthetic tree of violations ---------------------------------------


SYNTHETIC = {
    "client/__init__.py": "from . import protocol\n",
    "client/protocol.py": "from .errors import BadMessage\n",
    "client/errors.py": "",
    "client/cli.py": "from modelhost.broker import supervisor\n",
    "client/_commands.py": "def up():\n    from modelhost.broker import config\n",
    "client/_engines.py": "import modelhost.daemons.runtime\n",
    "broker/__init__.py": "",
    "broker/supervisor.py": "",
    "broker/config.py": "from modelhost.protocol import VERSION\n",
    "broker/run.py": "from modelhost import protocol\nfrom modelhost.daemons import runtime\n"
                     "from modelhost import cli\n",
    "daemons/__init__.py": "",
    "daemons/runtime.py": "from modelhost import protocol\nfrom modelhost.errors import "
                          "BadMessage\nimport importlib\n\n\ndef engine():\n"
                          "    return importlib.import_module('modelhost.cli')\n",
    "daemons/engine.py": "from ..broker import config\n\n\ndef f(x):\n"
                         "    if (y := x):\n        return y\n",
}


@pytest.fixture
def synthetic(tmp_path):
    for path, text in SYNTHETIC.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    dirs = {"modelhost": "client", "modelhost.broker": "broker", "modelhost.daemons": "daemons"}
    return tmp_path, sources_in(tmp_path, dirs)


def test_the_checker_names_every_violation(synthetic):
    _, modules = synthetic
    violations, used = layering_violations(modules, client_lazy_broker={})
    assert [line.split(": ", 1)[0] for line in violations] == [
        "broker/run.py:2", "broker/run.py:3", "client/_commands.py:2", "client/_engines.py:1",
        "client/cli.py:1", "daemons/engine.py:1", "daemons/runtime.py:7"]
    text = "\n".join(violations)
    assert "broker/run.py:2: broker imports modelhost.daemons.runtime: broker and daemons " \
           "never import each other" in text
    assert "broker/run.py:3: broker imports modelhost.cli from the root package" in text
    assert "client/_commands.py:2: the client imports modelhost.broker.config (lazily); a " \
           "command that runs the broker needs an entry in CLIENT_LAZY_BROKER_IMPORTS" in text
    assert "client/_engines.py:1: the client imports modelhost.daemons.runtime: the client " \
           "never imports a daemon" in text
    assert "client/cli.py:1: the client imports modelhost.broker.supervisor at module top " \
           "level" in text
    # A relative import out of the package, and a dynamic import of a literal name.
    assert "daemons/engine.py:1: daemons imports modelhost.broker.config" in text
    assert "daemons/runtime.py:7: daemons imports modelhost.cli from the root package" in text
    assert not used


def test_an_allow_list_entry_admits_exactly_its_import(synthetic):
    _, modules = synthetic
    entry = ("client/_commands.py", "modelhost.broker.config")
    violations, used = layering_violations(modules, client_lazy_broker={entry: "`up`"})
    assert used == {entry}
    assert not any(line.startswith("client/_commands.py") for line in violations)
    # Top-level stays a violation even when listed.
    violations, _ = layering_violations(
        modules, client_lazy_broker={("client/cli.py", "modelhost.broker.supervisor"): "up"})
    assert any(line.startswith("client/cli.py:1:") for line in violations)


def test_the_daemon_side_closure_finds_broker_code_and_its_chain(synthetic):
    _, modules = synthetic
    chains = daemon_side(modules)
    # Parent packages count: importing modelhost.daemons runs modelhost/__init__.py.
    assert chains["modelhost"][-1] == "modelhost" and "modelhost.errors" in chains
    assert "modelhost.cli" in chains  # the lazy, dynamic import counts too
    violations = daemon_side_violations(chains)
    assert len(violations) == 3  # broker.config, broker.supervisor and their package
    assert "a daemon process would load broker code: modelhost.daemons.engine -> " \
           "modelhost.broker.config" in violations
    assert "a daemon process would load broker code: modelhost.daemons.runtime -> " \
           "modelhost.cli -> modelhost.broker.supervisor" in violations


@pytest.mark.skipif(not PY37, reason="no Python 3.7 interpreter under ~/.pyenv")
def test_the_python37_check_fails_on_newer_syntax(synthetic):
    root, modules = synthetic
    chains = daemon_side(modules)
    failures = py37_compile_failures(PY37[-1], [root / modules[name].path for name in chains])
    assert list(failures) == [str(root / "daemons" / "engine.py")]
    assert "invalid syntax" in failures[str(root / "daemons" / "engine.py")]
