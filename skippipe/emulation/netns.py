"""An emulated cluster on one machine: one network namespace per node, all on one bridge, per-pair
bandwidth shaped in the kernel.

    with EmulatedNetwork(bandwidth_mbit) as net:      # n x n payload rates, Mbit/s (inf: unshaped)
        proc = net.popen(0, ["python", "-c", "..."])  # runs inside node 0's namespace

Layout (names carry the creating pid, so leftovers of a killed run are recognised and removed by
`remove_stale`, and two emulations never collide):

    namespace  spemu-<tag>-<i>   eth0 = 10.213.0.<101 + i>/24, lo up
    host       bridge spb<tag>, veth sp<tag>h<i> (the host end of node i's eth0, enslaved to the bridge)

The bridge has no address: nothing on the host or outside it is reachable from the namespaces, and the
private addresses exist only inside namespaces made here. Node addresses have the same number of digits
so that their string order is their numeric order (torchrun's c10d rendezvous ranks nodes by address).

Note [shaping]: each namespace shapes its own egress: an htb root with one class per destination node
(rate = that link's bandwidth) picked by a u32 filter on the destination address, and an unshaped default
class for everything else (ARP). Classes are siblings without a shared parent, so the links of one node
are independent, as WAN paths between regions are. htb counts whole frames; a full TCP segment carries
1448 payload bytes in a 1514-byte frame (Ethernet 14 + IP 20 + TCP with timestamps 32), so the class rate
is the payload rate times WIRE_OVERHEAD: what the application sees is then the topology's figure.
Two settings keep single messages exact, not only long streams: `gso_max_segs 1` on each eth0 (htb lets a
whole GSO super-packet of up to 64 KB through at once and only then goes into debt, so a lone 16 KB
message would cross a "5 Mbit/s" link in 0.2 ms), and a burst of one frame (an idle class saves up
`burst` bytes that the next message then gets for free). Packets under 128 bytes (pure TCP ACKs) bypass
the shaping: otherwise the ACKs of a message from b to a queue behind a's own data to b in a's 64 KB-deep
FIFO, and b's message stalls for want of ACKs (a reply sent while the other direction is busy arrived 0.5 s
late on a 0.79 Mbit/s link). Real links carry an ACK in microseconds; so does this.
netem is not available on this kernel, so latency is added in the processes (skippipe/emulation/latency.py).
"""
from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

