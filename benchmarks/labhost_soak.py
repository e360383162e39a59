"""Lab host crash-rate soak: N lab host boots, each doing what a matrix run does.

    python benchmarks/labhost_soak.py --boots 20 [--vcpus 1] [--hog] [--kernel stock] [--json OUT]

Each boot: a lab host on the kernel (its init loads the lab's modules, netem,
drop_monitor, kvm_amd), one guest booted on it (nested KVM, vhost_net), one
iperf3 stream host -> guest, then the lab host is destroyed. The host's
console is scanned for Oops / BUG / panic lines after every step. Prints one
line per boot and a summary (boots, crashes, first oops line of each).

`--hog` runs a busy loop on one core for the whole soak, to stand in for a
shared, busy machine (crashes were seen more often then).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OOPS = re.compile(r"(Oops:|BUG:|Kernel panic|general protection fault|kernel BUG at)")


def first_oops(console: Path) -> str | None:
    """The first crash line of a lab host's console, or None."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if OOPS.search(line):
            return line.strip()[:160]
    return None


def main() -> int:
    from benchlab import open_bench_lab

    from lab.guests import boot_guest
    from lab.hosts.nested import destroy_host
    from lab.onhost.traffic import Iperf3Run
    from lab.session import guest_plan, up_host

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boots", type=int, default=20)
    ap.add_argument("--vcpus", type=int, default=None, help="lab host vCPUs (default: lab.toml's)")
    ap.add_argument("--kernel", default=None, help="kernel recipe (default: the host's)")
    ap.add_argument("--stream-s", type=int, default=5, help="iperf3 seconds per boot (0: none)")
    ap.add_argument("--hog", action="store_true", help="busy-loop one core during the soak")
    ap.add_argument("--config", default=None)
    ap.add_argument("--json", default=None, metavar="FILE", help="write every boot's record here")
    args = ap.parse_args()

    lab = open_bench_lab(args.config)
    cfg, ctx, host_spec, guest_spec = lab.cfg, lab.ctx, lab.host_spec, lab.guest_spec
    if args.vcpus:
        host_spec = dataclasses.replace(host_spec, vcpus=args.vcpus)
    kernel = args.kernel or host_spec.kernel
    plan = guest_plan(ctx, guest_spec)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    console = ctx.paths.host_console(host_spec.name)
    records: list[dict] = []
    print(f"soak: {args.boots} boots of {host_spec.name} ({kernel}, {host_spec.vcpus} vCPUs), hog={args.hog}", flush=True)
    try:
        for i in range(1, args.boots + 1):
            rec: dict = {"boot": i, "vcpus": host_spec.vcpus, "kernel": kernel, "hog": args.hog}
            stage = "host boot"
            t0 = time.monotonic()
            try:
                destroy_host(ctx.paths, host_spec.name)
                ctx.hosts.pop(host_spec.name, None)
                host = up_host(ctx, host_spec, kernel=kernel)
                rec["host_boot_s"] = round(time.monotonic() - t0, 1)
                stage = "guest boot"
                t1 = time.monotonic()
                guest = boot_guest(ctx.paths, host, plan, ctx.key.private, cfg.timeouts.guest_boot)
                rec["guest_boot_s"] = round(time.monotonic() - t1, 1)
                if args.stream_s:
                    stage = "stream"
                    run = Iperf3Run(server=guest.plan.guest_ip, duration_s=args.stream_s)
                    rec["mbps"] = host.agent.stream(run, guest.plan.tap).iperf3.throughput_mbps
                stage = "done"
            except Exception as exc:
                rec["error"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            time.sleep(2)  # a panic in progress reaches the console log
            rec["oops"] = first_oops(console)
            rec["crashed"] = rec["oops"] is not None
            rec["seconds"] = round(time.monotonic() - t0, 1)
            if rec["crashed"]:
                keep = console.with_name(f"console-crash-{int(time.time())}.log")
                keep.write_bytes(console.read_bytes())
                rec["console_log"] = str(keep)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            for h in list(ctx.hosts.values()):
                h.close()
            ctx.hosts.clear()
    finally:
        if hog is not None:
            hog.kill()
        destroy_host(ctx.paths, host_spec.name)
        ctx.close()
    crashes = [r for r in records if r["crashed"]]
    errors = [r for r in records if r.get("error") and not r["crashed"]]
    mbps = [r["mbps"] for r in records if r.get("mbps")]
    hb = [r["host_boot_s"] for r in records if r.get("host_boot_s")]
    gb = [r["guest_boot_s"] for r in records if r.get("guest_boot_s")]
    med = lambda xs: round(statistics.median(xs), 1) if xs else None  # noqa: E731
    summary = {
        "boots": len(records), "crashes": len(crashes), "other_errors": len(errors), "vcpus": host_spec.vcpus,
        "kernel": kernel, "hog": args.hog, "median_host_boot_s": med(hb), "median_guest_boot_s": med(gb),
        "median_mbps": med(mbps), "oopses": [r["oops"] for r in crashes], "errors": [r["error"] for r in errors],
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "boots": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
