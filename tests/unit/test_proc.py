"""lab.proc: the one process runner (deadline, whole-group kill, drained pipes, log) and wait_for."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import proc
from lab.errors import CommandFailed, MissingPiece

PY = sys.executable


def test_run_captures_both_streams_and_the_exit_code() -> None:
    r = proc.run([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], timeout=30)
    assert (r.rc, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)
    assert set(r.tail) == {"out", "err"}
    with pytest.raises(CommandFailed) as ei:
        r.check("here")
    assert "exited 3" in str(ei.value) and "here" in str(ei.value)


def test_run_feeds_input() -> None:
    r = proc.run([PY, "-c", "import sys; print(sys.stdin.read().upper())"], timeout=30, input="abc")
    assert r.ok and r.stdout.strip() == "ABC"


def test_run_does_not_deadlock_on_a_chatty_child() -> None:
    # 4 MiB on each pipe: far more than a pipe buffer; only drained pipes let it finish
    code = "import sys; sys.stdout.write('x' * (4 << 20)); sys.stderr.write('y' * (4 << 20))"
    r = proc.run([PY, "-c", code], timeout=60)
    assert r.ok and len(r.stdout) == 4 << 20 and len(r.stderr) == 4 << 20


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    # the child starts a grandchild that would outlive a plain kill of the child
    code = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)"
    )
    t0 = time.monotonic()
    r = proc.run([PY, "-c", code], timeout=1.5, grace=0.5)
    assert r.timed_out and r.rc == 124 and "timed out" in r.stderr
    assert time.monotonic() - t0 < 15
    grandchild = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        pytest.fail("the grandchild survived the timeout")


def test_term_then_kill_gives_a_grace_period(tmp_path: Path) -> None:
    marker = tmp_path / "terminated"
    code = (
        "import signal, sys, time;"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('x'), sys.exit(0)));"
        "time.sleep(600)"
    )
    r = proc.run([PY, "-c", code], timeout=1.0, grace=5)
    assert r.timed_out and marker.exists(), "SIGTERM first, so the child could clean up"


def test_log_and_on_line_see_every_line_as_it_comes(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    seen: list[str] = []
    r = proc.run([PY, "-c", "print('one'); print('two')"], timeout=30, log=log, on_line=seen.append)
    assert r.ok and seen == ["one", "two"]
    text = log.read_text()
    assert text.startswith("$ ") and text.splitlines()[1:] == ["one", "two"]


def test_stdout_to_a_binary_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        r = proc.run([PY, "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))"], timeout=30, stdout_to=f)
    assert r.ok and out.read_bytes() == bytes(range(256)) and r.stdout == ""


def test_tail_keeps_only_the_last_lines() -> None:
    r = proc.run([PY, "-c", "[print(i) for i in range(100)]"], timeout=30, tail=5)
    assert r.tail == ("95", "96", "97", "98", "99")


def test_a_missing_program_is_missing_piece_with_the_hint() -> None:
    with pytest.raises(MissingPiece) as ei:
        proc.run(["no-such-tool-vhl"], timeout=5, missing_hint="apt-get install no-such-tool")
    assert "no-such-tool-vhl is not installed" in str(ei.value) and "apt-get install no-such-tool" in str(ei.value)


def test_argv_must_be_strings() -> None:
    with pytest.raises(ValueError):
        proc.run([], timeout=1)
    with pytest.raises(TypeError):
        proc.run(["echo", 5], timeout=1)  # type: ignore[list-item]


def test_spawn_and_end_stop_the_group() -> None:
    p = proc.spawn([PY, "-c", "import time; time.sleep(600)"])
    assert p.poll() is None
    proc.end(p, grace=0.5)
    assert p.poll() is not None


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls = []

    def ready():
        calls.append(1)
        return "yes" if len(calls) >= 3 else None

    assert proc.wait_for(ready, timeout=5, interval=0.01, what="x") == "yes"
    assert len(calls) == 3


def test_wait_for_backs_off() -> None:
    stamps: list[float] = []
    with pytest.raises(proc.WaitTimeout):
        proc.wait_for(lambda: stamps.append(time.monotonic()), timeout=1.2, interval=0.05, backoff=2.0, what="x")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert len(gaps) >= 3 and gaps[-1] > 2 * gaps[0], gaps


def test_wait_for_times_out_naming_what_and_calls_on_wait() -> None:
    ticks: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(proc.WaitTimeout) as ei:
        proc.wait_for(lambda: False, timeout=0.5, interval=0.05, what="the lab host's ready file", on_wait=ticks.append)
    assert 0.5 <= time.monotonic() - t0 < 1.5
    assert "the lab host's ready file" in str(ei.value)
    assert ticks and ticks == sorted(ticks)


def test_wait_for_sees_a_condition_set_by_another_thread() -> None:
    ev = threading.Event()
    threading.Timer(0.2, ev.set).start()
    assert proc.wait_for(ev.is_set, timeout=5, interval=0.02, what="x") is True


def test_wait_for_lets_the_condition_give_up() -> None:
    with pytest.raises(ZeroDivisionError):
        proc.wait_for(lambda: 1 / 0, timeout=1, interval=0.01, what="x")


def test_pids_named_finds_this_process() -> None:
    me = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert os.getpid() in proc.pids_named(me)
    assert proc.pids_named("no-such-comm-x") == []


def test_what_on_line_raises_reaches_the_caller_and_ends_the_process() -> None:
    # A progress callback runs in a pump thread; a Ctrl-C it raises must not be lost there.
    def stop(line: str) -> None:
        if line == "go":
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        proc.run([PY, "-c", "import time; print('go', flush=True); time.sleep(60)"], timeout=120, on_line=stop)
    assert time.monotonic() - t0 < 30  # the sleeper was ended, not waited for
