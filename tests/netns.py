"""Test hosts on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each host is a network namespace with its own loopback and one interface ``eth0`` carrying its
address; the bridge lives in a namespace of its own, so the machine's real network is never
touched. Processes started on a host run with ``ip netns exec`` (and, with ``own_pids``, in a
pid and IPC namespace of their own, so that they see each other's processes only on the same
host, as on separate machines). Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.79.0"


def can_create_namespaces() -> str | None:
    """None when namespaces can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    probe = f"prprobe{os.getpid()}"
    try:
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def can_impair_links() -> str | None:
    """None when links can be made lossy and slow here (nftables and ``tc tbf``); else why not.

    ``tc netem`` would add delay too, but kernels built without ``sch_netem`` (as on this
    project's CI machines) have only the rate limiter, whose queue is what delays packets.
    """
    probe = f"prtc{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (FileNotFoundError, RuntimeError) as exc:
        return f"cannot create a namespace: {exc}"
    try:
        _nft(_loss_rules(1), netns=probe)
        _tc("qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "64kb", "latency", "200ms",
            netns=probe)
        return None
    except FileNotFoundError as exc:
        return f"{exc.filename} is not installed (apt-get install nftables iproute2)"
    except RuntimeError as exc:
        return str(exc)
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=10)


_FAULTS = "prfaults"


def _loss_rules(percent: int) -> str:
    """nftables rules dropping ``percent`` % of the packets coming in and going out, at random."""
    drop = f"numgen random mod 100 < {percent} drop"
    return (
        f"table inet {_FAULTS} {{\n"
        f"  chain inbound {{\n    type filter hook input priority 0;\n    iifname \"eth0\" {drop}\n  }}\n"
        f"  chain outbound {{\n    type filter hook output priority 0;\n    oifname \"eth0\" {drop}\n  }}\n"
        "}\n"
    )


def _tc(*args: str, netns: str) -> None:
    argv = ["tc", "-n", netns, *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def _nft(rules: str, netns: str) -> None:
    argv = ["ip", "netns", "exec", netns, "nft", "-f", "-"]
    result = subprocess.run(argv, input=rules, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"nft in {netns}: {result.stderr.strip()}")


@dataclass
class Host:
    name: str
    netns: str
    address: str
    #: The switch's end of the host's cable (a veth in the bridge's namespace).
    port: str = ""


@dataclass
class Network:
    """Hosts on one bridged /24; :meth:`close` kills their processes and removes everything."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _switch: str = ""

    def __post_init__(self) -> None:
        self._switch = f"pr{self.tag}sw"
        _ip("netns", "add", self._switch)
        _ip("link", "add", "br0", "type", "bridge", netns=self._switch)
        _ip("link", "set", "br0", "up", netns=self._switch)

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        netns = f"pr{self.tag}{name}"
        outside, inside = f"v{self.tag}{number}", f"h{self.tag}{number}"
        address = f"{SUBNET}.{number}"
        _ip("netns", "add", netns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "netns", self._switch)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", "br0", netns=self._switch)
        _ip("link", "set", outside, "up", netns=self._switch)
        _ip("link", "set", inside, "name", "eth0", netns=netns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        host = Host(name, netns, address, outside)
        self.hosts[name] = host
        return host

    def start(
        self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None, own_pids: bool = True
    ) -> subprocess.Popen[bytes]:
        """Run ``argv`` on ``host``, output to ``log``."""
        prefix = ["ip", "netns", "exec", self.hosts[host].netns]
        if own_pids:
            # pid 1 of the new pid namespace is the command; killing it ends the host's processes.
            prefix += ["unshare", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc"]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                prefix + argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to completion (same pid namespace as the test)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].netns, *argv],
            capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def ready(self, host: str, port: int) -> bool:
        """Whether a deployment on ``host`` answers 200 on ``GET /readyz`` at ``port``."""
        url = f"http://{self.hosts[host].address}:{port}/readyz"
        probe = (
            "import sys, urllib.request\n"
            f"try: sys.exit(0 if urllib.request.urlopen({url!r}, timeout=2).status == 200 else 1)\n"
            "except Exception: sys.exit(1)"
        )
        return self.run(host, [sys.executable, "-c", probe], timeout_s=20).returncode == 0

    def rx_bytes(self, host: str) -> int:
        """Bytes received on ``host``'s network interface so far."""
        result = self.run(host, ["cat", "/sys/class/net/eth0/statistics/rx_bytes"], timeout_s=10)
        return int(result.stdout.strip())

    def cut(self, host: str) -> None:
        """Pull ``host``'s cable out of the switch: its packets go nowhere, its sockets stay open."""
        _ip("link", "set", self.hosts[host].port, "down", netns=self._switch)

    def restore(self, host: str) -> None:
        """Plug ``host``'s cable back in (undoes :meth:`cut`)."""
        _ip("link", "set", self.hosts[host].port, "up", netns=self._switch)

    def impair(self, host: str, *, loss_percent: int, rate: str) -> None:
        """Make ``host``'s link lossy and slow, both ways: ``loss_percent`` of its packets are
        dropped at random (nftables) and it carries at most ``rate`` (a ``tc tbf`` rate such
        as ``40mbit``; a fuller queue delays packets up to 200 ms, then drops them)."""
        h = self.hosts[host]
        _nft(_loss_rules(loss_percent), netns=h.netns)
        for netns, dev in ((h.netns, "eth0"), (self._switch, h.port)):
            _tc("qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms",
                netns=netns)

    def heal(self, host: str) -> None:
        """Undo :meth:`impair`."""
        h = self.hosts[host]
        _nft(f"delete table inet {_FAULTS}\n", netns=h.netns)
        for netns, dev in ((h.netns, "eth0"), (self._switch, h.port)):
            _tc("qdisc", "del", "dev", dev, "root", netns=netns)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal ``proc``'s whole process group (the host's command and all it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                self.kill(proc)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "delete", host.netns], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "delete", self._switch], capture_output=True, timeout=10)
