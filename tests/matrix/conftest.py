"""The pytest face of the matrix runner (lab/measure/matrix.py).

    pytest tests/matrix [--matrix NAME] [--profile NAME] [--resume RUN] [--keep] [--lab-config PATH]

One test per cell (`test_cell[vhost-qlen1-rtt0-nodrop]`), then one per
property (`test_property[vhost/stock-collapses-qlen1]`); the rich report is
printed at the end of the session. Results go to a run directory under the
lab's workdir exactly as `lab run` writes them, so `lab report` and
`--resume` work on pytest runs too.

These tests boot VMs for minutes. They run only when asked for: the path
tests/matrix (or a file in it) on the command line, or `-m matrix`. Anywhere
else (a bare `pytest`), they are collected as two placeholders that skip
with a message saying so. Without root or libvirt they skip too, saying why.

The options are registered here, so pass tests/matrix as the path: pytest
reads a conftest's options only when the conftest is among the initial ones.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
NOT_REQUESTED = "matrix-not-requested"
NOT_REQUESTED_WHY = (
    "the matrix tests boot lab hosts and guests (minutes per cell): run them explicitly with "
    "`pytest tests/matrix [--profile smoke]` or select them with `-m matrix`"
)

log = logging.getLogger("lab.measure.matrix")


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("vhost-lab matrix", "vhost-lab matrix runs (tests/matrix)")
    g.addoption("--matrix", default="vhost-matrix", help="matrix of lab.toml to run (default: vhost-matrix)")
    g.addoption("--profile", default=None, help="profile of the matrix to apply, e.g. smoke")
    g.addoption("--resume", default=None, metavar="RUN",
                help="continue run RUN (id, unique prefix, 'latest' or path): only missing/errored cells run")
    g.addoption("--keep", action="store_true", default=False, help="leave the lab host running at the end")
    g.addoption("--lab-config", default=None, metavar="PATH", help="lab.toml to use (default: $LAB_CONFIG, ./lab.toml)")
    g.addoption("--aa", action="store_true", default=False, help="an A/A control: the baseline kernel against a copy of itself")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "matrix: a vhost-lab matrix run (tests/matrix); boots nested VMs")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist --dist loadgroup: tests of one group run in one worker")
    if requested(config):
        selection(config)  # a bad --matrix/--profile/--resume/--lab-config is a usage error, before collection
        if config.pluginmanager.hasplugin("xdist") and not is_worker(config):
            config.pluginmanager.register(_Controller(config), "vhost-lab-matrix-controller")


# --------------------------------------------------------------------------- several hosts: pytest-xdist
#
#     pytest tests/matrix --lab-config two-hosts.toml -n 2 --dist loadgroup
#
# One worker per host: every cell test carries xdist_group(<its host>), so all
# cells of a host run in one worker, which owns that host (boots it, swaps its
# modules, destroys it). The controller creates the run directory once and
# hands it to the workers; every worker appends to the same results.jsonl and
# meta.json under the run's flock (lab.verdicts.results.RunStore.locked). The
# property tests run in the last host's worker after its cells, and wait until
# every other host's cells are in the results file too.
#
# The grouping is xdist's own LoadScopeScheduling (loadgroup's base), given
# the host as each test's scope through the pytest_xdist_make_scheduler hook:
# loadgroup itself reads the groups from node ids it rewrites
# (item._nodeid += "@group"), which pytest 9.2 no longer honours (Node.nodeid
# comes from Node._id), so --dist loadgroup alone would spread one host's
# cells over both workers, and two workers would fight over one lab host.


def is_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker process."""
    return hasattr(config, "workerinput")


RUN_DIR = pytest.StashKey[str]()
WORKER_RUN_KEY = "vhost_lab_run_dir"


