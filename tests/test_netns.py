"""The emulated cluster's network: namespaces, bridge, per-pair htb shaping, and complete tear-down.

Needs root and `ip netns` (skipped otherwise, with the reason). A shaped transfer between two
namespaces must take the time the configured payload rate says; after `down` (also after an exception
inside the `with`, and for a run whose creator died) nothing of the emulation is left.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from skippipe.emulation.netns import (INTERFACE, EmulatedNetwork, _existing_links, _existing_netns, netns_unavailable_reason,
                                      remove_stale)

REASON = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")

# A tiny TCP sender/receiver: the receiver prints the seconds from the first byte to the last.
PEER = r"""
import socket, sys, time
role, host, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "recv":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 5601)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); got, t0 = 0, None
    while got < size:
        b = c.recv(1 << 20)
        t0 = t0 or time.perf_counter()
        got += len(b)
    print(time.perf_counter() - t0, flush=True)
else:
    for _ in range(100):
        try:
            c = socket.create_connection((host, 5601)); break
        except OSError:
            time.sleep(0.05)
    c.sendall(b"\0" * size); c.close()
"""


def _transfer_s(net: EmulatedNetwork, src: int, dst: int, size: int) -> float:
    recv = net.popen(dst, [sys.executable, "-c", PEER, "recv", net.address(dst), str(size)],
                     stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    subprocess.run(net.command(src, [sys.executable, "-c", PEER, "send", net.address(dst), str(size)]),
                   check=True, timeout=60)
    out, _ = recv.communicate(timeout=60)
    return float(out.strip())


def test_shaped_links_carry_their_payload_rate():
    rates = np.array([[np.inf, 20.0, 4.0], [20.0, np.inf, np.inf], [4.0, np.inf, np.inf]])  # Mbit/s
    with EmulatedNetwork(rates) as net:
        assert set(net.leftovers()) == {net.bridge, *(net.namespace(i) for i in range(3)),
                                        *(net.host_veth(i) for i in range(3))}
        for src, dst, size in [(0, 1, 500_000), (0, 2, 200_000)]:
            want = size * 8 / (rates[src, dst] * 1e6)
            got = _transfer_s(net, src, dst, size)
            assert got == pytest.approx(want, rel=0.10), f"{src}->{dst}: {got:.3f} s, want {want:.3f} s"
        fast = _transfer_s(net, 1, 2, 2_000_000)  # unshaped
        assert fast < 0.2
        tc = subprocess.run(net.command(0, ["tc", "-s", "class", "show", "dev", INTERFACE]), capture_output=True,
                            text=True, check=True).stdout
        assert "rate 20912Kbit" in tc  # 20 Mbit/s of payload = 20.9 Mbit/s of frames
    assert net.leftovers() == []


# One TCP connection, as gloo uses per pair: the client sends two messages back to back; the server,
# after the first, replies with one while the second is still arriving; the client times the reply.
REPLY = r"""
import socket, sys, threading, time
role, host, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 5602)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
else:
    for _ in range(100):
        try:
            c = socket.create_connection((host, 5602)); break
        except OSError:
            time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def recv(n):
    got = 0
    while got < n:
        got += len(c.recv(min(1 << 20, n - got)))
t0 = time.perf_counter()
if role == "client":
    c.sendall(b"\0" * (2 * size)); recv(size); print(time.perf_counter() - t0, flush=True)
else:
    recv(size); threading.Thread(target=lambda: c.sendall(b"\0" * size)).start(); recv(size); time.sleep(2)
"""


def test_a_reply_is_not_held_up_by_the_other_directions_traffic():
    """Pure ACKs bypass the shaping (Note [shaping]): queued behind the reverse direction's data they would
    starve the reply of ACKs and hold it up by most of a message time."""
    mbit, size = 1.0, 40_000
    with EmulatedNetwork(np.array([[np.inf, mbit], [mbit, np.inf]])) as net:
        server = net.popen(1, [sys.executable, "-c", REPLY, "server", net.address(1), str(size)],
                           stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(net.command(0, [sys.executable, "-c", REPLY, "client", net.address(1), str(size)]),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        server.wait(10)
    message_s = size * 8 / (mbit * 1e6)  # 0.32 s
    # The reply leaves once the first message is in (1 message time) and takes 1 message time.
    assert float(out) == pytest.approx(2 * message_s, rel=0.15)


def test_down_on_error_and_processes_ended():
    rates = np.full((2, 2), 10.0)
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedNetwork(rates) as net:
            sleeper = net.popen(0, ["sleep", "600"])
            raise RuntimeError("boom")
    assert sleeper.poll() is not None, "a process started in a namespace outlived the emulation"
    assert net.leftovers() == []


def test_stale_emulation_of_a_dead_process_is_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    time.sleep(0.05)
    net = EmulatedNetwork(np.full((2, 2), 10.0), tag=f"{dead.pid:x}g0")
    net.up()  # and never `down`: as if its creator had been killed
    assert net.leftovers()
    removed = remove_stale()
    assert set(net.leftovers()) == set()
    assert net.namespace(0) in removed and net.bridge in removed
    assert not any(n.startswith(f"sp{net.tag}") for n in _existing_links() + _existing_netns())


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="square"):
        EmulatedNetwork(np.ones((2, 3)))
    with pytest.raises(ValueError, match="positive"):
        EmulatedNetwork(np.array([[np.inf, 0.0], [1.0, np.inf]]))
