"""Where guests run: the three host providers behind one small interface.

- `NestedHost`: a lab host VM on this machine, booted on a kernel artifact
  (stock or patched), this machine's root shared read-only over 9p under a
  tmpfs overlay; reached by SSH through a loopback port forward.
- `LocalHost`: this machine's own running kernel.
- `SshHost`: a remote machine with libvirtd and SSH.

Guests, net, traffic and the matrix only use `Host`: run an argument list,
call the lab agent, open libvirt, probe the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lab import proc
from lab.errors import AgentFailed, AgentTimeout, HostGone, LabError, MissingPiece
from lab.hosts.agent_client import AgentClient
from lab.hosts.remote import ABORT_GRACE_S, CommandResult, SshEndpoint, SshRunner, quote_argv, ssh_escape

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a host runs for the lab's verbs (python -m ...); see lab/onhost/agent.py.
AGENT_MODULE = "lab.onhost.agent"
DATA = Path(__file__).resolve().parents[1] / "data"
LABHOST_INITRAMFS = DATA / "labhost-initramfs.sh"
LABHOST_INIT = DATA / "labhost-init.sh"
# Where a lab host keeps guest disks and logs (tmpfs inside the lab host) and
# the share that is this machine's per-host state directory.
HOST_VAR = "/var/lib/vhost-lab"
HOST_STATE = f"{HOST_VAR}/state"


@dataclass(frozen=True)
class HostProbe:
    """What a host's kernel offers the lab."""

    name: str
    provider: str
    release: str
    accel: str  # how this host itself runs: "tcg" (emulated) or "kvm"/"metal"
    kvm: bool  # /dev/kvm usable for guests
    vhost_net: bool
    tun: bool
    netem: bool
    modules: dict[str, str]  # loaded module -> GNU build-id (tun, tap, vhost, vhost_net)
    nodrop: bool | None  # patched tun present (None: unknown)
    cpu_model: str = "?"
    kernel_recipe: str | None = None
    modules_match: bool | None = None  # loaded modules are the ones the artifact built

    def problems(self) -> list[str]:
        """What keeps this host from running lab guests."""
        out = []
        if not self.kvm:
            out.append("no usable /dev/kvm")
        if not self.vhost_net:
            out.append("no /dev/vhost-net (modprobe vhost_net)")
        if not self.tun:
            out.append("no /dev/net/tun")
        return out