class _Controller:
    """The xdist controller's part: one run directory for every worker."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def run_dir(self) -> str:
        if RUN_DIR not in self.config.stash:
            from lab.measure.matrix import open_run
            from lab.session import LabContext

            sel = selection(self.config)
            ctx = LabContext.open(sel.cfg)
            _spec, store = open_run(ctx, sel.spec.name, sel.spec.profile, sel.resume, argv=sys.argv, aa=sel.aa and not sel.resume)
            self.config.stash[RUN_DIR] = str(store.run_dir)
        return self.config.stash[RUN_DIR]

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[WORKER_RUN_KEY] = self.run_dir()

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        sel = selection(config)
        if len(sel.hosts) < 2 or config.getvalue("dist") not in ("loadgroup", "loadscope"):
            return None  # xdist's own choice
        return host_scheduling(config, log, sel)


def host_of_test(nodeid: str, sel: Selection) -> str | None:
    """The host a matrix test belongs to: its cell's host; the property tests go with the last host."""
    nodeid = nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid  # loadgroup's suffix, where it works
    name = nodeid.rsplit("::", 1)[-1]
    if name.startswith("test_cell[") and name.endswith("]"):
        return sel.where.get(name[len("test_cell["):-1])
    if name.startswith("test_property["):
        return sel.hosts[-1]
    return None


def host_scheduling(config: pytest.Config, log: Any, sel: Selection) -> Any:
    """xdist's LoadScopeScheduling with a test's host as its scope: one work unit per host."""
    from xdist.scheduler import LoadScopeScheduling

    class HostScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return host_of_test(nodeid, sel) or nodeid

    return HostScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sel = selection(config)
    if not sel.requested or len(sel.hosts) < 2:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if "cell_id" in params and params["cell_id"] in sel.where:
            item.add_marker(pytest.mark.xdist_group(name=sel.where[params["cell_id"]]))
        elif "property_name" in params:
            item.add_marker(pytest.mark.xdist_group(name=sel.hosts[-1]))


def _opt(config: pytest.Config, name: str, default: Any = None) -> Any:
    # With a default, getoption never raises, also when this conftest was not an
    # initial one and its options were registered too late to be parsed.
    return config.getoption(name, default)


def requested(config: pytest.Config) -> bool:
    """True when the user asked for the matrix tests: a path in tests/matrix, or -m matrix."""
    base = Path(str(config.invocation_params.dir))
    for arg in config.args:
        p = Path(str(arg).split("::", 1)[0])
        p = (p if p.is_absolute() else base / p).resolve()
        if p == HERE or HERE in p.parents:
            return True
    expr = str(_opt(config, "markexpr", "") or "")
    return "matrix" in expr.split() and "not matrix" not in expr


# --------------------------------------------------------------------------- what to run


@dataclass
class Selection:
    """The matrix chosen on the command line, resolved at collection time."""

    requested: bool
    cfg: Any = None  # lab.config.LabConfig
    spec: Any = None  # lab.config.MatrixSpec (profile applied)
    cell_ids: list[str] = field(default_factory=list)
    property_names: list[str] = field(default_factory=list)
    resume: str | None = None
    aa: bool = False
    hosts: tuple[str, ...] = ()  # the hosts the cells run on (matrices.<name>.hosts, or just host)
    where: dict[str, str] = field(default_factory=dict)  # cell id -> host (lab.measure.cells.assign_hosts)


SELECTION = pytest.StashKey[Selection]()
STATE = pytest.StashKey["MatrixSession"]()


