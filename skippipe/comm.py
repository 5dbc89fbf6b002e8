"""Point-to-point traffic of one node: activations forward along paths, gradients back.

Note [message order]: NCCL ignores tags and matches a pair's messages by their order, so the order of
messages on each (sender, receiver) pair must be known to both ends. Every node executes its plan order
strictly in sequence, so the sender emits in its plan order, and `topology.plan.message_order` gives
both ends the same list. The receiver keeps the next expected message from every peer posted (irecv);
a message that arrives before the node needs it is parked until its consuming action runs.

Note [bounded waits]: every wait on a peer passes an explicit timeout, so a peer that died or hangs ends
the run with an error naming the peer and the message, never a silent hang.
"""
from __future__ import annotations

import contextlib
import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from topology.plan import Action, Plan, dependencies, message_order
from skippipe.context import Context


class PeerError(RuntimeError):
    """A peer died, hung or broke the connection."""


@contextlib.contextmanager
def peer_errors(what: str):
    """Turn a failed or timed-out communication into a PeerError that says what was being waited for.

    gloo reports a dead peer ("Connection closed by peer") and a timeout as plain RuntimeErrors.
    """
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as exc:
        raise PeerError(f"{what}: {' '.join(str(exc).split())[:300]} (the peer may have died or hung; see its "
                        f"log; raise train.comm_timeout_s if it is only slow)") from None


def wait_for(work, timeout: timedelta | None, what: str) -> None:
    with peer_errors(what):
        if timeout is None:  # the default group's timeout applies
            work.wait()
        elif work.wait(timeout) is False:  # some backends report a timeout by returning False
            raise RuntimeError(f"timed out after {timeout.total_seconds():.0f} s")


# Note [no pickles from peers]: torch.distributed's *_object collectives (broadcast_object_list,
# all_gather_object, ...) unpickle what a peer sends, so a compromised or confused peer could run code on
# every rank. Everything structured that ranks share (the plan, parameter counts, timelines, profiles)
# travels as UTF-8 JSON in a uint8 tensor and is decoded with json.loads, which builds plain data only.

def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def _decode(tensor: torch.Tensor, length: int):
    return json.loads(bytes(tensor[:length].cpu().tolist()).decode())


def broadcast_json(value, src: int = 0):
    """`value` (JSON-serialisable, given on `src`) on every rank; nothing is unpickled (Note [no pickles from peers])."""
    device = _collective_device()
    data = _encode(value).to(device) if dist.get_rank() == src else None
    length = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    if data is None:
        data = torch.empty(int(length), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src)
    return _decode(data, int(length))


def all_gather_json(value) -> list:
    """Every rank's `value` (JSON-serialisable), in rank order (Note [no pickles from peers])."""
    device = _collective_device()
    data = _encode(value).to(device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in lengths]
    dist.all_gather(parts, padded)
    return [_decode(part, int(n)) for part, n in zip(parts, lengths)]