@dataclass
class HostRuntime:
    """A running host as the lab left it: persisted beside the host's state."""

    name: str
    provider: str
    domain: str | None
    ssh_port: int
    kernel_recipe: str | None
    kernel_key: str | None
    kernel_release: str | None
    accel: str
    started_at: float
    module_build_ids: dict[str, str]

    def save(self, path: Path) -> None:
        """Write atomically."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HostRuntime | None:
        """Read a saved runtime, None when absent or unreadable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file, remembered per (path, size, mtime) so a big image is hashed once per process."""
    import hashlib

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def quiet_libvirt() -> None:
    """Stop libvirt-python printing every error to stderr; the lab reports them itself."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Host:
    """The interface every provider offers."""

    name: str
    provider: str
    command_timeout: float = 120.0  # a command's (and an agent verb's) bound when the caller gives none

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True, stdin: str | None = None) -> CommandResult:
        """Run an argument list on the host."""
        raise NotImplementedError

    def libvirt_uri(self) -> str:
        """The libvirt URI of the host's libvirtd."""
        raise NotImplementedError

    def endpoint(self) -> SshEndpoint | None:
        """SSH endpoint of the host (the jump to its guests); None for local."""
        return None

    def libvirt(self):
        """A libvirt connection to the host's libvirtd, opened once and kept."""
        conn = getattr(self, "_libvirt_conn", None)
        if conn is None:
            import libvirt

            quiet_libvirt()
            try:
                conn = libvirt.open(self.libvirt_uri())
            except libvirt.libvirtError as e:
                raise HostGone(f"cannot reach libvirtd on {self.name} ({self.libvirt_uri()}): {e}") from None
            self._libvirt_conn = conn
        return conn

    def libvirt_error(self, e: Exception, what: str) -> LabError:
        """The LabError to raise for a failed libvirt call: HostGone when the host
        itself no longer answers. The connection is dropped either way (a dead one
        would fail every later call), so the next call reconnects."""
        self._close_libvirt()
        if not self._answers():
            return HostGone(f"lab host {self.name} does not answer (libvirt {what}: {e})")
        return LabError(f"{self.name}: libvirt {what}: {e}")

    def _close_libvirt(self) -> None:
        conn = getattr(self, "_libvirt_conn", None)
        self._libvirt_conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def python(self) -> list[str]:
        """How to start this lab's Python on the host."""
        # Nested and local hosts see this machine's root: the same interpreter
        # and the same source tree are there.
        return ["env", f"PYTHONPATH={REPO_ROOT}", sys.executable]

    @property
    def agent(self) -> AgentClient:
        """The lab agent on this host: one typed method per verb (lab.hosts.agent_client)."""
        return AgentClient(self.call)

    def call(self, args: list[str], timeout: float | None = None) -> dict:
        """Run one lab agent verb (an argument list) on the host and return its JSON reply.

        The transport under `agent`. Calls go to one long-lived `python -m
        lab.onhost.agent serve` per host (a Python start on a TCG lab host
        costs seconds); a session that died or timed out is replaced on the
        next call.
        """
        limit = timeout if timeout is not None else self.command_timeout
        session = getattr(self, "_agent_session", None)
        if session is None or not session.alive():
            self._agent_session = None
            try:
                session = self._open_agent()
            except LabError:
                raise
            except Exception as e:  # socket/paramiko errors: a host that died refuses the connection
                if not self._answers():
                    raise HostGone(f"lab host {self.name} does not answer ({type(e).__name__}: {e})") from None
                raise LabError(f"{self.name}: cannot start the lab agent: {type(e).__name__}: {e}") from None
            self._agent_session = session
        try:
            data = session.call(args, limit)
        except HostGone:
            raise
        except (OSError, TimeoutError, EOFError, ValueError) as e:
            session.close()
            self._agent_session = None
            if isinstance(e, TimeoutError):
                raise AgentTimeout(f"{self.name}: lab agent {args[0]} did not answer in {limit:.0f}s") from None
            if not self._answers():
                raise HostGone(f"lab host {self.name} does not answer ({type(e).__name__}: {e})") from None
            raise LabError(f"{self.name}: lab agent {args[0]}: {type(e).__name__}: {e}") from None
        if "error" in data:
            raise AgentFailed(f"{self.name}: lab agent {args[0]}: {data['error']}", kind=data.get("type"))
        return data

    def _answers(self) -> bool:
        return self.run(["true"], timeout=30, check=False).rc == 0

    def _open_agent(self) -> AgentSession:
        """Start `python -m lab.onhost.agent serve` on the host."""
        raise NotImplementedError

    def _close_agent(self) -> None:
        session = getattr(self, "_agent_session", None)
        self._agent_session = None
        if session is not None:
            session.close()

    def guest_dir(self) -> str:
        """Directory on the host for guest disks and initrds."""
        return f"{HOST_VAR}/guests"

    # Nested and local hosts see this machine's root, so a file of this machine
    # is already where they look; a remote (SshHost) gets a copy.
    sees_local_files: bool = True

    def stage(self, local: Path, subdir: str) -> str:
        """A file of this machine, readable on the host: its path there.

        `subdir` names where a copy goes on a host that needs one
        (<HOST_VAR>/files/<subdir>/<name>); it should carry the file's content
        key (an artifact's cache directory name), so two versions never share a path.
        """
        return str(local)

    def guest_log(self, guest: str) -> str:
        """Path, on the host, of a guest's serial console log."""
        return f"{HOST_STATE}/guests/{guest}.console.log"

    def local_guest_log(self, guest: str) -> Path | None:
        """The same log seen from this machine, when the host shares it."""
        return None

    def probe(self) -> HostProbe:
        """Ask the host what its kernel offers."""
        f = self.agent.probe()
        return HostProbe(
            name=self.name,
            provider=self.provider,
            release=f.release,
            accel=f.accel,
            kvm=f.kvm,
            vhost_net=f.vhost_net,
            tun=f.tun,
            netem=f.netem,
            modules=dict(f.modules),
            nodrop=f.nodrop,
            cpu_model=f.cpu_model,
        )

    def close(self) -> None:
        """Release connections."""
        self._close_agent()
        self._close_libvirt()


