"""Is the lab's own data path the bottleneck? The lab's cells against a plain QEMU command line.

    python benchmarks/datapath_bench.py [--repeats 3] [--duration 8] [--backends vhost,tap] [--sample-ms 1000] [--json OUT]

On one lab host boot (stock), for each backend, each repeat runs these in a
seeded random order, each on a freshly booted guest (same kernel, initramfs,
image, tap and MAC):

- plain:   `qemu-system-x86_64 -netdev tap,ifname=..,vhost=on|off -device virtio-net-pci`
           by hand, and a plain `iperf3 -c` on the lab host;
- lab:     the lab's libvirt domain and the agent's `stream` verb, exactly as a cell runs it;
- libvirt: the lab's domain with a plain iperf3 (what libvirt costs);
- agent:   the plain QEMU guest with the agent's stream (what the agent's sampling costs).

It prints each mode's median Mbit/s and lab/plain, libvirt/plain, agent/plain
as ratios of medians with 95 % bootstrap CIs (lab.verdicts.stats).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "lab", "libvirt", "agent")
MAX_HOST_LOSSES = 3  # lab hosts lost (and booted again) before the benchmark gives up


def main() -> int:
    from benchlab import open_bench_lab

    from lab.errors import HostGone, LabError
    from lab.guests import RunningGuest, boot_guest, destroy_guest, guest_mac, stage_guest
    from lab.guests import _wait_guest as wait_guest  # the same wait a lab guest gets
    from lab.hosts.nested import destroy_host
    from lab.measure.matrix import SAMPLE_MS
    from lab.onhost.traffic import Iperf3Run, iperf3_client_argv, parse_iperf3
    from lab.session import console_crash, guest_plan, up_host
    from lab.verdicts.stats import judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--backends", default="vhost,tap")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--sample-ms", type=float, default=SAMPLE_MS, help="the agent's backlog sampling interval (default: a cell's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    lab = open_bench_lab(args.config)
    cfg, ctx, host_spec, guest_spec = lab.cfg, lab.ctx, lab.host_spec, lab.guest_spec
    modes = [m for m in args.modes.split(",") if m]
    rng = random.Random(args.seed)
    samples: dict[tuple[str, str], list[float]] = {}
    log: list[dict] = []
    crashes: list[dict] = []
    failures: list[dict] = []  # samples that failed on a live host

    def qemu_pidfile(host, plan) -> str:
        return f"{host.guest_dir()}/{plan.name}.qemu.pid"  # the plain QEMU's

    def sample(host, plan, backend: str, mode: str, rep: int) -> dict:
        t0 = time.monotonic()
        if mode in ("lab", "libvirt"):
            boot_guest(ctx.paths, host, plan, ctx.key.private, cfg.timeouts.guest_boot)
            pidfile = None
        else:
            staged = stage_guest(ctx.paths, host, plan)
            pidfile = qemu_pidfile(host, plan)
            argv = [
                "qemu-system-x86_64", "-name", f"{cfg.name}-bench", "-machine", "q35,accel=kvm", "-cpu", "host",
                "-m", str(plan.memory_mib), "-smp", str(plan.vcpus), "-nodefaults", "-no-user-config",
                "-display", "none", "-kernel", str(plan.kernel), "-initrd", str(staged.initrd),
                "-append", staged.cmdline,
                "-drive", f"file={staged.overlay},if=virtio,format=qcow2,cache=unsafe",
                "-netdev", f"tap,id=n0,ifname={plan.tap},script=no,downscript=no,vhost={'on' if backend == 'vhost' else 'off'}",
                "-device", f"virtio-net-pci,netdev=n0,mac={guest_mac(ctx.paths.lab, plan.index)}",
                "-serial", f"file:{staged.console}", "-daemonize", "-pidfile", pidfile,
            ]  # fmt: skip
            host.run(argv, timeout=120)
            guest = RunningGuest(plan=plan, host=host, domain=f"{cfg.name}-bench", key=ctx.key.private,
                                 console=staged.console)
            wait_guest(guest, cfg.timeouts.guest_boot, lambda _s: None, time.monotonic())
            # the lab measures under the kernel's default qdisc: so must the plain run
            host.agent.set_qdisc(plan.tap, "default")

        boot_s = time.monotonic() - t0
        try:
            run = Iperf3Run(server=plan.guest_ip, duration_s=args.duration)
            host.agent.stream(Iperf3Run(server=plan.guest_ip, duration_s=2), None, sample_ms=0, count_drops=False)
            if mode in ("lab", "agent"):
                mbps = host.agent.stream(run, plan.tap, sample_ms=args.sample_ms).iperf3.throughput_mbps
            else:
                res = host.run(iperf3_client_argv(run), timeout=args.duration + 60)
                mbps = parse_iperf3(res.stdout).throughput_mbps
        finally:
            if pidfile is not None:
                host.run(["pkill", "-F", pidfile], timeout=60, check=False)
                time.sleep(1)
            destroy_guest(ctx.paths, host, plan.name, plan.tap)
        return {"backend": backend, "mode": mode, "repeat": rep, "mbps": mbps, "boot_s": round(boot_s, 1)}

    t_start = time.monotonic()
    host = up_host(ctx, host_spec, kernel=host_spec.kernel)
    print(f"lab host {host_spec.name} up ({host_spec.vcpus} vCPUs)", flush=True)
    try:
        for backend in args.backends.split(","):
            plan = guest_plan(ctx, guest_spec, backend=backend)
            for rep in range(1, args.repeats + 1):
                order = list(modes)
                rng.shuffle(order)
                for mode in order:
                    while True:  # until measured; the budgets below end it otherwise
                        try:
                            rec = sample(host, plan, backend, mode, rep)
                            break
                        except HostGone as exc:
                            # Under TCG a lab host can die (the int3 oops, lab/session.py): keep what was
                            # measured, boot it again and measure this sample again, within a budget.
                            died = console_crash(host_spec.name, ctx.paths.host_console(host_spec.name))
                            crash = {"backend": backend, "mode": mode, "repeat": rep, "error": str(exc),
                                     "oops": died.oops, "head": died.head, "stall": died.stall}
                            crashes.append(crash)
                            print("LOST " + json.dumps(crash), flush=True)
                            host.close()
                            destroy_host(ctx.paths, host_spec.name)
                            if len(crashes) > MAX_HOST_LOSSES:
                                raise
                            host = up_host(ctx, host_spec, kernel=host_spec.kernel)
                        except LabError as exc:
                            # a guest that did not boot, a QEMU that did not start in time: measured again
                            failures.append({"backend": backend, "mode": mode, "repeat": rep, "error": str(exc)[:500]})
                            print("FAILED " + json.dumps(failures[-1]), flush=True)
                            if len(failures) > MAX_HOST_LOSSES:
                                raise
                            # a plain QEMU that started late still holds the tap
                            host.run(["pkill", "-F", qemu_pidfile(host, plan)], timeout=60, check=False)
                            destroy_guest(ctx.paths, host, plan.name, plan.tap)
                    samples.setdefault((backend, mode), []).append(float(rec["mbps"] or 0))
                    log.append(rec)
                    print(json.dumps(rec), flush=True)
    finally:
        host.close()
        destroy_host(ctx.paths, host_spec.name)
        ctx.close()
    summary = {"wall_s": round(time.monotonic() - t_start), "host_losses": len(crashes), "failed_samples": len(failures),
               "vcpus": host_spec.vcpus, "sample_ms": args.sample_ms, "backends": {}}
    for backend in args.backends.split(","):
        b: dict = {m: round(statistics.median(samples[(backend, m)]), 1) for m in modes if (backend, m) in samples}
        for m in modes:
            if m != "plain" and (backend, m) in samples and (backend, "plain") in samples:
                j = judge(samples[(backend, "plain")], samples[(backend, m)], tolerance=0.10)
                b[f"{m}/plain"] = {"ratio": round(j.ratio or 0, 3), "ci": [j.ci_low and round(j.ci_low, 3), j.ci_high and round(j.ci_high, 3)],
                                   "verdict": j.verdict}
        summary["backends"][backend] = b
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": log, "host_losses": crashes, "failed_samples": failures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