def selection(config: pytest.Config) -> Selection:
    """Load lab.toml and the matrix once per session (cached on the config)."""
    sel = config.stash.get(SELECTION, None)
    if sel is not None:
        return sel
    if not requested(config):
        sel = Selection(requested=False)
    else:
        from lab.config import load_config
        from lab.errors import LabError
        from lab.measure.cells import arms_of
        from lab.measure.matrix import arms_from_meta, matrix_spec, planned_cells, property_names
        from lab.verdicts.results import RunStore, resolve_run

        try:
            cfg = load_config(_opt(config, "lab_config"))
            name, profile, resume = _opt(config, "matrix", "vhost-matrix"), _opt(config, "profile"), _opt(config, "resume")
            aa = bool(_opt(config, "aa", False))
            arms = None
            if resume:
                meta = RunStore(resolve_run(cfg.workdir, resume)).read_meta()
                if name != meta.matrix and name == "vhost-matrix":
                    name = meta.matrix  # the default name gives way to the resumed run's matrix
                profile = profile or meta.profile
                arms = arms_from_meta(meta) or None
                aa = bool(meta.extra.get("aa"))
            spec = matrix_spec(cfg, name, profile)
            arms = arms or arms_of(spec, aa=aa)
        except LabError as e:
            raise pytest.UsageError(f"vhost-lab matrix: {e}") from None
        from lab.measure.cells import assign_hosts

        plan = planned_cells(cfg, spec, arms)
        sel = Selection(
            requested=True,
            cfg=cfg,
            spec=spec,
            cell_ids=[c.id for c in plan],
            property_names=property_names(spec.backends, cfg.expectations),
            resume=resume,
            aa=aa,
            hosts=spec.run_hosts,
            where=assign_hosts(plan, spec.run_hosts),
        )
    config.stash[SELECTION] = sel
    return sel


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sel = selection(metafunc.config)
    if "cell_id" in metafunc.fixturenames:
        ids = sel.cell_ids if sel.requested else [NOT_REQUESTED]
        metafunc.parametrize("cell_id", ids, ids=ids)
    if "property_name" in metafunc.fixturenames:
        names = sel.property_names if sel.requested else [NOT_REQUESTED]
        metafunc.parametrize("property_name", names, ids=names)


# --------------------------------------------------------------------------- the session


def cannot_run() -> str | None:
    """Why this machine cannot run a matrix (root, libvirt), or None."""
    if os.geteuid() != 0:
        return "the matrix needs root (libvirtd, taps, nested VMs): run pytest tests/matrix as root"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install -e .[test]; needs libvirt-dev and pkg-config)"
    from lab.errors import LabError
    from lab.hosts.host import outer_libvirt

    try:
        outer_libvirt().close()
    except LabError as e:
        return f"libvirt is not usable here: {e}"
    return None


def _progress(event) -> None:
    # Boot steps tick every second; log each new step once (pytest shows it with
    # -o log_cli=true, and in the report of a failed test), and every other event.
    from lab.events import Step

    if isinstance(event, Step):
        if event.key != getattr(_progress, "last", None) or event.warning:
            _progress.last = event.key  # type: ignore[attr-defined]
            log.info("%s", event.text())
    else:
        log.info("%s", event)


@dataclass
class MatrixSession:
    """A matrix run driven by pytest: one runner per host this process owns, and the outcome once finished."""

    ctx: Any  # lab.session.LabContext
    spec: Any  # lab.config.MatrixSpec
    store: Any  # lab.verdicts.results.RunStore
    where: dict[str, str]  # cell id -> host
    keep: bool
    t0: float
    started_at: str
    completed_at_start: dict[str, Any]  # cell id -> stored ok CellResult (resume)
    outcome: Any = None  # lab.measure.matrix.MatrixOutcome
    stopped: str | None = None
    runners: dict[str, Any] = field(default_factory=dict)  # host -> lab.measure.matrix.MatrixRunner
    finished: set[str] = field(default_factory=set)

    def runner_for(self, cell_id: str) -> Any:
        """The runner of the host that measures `cell_id` (made on first use: a host is booted only by its worker)."""
        from lab.measure.matrix import MatrixRunner

        host = self.where.get(cell_id, self.spec.host)
        if host not in self.runners:
            self.runners[host] = MatrixRunner(self.ctx, self.spec, self.store, _progress, host=host)
        return self.runners[host]

    @property
    def runner(self) -> Any:
        """The first runner (single-host runs have exactly one)."""
        if not self.runners:
            return self.runner_for(next(iter(self.where), ""))
        return next(iter(self.runners.values()))

    def finish(self) -> Any:
        """Tear down what this process booted, write its sessions into meta (idempotent), evaluate the whole run."""
        from lab.measure.matrix import evaluate_run, finish_run

        outcome = None
        for runner in list(self.runners.values()):
            try:
                runner.close(keep=self.keep)
            finally:
                outcome = finish_run(runner, self.t0, self.started_at, self.stopped)
        if outcome is None:
            from lab.measure.matrix import MatrixOutcome

            data = self.store.load()
            props = evaluate_run(data, self.ctx.cfg)
            outcome = MatrixOutcome(self.store.run_dir, data, props, False, 0.0, 0.0, 0.0)
        self.outcome = outcome
        return self.outcome

    def wait_for_other_hosts(self) -> None:
        """Until every planned cell has a result (other workers measure other hosts), or nothing arrived for too long."""
        t = self.ctx.cfg.timeouts
        idle_limit = t.host_boot + t.guest_boot + self.spec.duration_s + t.cell_grace + 60
        last, since = -1, time.monotonic()
        while True:
            data = self.store.load()
            if not data.missing_ids():
                return
            if len(data.results) != last:
                last, since = len(data.results), time.monotonic()
            elif time.monotonic() - since > idle_limit:
                log.warning("waited %.0fs with no new cell result; %d cells missing", idle_limit, len(data.missing_ids()))
                return
            time.sleep(5)