@dataclass
class LocalHost(Host):
    """This machine's own kernel."""

    name: str = "local"
    provider: str = "local"
    command_timeout: float = 120.0

    def run(self, argv, timeout=None, check=True, stdin=None) -> CommandResult:
        try:
            res = proc.run(argv, timeout=timeout if timeout is not None else self.command_timeout, input=stdin)
        except MissingPiece as e:
            res = CommandResult(tuple(argv), 127, "", str(e), 0.0)
        if check:
            res.check("local")
        return res

    def libvirt_uri(self) -> str:
        return "qemu:///system"

    def _open_agent(self) -> AgentSession:
        return AgentSession.local(self.python() + ["-m", AGENT_MODULE, "serve"])

    def local_guest_log(self, guest: str) -> Path | None:
        return Path(self.guest_log(guest))

    def require_usable(self) -> HostProbe:
        """Probe, and refuse clearly when this kernel cannot run lab guests."""
        p = self.probe()
        problems = p.problems()
        if problems:
            raise MissingPiece(
                f"host provider 'local' cannot run guests on this machine ({p.release}): " + "; ".join(problems),
                hint="use provider = \"nested\" (the default lab) or boot a kernel with KVM and vhost_net",
            )
        return p


class _OverSsh(Host):
    """What every host reached over SSH shares: commands and the agent go through one SshRunner."""

    _runner: SshRunner

    def run(self, argv, timeout=None, check=True, stdin=None) -> CommandResult:
        return self._runner.run(list(argv), timeout=timeout, check=check, stdin=stdin)

    def endpoint(self) -> SshEndpoint:
        return self._runner.endpoint

    def close(self) -> None:
        super().close()
        self._runner.close()

    def _open_agent(self) -> AgentSession:
        return AgentSession.over_ssh(self._runner, self.python() + ["-m", AGENT_MODULE, "serve"])


@dataclass
class SshHost(_OverSsh):
    """A remote machine with libvirtd and SSH (the scale-out path).

    It has no copy of this machine's files: what a guest boots from is
    uploaded (`stage`), and the lab agent runs from the remote's own Python
    (`python`, with the lab package on `lab_path` or installed in it).
    """

    name: str
    uri: str
    address: str
    user: str
    key: Path
    port: int = 22
    command_timeout: float = 120.0
    provider: str = "ssh"
    remote_python: str = "python3"
    lab_path: str = ""
    sees_local_files: bool = False

    def __post_init__(self) -> None:
        self._runner = SshRunner(SshEndpoint(self.address, self.port, self.user, self.key), self.command_timeout)
        self._staged: dict[tuple[str, str], str] = {}

    def python(self) -> list[str]:
        # The remote's own install of the lab: hosts.<name>.python and .lab_path.
        if self.lab_path:
            return ["env", f"PYTHONPATH={self.lab_path}", self.remote_python]
        return [self.remote_python]

    def libvirt_uri(self) -> str:
        return self.uri

    def close(self) -> None:
        # What was uploaded is checked again after a reconnect: a reboot (kexec)
        # may have taken it (a lab host standing in for a remote keeps it in tmpfs).
        self._staged.clear()
        super().close()

    def stage(self, local: Path, subdir: str) -> str:
        """Upload `local` to <HOST_VAR>/files/<subdir>/ unless a copy with the same SHA-256 is there."""
        remote_dir = f"{HOST_VAR}/files/{subdir}"
        remote = f"{remote_dir}/{local.name}"
        key = (str(local), remote)
        if key in self._staged:
            return self._staged[key]
        want = file_sha256(local)
        res = self.run(["sha256sum", remote], check=False, timeout=self.command_timeout)
        if res.rc != 0 or res.stdout.split()[:1] != [want]:
            self.run(["mkdir", "-p", remote_dir])
            self._runner.put(local, remote)
            check = self.run(["sha256sum", remote], timeout=self.command_timeout)
            if check.stdout.split()[:1] != [want]:
                raise LabError(f"{self.name}: {remote} does not have the SHA-256 of {local} after the upload")
        self._staged[key] = remote
        return remote


