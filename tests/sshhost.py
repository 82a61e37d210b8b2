"""A real OpenSSH server standing in for an EC2 instance: inside a network namespace the test creates,
on port 22 of its own address (10.77.N.2), reached from here over a veth pair.

It logs in `ubuntu` (the Deep Learning AMI's user), added as a uid-0 alias, so the "instance" can
read the test venv and the local MNIST files. Each host is a machine of its own: its own network,
PID and mount namespaces, its own terminals, and its own home for `ubuntu` (see start_machine).
Nothing here talks to anything but the namespace's own address.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
USER = "ubuntu"  # the Deep Learning AMI's login
# PID 1 of a test host. Like systemd on an instance it reaps the orphans it inherits (a detached job's
# wrapper shell): a zombie would still answer `kill -0`, and the job would look alive forever.
INIT = """# mnist-cloud-test-init
import os, time
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.1)
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


# The login's home is only a mount point: each machine bind-mounts its own home over it. It must not
# live in a pytest temp dir: pytest deletes old sessions' dirs when a new session starts, and deleting
# a mount point detaches that mount in every namespace, so a machine would lose its home mid-test.
LOGIN_HOMES = Path("/var/lib/mnist-cloud-tests")


def ensure_user(name: str) -> Path:
    """A login `name` sharing uid 0, whose home is LOGIN_HOMES/home-NAME; returns that home.

    An existing one (left by an earlier session) is kept; its home is moved to the fixed path by
    rewriting its passwd entry, since usermod refuses a uid (0) that running processes use."""
    import fcntl
    import pwd

    home = LOGIN_HOMES / f"home-{name}"
    home.mkdir(parents=True, exist_ok=True)
    # test processes running side by side (pytest-xdist workers, two sessions) must not both useradd
    with open("/run/mnist-cloud-test-user.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            existing = Path(pwd.getpwnam(name).pw_dir)
        except KeyError:
            sh("useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", str(home), "-s", "/bin/bash", name)
            sh("usermod", "-p", "*", name)  # a locked account is refused when UsePAM is off
            return home
        if existing != home:
            passwd = Path("/etc/passwd")
            lines = passwd.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                fields = line.split(":")
                if fields[0] == name and len(fields) == 7:
                    fields[5] = str(home)
                    lines[i] = ":".join(fields)
            tmp = passwd.with_name(".passwd.mnist-cloud-tests")
            tmp.write_text("".join(lines))
            tmp.chmod(0o644)
            tmp.replace(passwd)
        return home


def remove_user(name: str) -> None:
    sh("userdel", "-f", name, check=False)


class Bridge:
    """A switch on this machine that several test hosts plug into: they reach each other directly, as
    the nodes of a cluster do in one subnet."""

    def __init__(self):
        self.name = f"mcbr{os.getpid() % 10000}"
        self.subnet = f"10.78.{os.getpid() % 200 + 20}"

    def create(self) -> None:
        self.delete()
        sh("ip", "link", "add", self.name, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.name)
        sh("ip", "link", "set", self.name, "up")

    def delete(self) -> None:
        sh("ip", "link", "del", self.name, check=False)


class SSHTestHost:
    def __init__(self, workdir: Path, index: int = 0, bridge: Bridge | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.bridge = bridge
        tag = f"{os.getpid() % 10000}{index}"
        self.ns = f"mcns{tag}"
        self.veth_host, self.veth_ns = f"mch{tag}", f"mcn{tag}"
        if bridge:
            self.subnet = bridge.subnet
            self.addr = f"{bridge.subnet}.{2 + index}"
        else:
            self.subnet = f"10.77.{(os.getpid() + index) % 200 + 20}"
            self.addr = f"{self.subnet}.2"
        # the login's home on this machine: bind-mounted over `ubuntu`'s home inside the machine's own
        # mount namespace, so every test host (each node of a cluster, each concurrent test session)
        # has its own ~ even though they share one login
        self.home = self.dir / "home"
        self.home.mkdir(exist_ok=True)
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.touch()
        self.proc: subprocess.Popen | None = None
        self.sshd_pid = 0
        self.init: subprocess.Popen | None = None
        self.init_pid = 0

    # ---------------------------------------------------------------------------------- network
    def create_namespace(self) -> None:
        self.delete_namespace()
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        sh("ip", "link", "set", self.veth_ns, "netns", self.ns)
        if self.bridge:
            sh("ip", "link", "set", self.veth_host, "master", self.bridge.name)
        else:
            sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        # inside, the interface is eth0, as on a cloud machine
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_ns, "name", "eth0")
        sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.addr}/24", "dev", "eth0")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")

    def delete_namespace(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)
        sh("ip", "link", "del", self.veth_host, check=False)

    # ---------------------------------------------------------------------------------- sshd
    def new_host_key(self) -> None:
        key = self.dir / "ssh_host_ed25519_key"
        for p in (key, key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))

    def start(self) -> None:
        if not (self.dir / "ssh_host_ed25519_key").exists():
            self.new_host_key()
        config = self.dir / "sshd_config"
        config.write_text(f"""ListenAddress {self.addr}
Port 22
HostKey {self.dir}/ssh_host_ed25519_key
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
UseDNS no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
SetEnv MNIST_CLOUD_ROOT={self.dir}/root
""")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.start_machine()
        self.proc = subprocess.Popen([*self.inside(), SSHD, "-D", "-f", str(config), "-E", str(self.dir / "sshd.log")],
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.exec(f"exec 3<>/dev/tcp/{self.addr}/22", shell="bash").returncode == 0:
                self.sshd_pid = _child_of(self.proc.pid)  # nsenter forks: sshd is its child
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.1)
        raise RuntimeError("sshd did not start listening")

    def start_machine(self) -> None:
        """The machine's own process table and terminals: an init (INIT) as PID 1 of a new
        PID namespace with its own /proc and a private devpts instance, so what runs on the "instance"
        (and what the watchdog sees in /proc and /dev/pts) is only what the tests started there, never
        the processes or terminals of the machine running the tests. Its processes outlive sshd, as on
        an instance; stopping the init ends them all, as a shutdown does."""
        import pwd
        import shlex

        if self.init and self.init.poll() is None:
            return
        login_home = pwd.getpwnam(USER).pw_dir
        Path(login_home).mkdir(parents=True, exist_ok=True)
        private = (f"mount --bind {shlex.quote(str(self.home))} {shlex.quote(login_home)}"
                   " && mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts"
                   f" && mount --bind /dev/pts/ptmx /dev/ptmx && exec {shlex.quote(sys.executable)} -c {shlex.quote(INIT)}")
        self.init = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--pid", "--fork", "--mount-proc",
                                      "sh", "-c", private], start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = _child_of(self.init.pid)
            if pid and "mnist-cloud-test-init" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                self.init_pid = pid
                return
            if self.init.poll() is not None:
                raise RuntimeError("could not make the test host's PID namespace (unshare --pid --mount-proc)")
            time.sleep(0.05)
        raise RuntimeError("the test host's init did not start")

    def inside(self) -> list[str]:
        """argv prefix that runs a command on the "instance": its network, PID and mount namespaces."""
        return ["nsenter", "-t", str(self.init_pid), "-n", "-p", "-m"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop_machine(self) -> None:
        if self.init and self.init.poll() is None:
            os.killpg(self.init.pid, signal.SIGKILL)  # PID 1 gone: the kernel ends the namespace's processes
            self.init.wait(timeout=10)
        self.init = None

    def restart_with_new_host_key(self) -> None:
        self.stop()
        self.new_host_key()
        self.start()

    def authorize(self, public_key: str | bytes) -> None:
        if isinstance(public_key, bytes):
            public_key = public_key.decode()
        with open(self.authorized_keys, "a") as f:
            f.write(public_key.strip() + "\n")

    def kill_connections(self) -> None:
        """Drop every SSH session (the connection dies; processes started with setsid live on)."""
        if self.sshd_pid:
            sh("pkill", "-TERM", "-P", str(self.sshd_pid), check=False)

    def limit_rate(self, rate: str | None) -> None:
        """Cap what the machine sends (e.g. "4mbit"), so a transfer is still under way when a test
        interrupts it; None lifts the cap."""
        if rate:
            sh("ip", "netns", "exec", self.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
               "burst", "32kbit", "latency", "400ms")
        else:
            sh("ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def exec(self, command: str, shell: str = "sh") -> subprocess.CompletedProcess:
        """Run a command on the "instance" (as if on its console)."""
        return sh(*self.inside(), shell, "-c", command, check=False)

    def teardown(self) -> None:
        self.stop()
        self.stop_machine()
        self.delete_namespace()


def _child_of(pid: int) -> int:
    """The first child process of `pid`, or 0."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    return int(children[0]) if children else 0


def tools_available() -> str | None:
    """Why a real SSH host cannot be made here, or None. Under CI ($MNIST_CLOUD_CI) that is an error."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, sshd)"
    elif not all(t and Path(t).exists() for t in (SSHD, shutil.which("rsync"), shutil.which("ip"), shutil.which("ssh"))):
        reason = "needs openssh-server, rsync and iproute2 (.ci/run installs them)"
    if reason and os.environ.get("MNIST_CLOUD_CI"):
        raise RuntimeError(f"CI must run the SSH tests but cannot: {reason}")
    return reason
