"""The `lab` command: up, down, status, shell, console, build, run, report, doctor, config.

Every user error is one line on stderr and exit 2 (lab.errors.LabError);
tracebacks are for bugs only (or with --debug).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lab.errors import LabError
from lab.events import Step

err_console = Console(stderr=True)


def _console() -> Console:
    return Console()


class _Progress:
    """Steps (lab.events.Step) as a one-line live status; plain lines, one per new step, when not a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = None
        self.last: tuple[str, str] | None = None

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            self.status = self.console.status("starting")
            self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def __call__(self, step: object) -> None:
        if not isinstance(step, Step):
            # session events (HostBooted, GuestBooted, ModulesSwapped) come through the same channel
            from dataclasses import asdict, is_dataclass

            what = ", ".join(f"{k} {v}" for k, v in asdict(step).items()) if is_dataclass(step) else str(step)
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {type(step).__name__}: {what}", highlight=False)
            return
        if step.warning:
            self.console.print(f"[yellow]{step.text()}[/]", highlight=False)
        elif self.status is not None:
            self.status.update(step.text())
        elif step.key != self.last:
            # Non-terminal (CI): one line per step, not per tick.
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {step.text()}", highlight=False)
        self.last = step.key


def _context(args):
    from lab.config import load_config
    from lab.session import LabContext

    return LabContext.open(load_config(args.config))


# --------------------------------------------------------------------------- commands


def cmd_config(args) -> int:
    """Print the resolved lab."""
    from lab.config import load_config
    from lab.configview import config_to_dict, render_config

    cfg = load_config(args.config)
    if args.json:
        print(json.dumps(config_to_dict(cfg), indent=2, default=str))
    else:
        _console().print(render_config(cfg))
    return 0


def cmd_up(args) -> int:
    """Build what is missing, boot hosts and guests, wait for SSH, show status."""
    from lab.lifecycle import preflight, up

    console = _console()
    ctx = _context(args)
    # A name typo or an unreachable libvirtd is refused before anything starts,
    # so it is one line and not a cleanup of the lab.
    preflight(ctx, args.names)
    t0 = time.monotonic()
    with _Progress(console) as progress:
        # on failure up() destroys what it started, and only that
        guests = up(ctx, args.names, progress, keep_on_error=args.keep_on_error)
    console.print(f"[green]up[/] in {time.monotonic() - t0:.1f}s: " + ", ".join(f"{g.plan.name} ({g.boot_seconds:.0f}s boot)" for g in guests))
    _print_status(console, ctx)
    ctx.close()
    return 0


def cmd_down(args) -> int:
    """Destroy guests, taps and lab hosts of this lab (idempotent)."""
    from lab.lifecycle import down

    console = _console()
    ctx = _context(args)
    with _Progress(console) as progress:
        gone = down(ctx, progress)
    console.print("[green]down[/]: " + (", ".join(gone) if gone else "nothing was running"))
    return 0


def _print_status(console: Console, ctx) -> None:
    from lab.lifecycle import status

    hosts, guests = status(ctx)
    t = Table(title=f"lab {ctx.cfg.name}: hosts", title_justify="left")
    for c in ("host", "provider", "state", "kernel", "release", "accel", "nodrop", "modules", "ssh"):
        t.add_column(c)
    yn = {True: "[green]yes[/]", False: "no", None: "-"}
    for h in hosts:
        match = {True: "[green]built[/]", False: "[red]NOT the built ones[/]", None: "-"}[h.modules_match]
        t.add_row(h.name, h.provider, h.state, h.kernel_recipe or "-", h.release or "-", h.accel or "-", yn[h.nodrop], match, h.ssh or "-")
    console.print(t)
    g = Table(title=f"lab {ctx.cfg.name}: guests", title_justify="left")
    for c in ("guest", "host", "state", "backend", "tap", "txqueuelen", "qdisc", "vhost", "address"):
        g.add_column(c)
    for s in guests:
        vh = {True: "[green]on[/]", False: "[yellow]off[/]", None: "-"}[s.vhost]
        g.add_row(s.name, s.host, s.state, s.backend, s.tap, str(s.txqueuelen or "-"), s.qdisc or "-", vh, s.address or "-")
    console.print(g)


def cmd_status(args) -> int:
    """Show hosts (kernel, accel, nodrop) and guests (tap, txqueuelen, qdisc, vhost)."""
    ctx = _context(args)
    _print_status(_console(), ctx)
    ctx.close()
    return 0


