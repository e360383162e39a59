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
    if requested(config):
        selection(config)  # a bad --matrix/--profile/--resume/--lab-config is a usage error, before collection


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
        sel = Selection(
            requested=True,
            cfg=cfg,
            spec=spec,
            cell_ids=[c.id for c in planned_cells(cfg, spec, arms)],
            property_names=property_names(spec.backends, cfg.expectations),
            resume=resume,
            aa=aa,
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
    """A matrix run driven by pytest: the runner, and the outcome once finished."""

    runner: Any  # lab.measure.matrix.MatrixRunner
    ctx: Any  # lab.session.LabContext
    keep: bool
    t0: float
    started_at: str
    completed_at_start: dict[str, Any]  # cell id -> stored ok CellResult (resume)
    outcome: Any = None  # lab.measure.matrix.MatrixOutcome
    stopped: str | None = None

    def finish(self) -> Any:
        """Tear down what the run booted, evaluate the properties, write meta (again: idempotent)."""
        from lab.measure.matrix import finish_run

        try:
            self.runner.close(keep=self.keep)
        finally:
            self.outcome = finish_run(self.runner, self.t0, self.started_at, self.stopped)
        return self.outcome


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
    from lab.measure.matrix import MatrixRunner, open_run
    from lab.session import LabContext
    from lab.verdicts.results import now_iso

    t0, at = time.monotonic(), now_iso()
    ctx = LabContext.open(sel.cfg)
    spec, store = open_run(ctx, sel.spec.name, sel.spec.profile, sel.resume, argv=sys.argv, aa=sel.aa and not sel.resume)
    runner = MatrixRunner(ctx, spec, store, _progress)
    done = {r.cell: r for r in store.load().latest() if r.ok}
    state = MatrixSession(runner, ctx, bool(_opt(config, "keep", False)), t0, at, done)
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
    """The properties over the run so far: all cells are done when the first property test runs."""
    return list(matrix_run.finish().properties)


# --------------------------------------------------------------------------- the report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None or state.outcome is None:
        return
    from rich.console import Console

    from lab.measure.matrix import summary_line
    from lab.verdicts.report import ReportContext, render

    o = state.outcome
    exp = state.ctx.cfg.expectations
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
