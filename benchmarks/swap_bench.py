"""What a same-boot module swap costs: a guest reboot against a hot-unplugged NIC.

    python benchmarks/swap_bench.py [--swaps 4] [--backend vhost] [--duration 5] [--json OUT]

On one lab host boot (the default lab's host), with its guest up, the modules
go stock -> nodrop -> stock ... `--swaps` times per policy, the two policies
in a seeded random order per round:

- reboot-guest: destroy the guest, swap, boot a fresh guest (what cells do by default);
- hot-unplug:   unplug the guest's NIC (device and netdev), swap, re-create the
                tap and plug the NIC back; the guest re-addresses it.

Each swap is timed from the call until the guest answers SSH again, split
into release / swap / restore, and followed by an iperf3 stream through the
new modules (with the build-ids checked by the swap itself), so a policy that
leaves a broken path shows as 0 Mbit/s, not as a fast swap.
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

POLICIES = ("reboot-guest", "hot-unplug")
MAX_HOST_LOSSES = 3


def main() -> int:
    from benchlab import open_bench_lab

    from lab.errors import HostGone
    from lab.hosts.nested import destroy_host
    from lab.onhost.traffic import Iperf3Run
    from lab.session import LabSession, guest_plan, kernel_boot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=4, help="swaps per policy")
    ap.add_argument("--backend", default="vhost")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--recipes", default="stock,nodrop", help="the two recipes swapped between (same base, strategy modules)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    lab = open_bench_lab(args.config)
    ctx, host_spec, guest_spec = lab.ctx, lab.host_spec, lab.guest_spec
    recipes = args.recipes.split(",")
    rng = random.Random(args.seed)
    session = LabSession(ctx, host_spec, swap="reboot-guest")
    log: list[dict] = []
    lost: list[dict] = []  # lab hosts lost on the way
    t_start = time.monotonic()
    try:
        for recipe in recipes:  # built before the clock starts: a swap's time is not a build's
            kernel_boot(ctx, recipe)
        session.kernel(recipes[0])
        plan = guest_plan(ctx, guest_spec, backend=args.backend)
        session.guest(plan)
        print(f"lab host {host_spec.name} on {recipes[0]}, guest up", flush=True)
        current = 0

        def one_swap(rnd: int, policy: str) -> dict:
            nonlocal current
            # One session, one boot: the policy is what the next swap does.
            session.swap_policy = policy
            target = 1 - current
            t0 = time.monotonic()
            session.kernel(recipes[target])
            current = target
            session.guest(plan)  # a no-op after a good hot-unplug; a boot otherwise
            total_s = time.monotonic() - t0
            swap = dict(session.swaps[-1])
            h = session.state.host
            h.agent.stream(Iperf3Run(server=plan.guest_ip, duration_s=2), None, sample_ms=0, count_drops=False)
            m = h.agent.stream(Iperf3Run(server=plan.guest_ip, duration_s=args.duration), None, sample_ms=0, count_drops=False)
            return {"round": rnd, "policy": policy, "to": recipes[current], "total_s": round(total_s, 2),
                    "release_s": swap.get("release_s"), "swap_s": swap.get("seconds"),
                    "restore_s": round(total_s - (swap.get("release_s") or 0) - (swap.get("seconds") or 0), 2),
                    "guest_rebooted": "replug_s" not in swap,
                    "build_ids": session.modules_loaded(), "mbps": m.iperf3.throughput_mbps}

        for rnd in range(1, args.swaps + 1):
            order = list(POLICIES)
            rng.shuffle(order)
            for policy in order:
                try:
                    rec = one_swap(rnd, policy)
                except HostGone as exc:
                    # Under TCG a lab host can die (the int3 oops): record it, boot a new one, go on.
                    crash = session.crash()
                    lost.append({"round": rnd, "policy": policy, "error": str(exc), "oops": crash.oops, "stall": crash.stall})
                    print("LOST " + json.dumps(lost[-1]), flush=True)
                    session.forget_host()
                    if len(lost) > MAX_HOST_LOSSES:
                        raise
                    session.swap_policy = "reboot-guest"
                    session.kernel(recipes[0])
                    session.guest(plan)
                    current = 0
                    continue
                log.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "build_ids"}), flush=True)
    finally:
        session.close()
        destroy_host(ctx.paths, host_spec.name)
        ctx.close()
    summary: dict = {"wall_s": round(time.monotonic() - t_start), "host_losses": lost, "backend": args.backend, "policies": {}}
    for policy in POLICIES:
        recs = [r for r in log if r["policy"] == policy]
        if recs:
            summary["policies"][policy] = {
                k: round(statistics.median(float(r[k] or 0) for r in recs), 2) for k in ("total_s", "release_s", "swap_s", "restore_s", "mbps")
            } | {"n": len(recs), "failed_paths": sum(1 for r in recs if not r["mbps"])}
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": log}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