def cmd_shell(args) -> int:
    """Interactive SSH into a guest or host; with `-- CMD...` run CMD and return its exit code."""
    from lab.lifecycle import guest_ssh_endpoint

    ctx = _context(args)
    ep = guest_ssh_endpoint(ctx, args.name)
    ctx.close()
    cmd = list(args.command or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    argv = ep.ssh_argv(cmd or None, tty=not cmd and sys.stdin.isatty())
    os.execvp(argv[0], argv)
    return 0  # not reached


def cmd_console(args) -> int:
    """Print (or follow) a guest's or lab host's serial console log."""
    from lab.session import connect_host

    ctx = _context(args)
    cfg = ctx.cfg
    if args.name in cfg.hosts:
        path = ctx.paths.host_console(args.name)
    elif args.name in cfg.guests:
        g = cfg.guests[args.name]
        host = connect_host(ctx, cfg.hosts[g.host])
        path = host.local_guest_log(g.name) if host is not None else None
        if path is None:
            path = ctx.paths.host_dir(g.host) / "guests" / f"{g.name}.console.log"
    else:
        raise LabError(f"no guest or host named {args.name!r}")
    if not path.exists():
        raise LabError(f"no console log for {args.name} yet ({path})", hint=f"lab up {args.name}")
    argv = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(path)]
    os.execvp(argv[0], argv)
    return 0


def cmd_build(args) -> int:
    """Build (or find cached) kernel artifacts and guest images."""
    from lab.session import guest_image, kernel_boot

    console = _console()
    ctx = _context(args)
    cfg = ctx.cfg
    what = args.what
    names = args.names or (list(cfg.kernels) if what == "kernel" else list(cfg.images))
    for n in names:
        table = cfg.kernels if what == "kernel" else cfg.images
        if n not in table:
            raise LabError(f"no {what} named {n!r} in {cfg.source}", hint="one of: " + ", ".join(table))
        t0 = time.monotonic()
        with _Progress(console) as progress:
            if what == "kernel":
                kb = kernel_boot(ctx, n, progress)
                console.print(f"kernel [bold]{n}[/]: {kb.release} key {kb.key[:12]} ({time.monotonic() - t0:.1f}s) {kb.vmlinuz.parent}")
            else:
                path = guest_image(ctx, n, progress)
                console.print(f"image [bold]{n}[/]: {path} ({time.monotonic() - t0:.1f}s)")
    return 0


def cmd_run(args) -> int:
    """Run a matrix (no pytest): results appended per cell, live progress, report, properties."""
    from lab.measure.matrix import run_matrix, summary_line
    from lab.verdicts.report import MatrixProgress, render

    console = _console()
    ctx = _context(args)
    title = args.matrix + (f" ({args.profile})" if args.profile else "") + (" A/A" if args.aa else "")
    with MatrixProgress(console, title=title) as live:

        def on_start(runner, plan, pending) -> None:
            pending_ids = {c.id for c in pending}
            exp = runner.store.read_meta().extra.get("expected", {})
            console.print(
                f"run [bold]{runner.store.run_dir.name}[/] ({runner.store.run_dir}): {len(pending)} of {len(plan)} cells to run; "
                f"planned {exp.get('host_boots', '?')} lab host boot(s), {exp.get('module_swaps', '?')} module swap(s), "
                f"{exp.get('guest_boots', '?')} guest boot(s)",
                highlight=False,
            )
            live.start(len(plan), [c.id for c in plan], completed=[c.id for c in plan if c.id not in pending_ids])

        outcome = run_matrix(ctx, args.matrix, profile=args.profile, resume=args.resume, keep=args.keep, emit=live,
                             aa=args.aa, on_start=on_start, raise_interrupt=False)
    render(outcome.run_data, outcome.properties, console, rc=_report_context(ctx.cfg))
    console.print(summary_line(outcome), highlight=False)
    if outcome.stopped:
        console.print(f"[bold red]run stopped early: {outcome.stopped}[/]", highlight=False)
    if outcome.stopped or any(not r.ok for r in outcome.run_data.latest()):
        console.print(f"resume with: lab run {args.matrix} --resume {outcome.run_dir.name}", highlight=False)
    if args.keep:
        console.print("lab host kept running (--keep): `lab down` removes it", highlight=False)
    if outcome.stopped == "interrupted":
        return 130
    return 0 if outcome.verdict == "PASS" else 1


def cmd_scenarios(args) -> int:
    """Run the failure scenarios on every kernel of [scenarios] (or --kernels); verdict table and details."""
    from lab.measure.scenarios import SCENARIOS, run_scenarios
    from lab.verdicts.report import MatrixProgress, render_scenarios, scenarios_text

    console = _console()
    ctx = _context(args)
    names = args.only or list(SCENARIOS)
    with MatrixProgress(console, title="scenarios") as live:
        run = run_scenarios(ctx, args.kernels or None, names, emit=live,
                            on_result=lambda r: console.print(f"{r.verdict:<4} {r.kernel}/{r.scenario}: {r.detail}", highlight=False))
    render_scenarios(run.results, console)
    if args.text:
        print(scenarios_text(run.results), end="")
    console.print(f"results: {run.path}", highlight=False)
    if run.stopped:
        console.print(f"[bold red]stopped early: {run.stopped}[/]", highlight=False)
    return 0 if run.results and not run.stopped else 1


def _report_context(cfg):
    from lab.verdicts.report import ReportContext

    exp = cfg.expectations
    return ReportContext(None, exp.same_tolerance, exp.confidence)