@pytest.fixture(scope="session")
def matrix_run(request: pytest.FixtureRequest):
    """The session's MatrixSession; skips cleanly when not requested or not possible here."""
    config = request.config
    sel = selection(config)
    if not sel.requested:
        pytest.skip(NOT_REQUESTED_WHY)
    why = cannot_run()
    if why:
        pytest.skip(why)
    from lab.measure.matrix import open_run
    from lab.session import LabContext
    from lab.verdicts.results import RunStore, now_iso

    t0, at = time.monotonic(), now_iso()
    ctx = LabContext.open(sel.cfg)
    if is_worker(config) and WORKER_RUN_KEY in config.workerinput:
        spec, store = sel.spec, RunStore(config.workerinput[WORKER_RUN_KEY])  # the controller opened the run
    else:
        spec, store = open_run(ctx, sel.spec.name, sel.spec.profile, sel.resume, argv=sys.argv, aa=sel.aa and not sel.resume)
    done = {r.cell: r for r in store.load().latest() if r.ok}
    state = MatrixSession(ctx, spec, store, dict(sel.where), bool(_opt(config, "keep", False)), t0, at, done)
    config.stash[STATE] = state
    try:
        yield state
    finally:
        try:
            state.finish()
        finally:
            ctx.close()


@pytest.fixture(scope="session")
def matrix_properties(matrix_run: MatrixSession) -> list[Any]:
    """The properties over the whole run: this process's cells are done when the first property test runs;
    with several hosts (xdist workers), the other hosts' cells are waited for."""
    matrix_run.finish()
    if len(matrix_run.spec.run_hosts) > 1:
        from lab.measure.matrix import evaluate_run

        matrix_run.wait_for_other_hosts()
        return list(evaluate_run(matrix_run.store.load(), matrix_run.ctx.cfg))
    return list(matrix_run.outcome.properties)


# --------------------------------------------------------------------------- the report


def _outcome_from_disk(config: pytest.Config) -> Any:
    """The xdist controller's view of the run: everything the workers wrote, loaded back."""
    run_dir = config.stash.get(RUN_DIR, None)
    if run_dir is None:
        return None
    from lab.measure.matrix import MatrixOutcome, evaluate_run
    from lab.verdicts.results import RunStore

    sel = selection(config)
    data = RunStore(run_dir).load()
    props = evaluate_run(data, sel.cfg)
    return MatrixOutcome(Path(run_dir), data, props, False, 0.0, 0.0, 0.0, stopped=data.meta.extra.get("stopped"))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    o = state.outcome if state is not None else _outcome_from_disk(config)
    if o is None:
        return
    from rich.console import Console

    from lab.measure.matrix import summary_line
    from lab.verdicts.report import ReportContext, render

    exp = selection(config).cfg.expectations
    tw = getattr(terminalreporter, "_tw", None)
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=max(100, getattr(tw, "fullwidth", 120)),
        force_terminal=bool(getattr(terminalreporter, "hasmarkup", False)),
        highlight=False,
    )
    render(o.run_data, o.properties, console, rc=ReportContext(None, exp.same_tolerance, exp.confidence))
    console.print(summary_line(o))
    console.print(f"run directory: {o.run_dir}")
    if o.stopped or any(not r.ok for r in o.run_data.latest()) or o.run_data.missing_ids():
        console.print(f"resume with: pytest tests/matrix --resume {o.run_dir.name}")
    terminalreporter.write_sep("=", "vhost-lab matrix report")
    terminalreporter.write(buf.getvalue())