class Messenger:
    """The messages one node (ctx.node) sends and receives in an iteration, in plan order.

    Every message has `shape` and `dtype` (a microbatch's hidden states or their gradient); sends go
    through ctx.isend, the transport chosen at launch (Note [transport] in context.py).
    """

    def __init__(self, plan: Plan, ctx: Context, *, shape: tuple[int, ...], dtype: torch.dtype):
        self.ctx = ctx
        node_id = self.node_id = ctx.node.id
        self.node_rank = ctx.node_rank
        self.shape, self.dtype = shape, dtype
        # Where each of this node's actions sends its result: (destination node, consuming action).
        self.destination: dict[Action, tuple[int, Action]] = {}
        self.source: dict[Action, int] = {}  # consuming action here -> node that produces its input
        for path in plan.paths:
            for a, n, b, m in dependencies(path):
                if n == node_id:
                    self.destination[a] = (m, b)
                if m == node_id:
                    self.source[b] = n
        # Per peer, the consuming actions of its messages to us, in the order the peer sends them.
        self.expected = {src: [consumer for _, consumer in msgs]
                         for (src, dst), msgs in message_order(plan).items() if dst == node_id}
        self.wait_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self._cursor = {src: 0 for src in self.expected}
        self._posted: dict[int, tuple[object, torch.Tensor, Action]] = {}
        self._parked: dict[Action, torch.Tensor] = {}  # arrived before needed, or produced locally
        self._sends: list[tuple[object, torch.Tensor, str]] = []

    def start_iteration(self) -> None:
        """Post the first expected message from every peer."""
        self._reset()
        self.wait_s = 0.0
        for src in self.expected:
            self._post(src)

    def _post(self, src: int) -> None:
        index = self._cursor[src]
        if index < len(self.expected[src]):
            buffer = torch.empty(self.shape, dtype=self.dtype, device=self.ctx.device)
            work = dist.irecv(buffer, src=self.node_rank[src])
            self._posted[src] = (work, buffer, self.expected[src][index])

    def send(self, tensor: torch.Tensor, producer: Action) -> None:
        """Hand the result of `producer` to the action that consumes it, here or on another node."""
        dst, consumer = self.destination[producer]
        if dst == self.node_id:  # a one-stage path: the loss and backward run where the forward did
            self._parked[consumer] = tensor.detach()
            return
        payload = tensor.detach().contiguous()
        if payload.shape != self.shape:
            raise ValueError(f"{producer}: message shape {tuple(payload.shape)} but the receiver expects "
                             f"{self.shape}; every microbatch must have the same shape")
        work = self.ctx.isend(payload, dst=self.node_rank[dst])
        self._sends.append((work, payload, f"sending {producer} -> {consumer} to node {dst} (rank {self.node_rank[dst]})"))
        # Drop finished sends so their buffers can be freed; keep the rest alive until they finish.
        self._sends = [s for s in self._sends if not s[0].is_completed()]

    def recv(self, consumer: Action) -> torch.Tensor:
        """The input of `consumer`: wait for messages from its source peer, in that peer's order."""
        if consumer in self._parked:
            return self._parked.pop(consumer)
        src = self.source[consumer]
        start = time.perf_counter()
        try:
            while True:
                work, buffer, expected = self._posted.pop(src)
                wait_for(work, self.ctx.timeout, f"node {self.node_id} waiting for {expected} from node {src} "
                                             f"(rank {self.node_rank[src]})")
                self._cursor[src] += 1
                self._post(src)
                if expected == consumer:
                    return buffer
                self._parked[expected] = buffer
        finally:
            self.wait_s += time.perf_counter() - start

    def finish_iteration(self) -> None:
        """Wait for every send of the iteration; every expected message must have been consumed."""
        start = time.perf_counter()
        for work, _, what in self._sends:
            wait_for(work, self.ctx.timeout, what)
        self.wait_s += time.perf_counter() - start
        assert not self._posted and not self._parked, f"unconsumed messages: {list(self._posted)} {list(self._parked)}"
        self._sends = []


def exchange(ctx: Context, tensor: torch.Tensor | None, *, src: int, dst: int, shape: tuple[int, ...],
             dtype: torch.dtype, what: str) -> torch.Tensor | None:
    """A blocking transfer of one `shape`/`dtype` tensor from rank `src` to rank `dst`, waited for within
    ctx.timeout; returns the received tensor on dst, None elsewhere. Raises PeerError naming `what`.

    Plain dist.isend, not ctx.isend: it carries the start-up handshake and the evaluation's hidden states,
    which emulated link latency has never delayed (only the training messages are what it models).
    """
    if ctx.rank == src:
        with peer_errors(f"{what}: sending to rank {dst}"):  # gloo raises at once when the peer has gone
            work = dist.isend(tensor.detach().contiguous(), dst=dst)
        wait_for(work, ctx.timeout, f"{what}: sending to rank {dst}")
        return None
    if ctx.rank == dst:
        buffer = torch.empty(shape, dtype=dtype, device=ctx.device)
        wait_for(dist.irecv(buffer, src=src), ctx.timeout, f"{what}: waiting for rank {src}")
        return buffer
    return None


def connect_peers(ctx: Context, pairs: set[tuple[int, int]]) -> None:
    """Touch every rank pair that will exchange messages, in one global order, before training.

    NCCL creates a pair's communicator on its first message, and creating it blocks both ends; done lazily
    mid-iteration, two pairs could wait on each other. In a global sorted order the first unfinished pair
    always has both ends ready, so this cannot deadlock. On gloo it checks every link within the timeout.
    """
    token = torch.zeros(1, device=ctx.device)
    one = dict(shape=(1,), dtype=token.dtype, what="connecting")
    for low, high in sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b}):
        if ctx.rank == low:
            exchange(ctx, token, src=low, dst=high, **one)
            exchange(ctx, None, src=high, dst=low, **one)
        elif ctx.rank == high:
            exchange(ctx, None, src=low, dst=high, **one)
            exchange(ctx, token, src=high, dst=low, **one)