def cmd_report(args) -> int:
    """Re-render a run from its results file alone."""
    from lab.config import load_config
    from lab.measure.matrix import evaluate_run
    from lab.verdicts.report import render, to_json, to_markdown, to_plot, to_svg, to_text
    from lab.verdicts.results import load_run

    cfg = load_config(args.config)
    data = load_run(cfg.workdir, args.run)
    if data.meta.extra.get("kind") == "scenarios":
        from lab.measure.scenarios import read_results
        from lab.verdicts.report import render_scenarios, scenarios_text

        results = read_results(data.run_dir / "scenarios.jsonl") if data.run_dir else []
        if args.json:
            print(json.dumps({"run": data.meta.to_dict(), "scenarios": [r.to_dict() for r in results]}, indent=2, default=str))
        elif args.format == "text":
            print(scenarios_text(results), end="")
        else:
            render_scenarios(results, _console(), title=f"Failure scenarios, run {data.meta.run_id}")
        return 0
    props = evaluate_run(data, cfg)
    rc = _report_context(cfg)
    compare = load_run(cfg.workdir, args.compare) if args.compare else None
    if args.json:
        print(json.dumps(to_json(data, props, rc=rc), indent=2, default=str))
    elif args.format == "text":
        print(to_text(data, props, compare=compare, rc=rc), end="")
    elif args.format == "md":
        print(to_markdown(data, props, compare=compare, rc=rc), end="")
    else:
        render(data, props, _console(), compare=compare, rc=rc)
    if args.svg:
        to_svg(Path(args.svg), data, props, compare=compare, rc=rc)
    if args.plot:
        out = to_plot(Path(args.plot), data, rc=rc)
        err_console.print(f"plot written to {out}", highlight=False)
    return 0


def cmd_doctor(args) -> int:
    """Check packages, daemons, devices, nested support; say the fix for each problem."""
    from lab.doctor import run_checks

    console = _console()
    checks = run_checks(args.config)
    t = Table(title="lab doctor", title_justify="left")
    for c in ("check", "state", "detail", "fix"):
        t.add_column(c)
    bad = 0
    for c in checks:
        state = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}[c.state]
        bad += c.state == "fail"
        t.add_row(c.name, state, c.detail, c.fix or "")
    console.print(t)
    return 2 if bad else 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The `lab` argument parser."""
    p = argparse.ArgumentParser(prog="lab", description="vhost-lab: QEMU/KVM test lab for the TAP and vhost_net data paths")
    p.add_argument("--config", "-c", default=None, help="lab.toml (default: $LAB_CONFIG, ./lab.toml, the repository's)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("config", help="print the resolved lab")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("up", help="build what is missing, boot hosts and guests")
    s.add_argument("names", nargs="*", help="guests or hosts (default: every guest)")
    s.add_argument("--keep-on-error", action="store_true", help="leave VMs running when up fails (debugging)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="destroy guests, taps and lab hosts (idempotent)")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="hosts, kernels, guests, taps")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("shell", help="SSH into a guest or lab host; `-- CMD...` runs CMD")
    s.add_argument("name")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_shell)

    s = sub.add_parser("console", help="a guest's or lab host's serial console log")
    s.add_argument("name")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("-n", "--lines", type=int, default=200)
    s.set_defaults(func=cmd_console)

    s = sub.add_parser("build", help="build kernel artifacts or guest images (cached)")
    s.add_argument("what", choices=("kernel", "image"))
    s.add_argument("names", nargs="*")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("run", help="run a matrix without pytest")
    s.add_argument("matrix")
    s.add_argument("--profile", default=None)
    s.add_argument("--resume", default=None, metavar="RUN")
    s.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    s.add_argument("--aa", action="store_true", help="an A/A control: the baseline kernel against a copy of itself")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("scenarios", help="the failure scenarios (noqueue, paused guest, multicast, ...) per kernel")
    s.add_argument("--kernels", nargs="*", default=None, help="kernel recipes (default: [scenarios] kernels)")
    s.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    s.add_argument("--text", action="store_true", help="also print the plain-text (mail) form")
    s.set_defaults(func=cmd_scenarios)

    s = sub.add_parser("report", help="render a run from its results file")
    s.add_argument("run", nargs="?", default="latest")
    s.add_argument("--format", choices=("rich", "text", "md"), default="rich")
    s.add_argument("--json", action="store_true")
    s.add_argument("--svg", default=None, metavar="FILE")
    s.add_argument("--compare", default=None, metavar="OTHER_RUN", help="another run, compared with the same statistics")
    s.add_argument("--plot", default=None, metavar="FILE.png|svg", help="throughput vs txqueuelen and vs RTT, medians with CIs")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("doctor", help="check this machine; print the fix for each problem")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lab` console script."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        # paramiko logs a failed connection's traceback, line by line, at ERROR; with
        # no handler Python prints that on stderr. The lab reports the failure itself.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
    # SIGTERM takes the same cleanup path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return args.func(args)
    except LabError as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except Exception:
        if args.debug:
            raise
        import traceback

        err_console.print("[red]internal error (a bug in vhost-lab):[/]")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