@dataclass
class NestedHost(_OverSsh):
    """A running lab host VM, reached on 127.0.0.1:ssh_port."""

    name: str
    runtime: HostRuntime
    key: Path
    state_dir: Path
    command_timeout: float = 120.0
    provider: str = "nested"

    def __post_init__(self) -> None:
        self._runner = SshRunner(SshEndpoint("127.0.0.1", self.runtime.ssh_port, "root", self.key), self.command_timeout)

    def libvirt_uri(self) -> str:
        # qemu+ssh would start libvirt's client library inside the lab host
        # for every connection (7-14 s under TCG); instead the host's libvirtd
        # socket is forwarded over SSH and the library runs here (0.2 s).
        return f"qemu+unix:///system?socket={self._forward_socket()}"

    def _forward_socket(self) -> Path:
        sock = self.state_dir / f"libvirt-{os.getpid()}.sock"
        fwd = getattr(self, "_forwarder", None)
        if fwd is not None and fwd.poll() is None and sock.exists():
            return sock
        self._stop_forwarder()
        argv = self.endpoint().ssh_argv()[:-1] + [
            "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{ssh_escape(str(sock))}:/run/libvirt/libvirt-sock", "root@127.0.0.1",
        ]
        self._forwarder = fwd = proc.spawn(argv, stderr=proc.PIPE, missing_hint="apt-get install openssh-client")

        def up() -> bool:
            if fwd.poll() is not None:
                err = fwd.stderr.read().decode(errors="replace").strip() if fwd.stderr else ""
                raise HostGone(f"lab host {self.name}: cannot forward libvirtd's socket over SSH: {err}")
            return sock.exists()

        try:
            proc.wait_for(up, timeout=30, interval=0.05, max_interval=0.5, what=f"the libvirtd socket forward of {self.name}")
        except proc.WaitTimeout as e:
            self._stop_forwarder()
            raise HostGone(f"lab host {self.name}: {e}") from None
        return sock

    def _stop_forwarder(self) -> None:
        fwd = getattr(self, "_forwarder", None)
        self._forwarder = None
        if fwd is not None:
            proc.end(fwd, grace=5)
        (self.state_dir / f"libvirt-{os.getpid()}.sock").unlink(missing_ok=True)

    def local_guest_log(self, guest: str) -> Path | None:
        return self.state_dir / "guests" / f"{guest}.console.log"

    def probe(self) -> HostProbe:
        p = super().probe()
        built = self.runtime.module_build_ids or {}
        match = None
        if built:
            match = all(p.modules.get(m) == v for m, v in built.items() if m in p.modules) and all(m in p.modules for m in built)
        return HostProbe(**{**asdict(p), "accel": self.runtime.accel, "kernel_recipe": self.runtime.kernel_recipe, "modules_match": match})

    def close(self) -> None:
        super().close()
        self._stop_forwarder()