WIRE_OVERHEAD = 1514 / 1448
SUBNET = "10.213.0"
FIRST_HOST = 101  # node i is SUBNET.(101 + i): three digits for every node, so string order = node order
MAX_NODES = 254 - FIRST_HOST + 1
UNSHAPED_MBIT = 10_000.0
INTERFACE = "eth0"
_PREFIX = "spemu-"
_counter = itertools.count()


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can): root, `ip` and `tc` are needed."""
    if os.geteuid() != 0:
        return "network namespaces need root; run as root (or sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed; install iproute2"
    probe = f"{_PREFIX}probe{os.getpid():x}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(argv: list[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def address(index: int) -> str:
    return f"{SUBNET}.{FIRST_HOST + index}"


class EmulatedNetwork:
    """Namespaces, veths, a bridge and tc shaping for n nodes; `down` removes all of it (idempotent)."""

    def __init__(self, bandwidth_mbit: np.ndarray, tag: str | None = None):
        rates = np.asarray(bandwidth_mbit, dtype=float)
        n = rates.shape[0]
        if rates.shape != (n, n) or n < 1:
            raise ValueError(f"bandwidth_mbit must be a square n x n matrix, got shape {rates.shape}")
        if n > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} emulated nodes fit the address plan; got {n}")
        off = ~np.eye(n, dtype=bool)
        if np.any(off & ~(rates > 0)):
            raise ValueError("every link needs a positive bandwidth (inf for unshaped)")
        self.rates = rates
        self.num_nodes = n
        self.tag = tag or f"{os.getpid():x}g{next(_counter)}"
        self.bridge = f"spb{self.tag}"
        if len(self.bridge) > 15 or len(self.host_veth(n - 1)) > 15:
            raise ValueError(f"tag {self.tag!r} is too long for interface names (15 characters)")
        self.processes: list[subprocess.Popen] = []
        self._made: list[tuple[str, str]] = []  # ("link" | "netns", name), in creation order

    def namespace(self, index: int) -> str:
        return f"{_PREFIX}{self.tag}-{index}"

    def host_veth(self, index: int) -> str:
        return f"sp{self.tag}h{index}"

    def address(self, index: int) -> str:
        return address(index)

    # -- set-up and tear-down ------------------------------------------------------------------------

    def __enter__(self) -> "EmulatedNetwork":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._made.append(("link", self.bridge))
        _run(["ip", "link", "set", self.bridge, "up"])
        for i in range(self.num_nodes):
            ns, host = self.namespace(i), self.host_veth(i)
            _run(["ip", "netns", "add", ns])
            self._made.append(("netns", ns))
            _run(["ip", "link", "add", host, "type", "veth", "peer", "name", INTERFACE, "netns", ns])
            self._made.append(("link", host))
            _run(["ip", "link", "set", host, "master", self.bridge])
            _run(["ip", "link", "set", host, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", INTERFACE])
            _run(["ip", "-n", ns, "link", "set", INTERFACE, "gso_max_segs", "1", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._shape(i)
        self._wait_for_links()

    def _shape(self, i: int) -> None:
        """Note [shaping]: htb root, one class + u32 destination filter per peer, unshaped default class."""
        lines = [f"qdisc add dev {INTERFACE} root handle 1: htb default 1",
                 f"class add dev {INTERFACE} parent 1: classid 1:1 htb rate {UNSHAPED_MBIT:.0f}mbit quantum 60000",
                 # Packets under 128 bytes (pure TCP ACKs) skip the shaping: Note [shaping], ACKs.
                 f"filter add dev {INTERFACE} parent 1: protocol ip prio 1 u32 match u16 0x0000 0xff80 at 2 flowid 1:1"]
        for j in range(self.num_nodes):
            if j == i or not math.isfinite(self.rates[i, j]):
                continue
            rate_kbit = max(8.0, self.rates[i, j] * 1e3 * WIRE_OVERHEAD)
            minor = f"{16 + j:x}"
            lines.append(f"class add dev {INTERFACE} parent 1: classid 1:{minor} htb rate {rate_kbit:.0f}kbit "
                         f"burst 1514 cburst 1514 quantum 1514")
            lines.append(f"filter add dev {INTERFACE} parent 1: protocol ip prio 2 u32 "
                         f"match ip dst {self.address(j)}/32 flowid 1:{minor}")
        _run(["ip", "netns", "exec", self.namespace(i), "tc", "-batch", "-"], stdin="\n".join(lines) + "\n")

    def _wait_for_links(self, timeout_s: float = 10.0) -> None:
        """veths come up asynchronously; wait until every host end reports carrier before anyone connects."""
        deadline = time.monotonic() + timeout_s
        for i in range(self.num_nodes):
            carrier = Path(f"/sys/class/net/{self.host_veth(i)}/carrier")
            while True:
                try:
                    if carrier.read_text().strip() == "1":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"veth {self.host_veth(i)} has no carrier after {timeout_s:.0f} s")
                time.sleep(0.02)

    def down(self) -> None:
        """Kill what runs in the namespaces, then remove veths, namespaces and the bridge. Never raises."""
        for proc in self.processes:
            _kill_group(proc)
        self.processes = []
        for kind, name in [m for m in self._made if m[0] == "netns"]:
            for pid in _netns_pids(name):
                _kill_pid(pid)
        # veths first: deleting a namespace frees its veth only asynchronously.
        for kind, name in sorted(reversed(self._made), key=lambda m: m[0] != "link" or m[1] == self.bridge):
            if kind == "link":
                _run(["ip", "link", "del", name], check=False)
            else:
                _run(["ip", "netns", "del", name], check=False)
        self._made = []

    def leftovers(self) -> list[str]:
        """Names of this network's namespaces and links that still exist (empty after `down`)."""
        names = set(_existing_netns()) | set(_existing_links())
        wanted = {self.bridge} | {self.namespace(i) for i in range(self.num_nodes)} | \
                 {self.host_veth(i) for i in range(self.num_nodes)}
        return sorted(names & wanted)

    # -- running things inside ------------------------------------------------------------------------

    def command(self, index: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(index), *argv]

    def popen(self, index: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` in node `index`'s namespace, in its own process group (so `down` can end it all)."""
        proc = subprocess.Popen(self.command(index, argv), start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _netns_pids(namespace: str) -> list[int]:
    out = _run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _existing_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _existing_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, flags=re.M)]


def remove_stale() -> list[str]:
    """Remove namespaces and links of emulations whose creating process is gone (a crash or kill -9)."""
    removed = []
    pattern = re.compile(r"^(?:spemu-|spb|sp)([0-9a-f]+)g\d+")
    for name in _existing_links() + _existing_netns():
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(1), 16)):
            continue
        if name.startswith(_PREFIX):
            for pid in _netns_pids(name):
                _kill_pid(pid)
            _run(["ip", "netns", "del", name], check=False)
        else:
            _run(["ip", "link", "del", name], check=False)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