class AgentSession:
    """One `lab.onhost.agent serve` process on a host: JSON argv lines in, JSON replies out."""

    def __init__(self, send, readline, set_timeout, closer, alive) -> None:
        self._send, self._readline, self._set_timeout, self._closer, self._alive = send, readline, set_timeout, closer, alive

    @classmethod
    def over_ssh(cls, runner: SshRunner, argv: list[str]) -> AgentSession:
        """Start the agent through an SSH runner's connection (bounded: a hung host
        would hold paramiko's channel open and exec waits for many minutes)."""
        with runner.deadline(2 * runner.endpoint.connect_timeout + ABORT_GRACE_S):
            conn = runner._connection()
            conn.open()
            chan = conn.client.get_transport().open_session()
            chan.exec_command(quote_argv(argv))
        rfile = chan.makefile("r")
        wfile = chan.makefile_stdin("w")

        def send(line: str) -> None:
            wfile.write(line)
            wfile.flush()

        return cls(send, rfile.readline, chan.settimeout, chan.close, lambda: not chan.closed and not chan.exit_status_ready())

    @classmethod
    def local(cls, argv: list[str]) -> AgentSession:
        """Start the agent as a local process."""
        import queue
        import threading

        child = proc.spawn(argv, stdin=proc.PIPE, stdout=proc.PIPE, stderr=None, text=True)
        replies: queue.Queue[str] = queue.Queue()
        state: dict[str, float | None] = {"timeout": None}

        def pump() -> None:
            # A reader thread: a select() on the pipe would miss lines the
            # text wrapper already buffered.
            for line in child.stdout:
                replies.put(line)
            replies.put("")

        threading.Thread(target=pump, daemon=True).start()

        def send(line: str) -> None:
            child.stdin.write(line)
            child.stdin.flush()

        def readline() -> str:
            try:
                return replies.get(timeout=state["timeout"])
            except queue.Empty:
                raise TimeoutError from None

        def closer() -> None:
            proc.end(child, grace=1)

        return cls(send, readline, lambda t: state.__setitem__("timeout", t), closer, lambda: child.poll() is None)

    def alive(self) -> bool:
        """Whether the agent process is still there."""
        try:
            return bool(self._alive())
        except Exception:
            return False

    def call(self, args: list[str], timeout: float) -> dict:
        """Send one verb, wait at most `timeout` s for its reply."""

        self._set_timeout(timeout)
        self._send(json.dumps(list(args)) + "\n")
        try:
            line = self._readline()
        except TimeoutError:
            raise TimeoutError from None
        if not line:
            raise EOFError("the lab agent exited")
        return json.loads(line)

    def close(self) -> None:
        """Stop the agent (closing its stdin ends it)."""
        try:
            self._closer()
        except Exception:
            pass


# ---------------------------------------------------------------------------
# The nested provider's lifecycle: boot and destroy lab host VMs on this machine
# ---------------------------------------------------------------------------


def outer_libvirt():
    """A connection to this machine's libvirtd, started first if we may."""
    import libvirt

    quiet_libvirt()
    ensure_local_daemons()
    try:
        return libvirt.open("qemu:///system")
    except libvirt.libvirtError as e:
        # The daemons run (ensure_local_daemons checked): a non-root user is refused by
        # libvirt's system instance, and starting daemons would not change that.
        hint = "virtlogd -d && libvirtd -d" if os.geteuid() == 0 else "run lab as root (libvirt's system instance: qemu:///system)"
        raise MissingPiece(f"cannot connect to libvirtd on this machine: {e}", hint=hint) from None


def ensure_local_daemons() -> None:
    """Start virtlogd and libvirtd when they are not running (root only: no systemd here)."""
    for daemon in ("virtlogd", "libvirtd"):
        if proc.pids_named(daemon):
            continue
        exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        if not Path(exe).exists():
            raise MissingPiece(f"{daemon} is not installed", hint="apt-get install libvirt-daemon-system qemu-system-x86")
        if os.geteuid() != 0:
            raise MissingPiece(f"{daemon} is not running and only root may start it", hint=f"sudo {daemon} -d")
        proc.run([exe, "-d"], timeout=30)
    sock = Path("/run/libvirt/libvirt-sock")
    try:
        proc.wait_for(sock.exists, timeout=15, interval=0.1, what="libvirtd's socket")
    except proc.WaitTimeout:
        pass  # the connection attempt that follows says what is wrong


def outer_accel() -> str:
    """How this machine can run a lab host: "kvm" only if /dev/kvm really boots one.

    On this machine kind /dev/kvm exists but is PVM-only (a stock kernel does
    not boot on it), so the lab uses TCG unless VHOST_LAB_ACCEL=kvm says so.
    """
    forced = os.environ.get("VHOST_LAB_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    if (" vmx" in flags or " svm" in flags) and Path("/dev/kvm").exists() and "hypervisor" not in flags:
        return "kvm"
    return "tcg"
