"""Deltas both ways with error feedback on both sides, and stateful clients
that catch up on the rounds they missed (``method.transport = "delta"``).

The server holds two models: ``global`` (its own, updated by the averaged
client deltas) and ``public``, the model every up-to-date client holds. After
each aggregation it broadcasts ``C(global - public)``, the compressed change,
and adds the decoded message to ``public``; what compression dropped stays in
``global - public`` and goes out in later broadcasts (the server's error
feedback, as in DoubleSqueeze). Without server error feedback ``global`` is
reset to ``public`` instead.

Clients keep their copy of the model between rounds. A client sampled in
round ``r`` that last synchronised in round ``s`` receives the broadcasts of
rounds ``s..r-1`` from the server's log (as STC's cache of recent updates)
and applies them in order, which reproduces ``public`` bit for bit; when
those messages would weigh more than one raw snapshot of ``public`` it
receives the snapshot instead. Every one of those bytes is counted. Before a
client's first round nothing travels: the initial model, like the frozen
base, is rebuilt from the seed the run shares.

The client trains from its copy and uploads ``C(delta + e_i)`` with its own
residual ``e_i`` (``fc.ErrorFeedback``).

``down_mode = "per_client"`` trades server memory for download bytes: the
server keeps the copy each client holds and, when the client is sampled,
sends it one message ``C(global - copy_i)``; what that message dropped stays
in ``global - copy_i`` and goes out at the client's next round (a residual
per client instead of one shared one). A client then receives one message
per round it takes part in, instead of every broadcast it missed; the cost
is one model copy per client on the server, which suits cross-silo
federations, not millions of devices. A client's first download after
round 1 is a raw snapshot of the server's model (counted).

With ``flatten``, every message carries one 1-D tensor, the trainable
tensors concatenated in a fixed order that both sides derive from the model
definition: a header of a few dozen bytes instead of ~75 bytes per tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import flocora_codec as fc

from .comm import Plain, encoder

FLAT_NAME = "params"


class Layout:
    """Names and shapes of the tensors that travel, and their flat packing."""

    def __init__(self, tensors: dict[str, torch.Tensor], flatten: bool):
        self.names = list(tensors)
        self.shapes = [tuple(t.shape) for t in tensors.values()]
        self.numels = [t.numel() for t in tensors.values()]
        self.dtypes = [t.dtype for t in tensors.values()]
        self.flatten = flatten

    def pack(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.flatten:
            return tensors
        return {FLAT_NAME: torch.cat([tensors[n].detach().reshape(-1).float() for n in self.names])}

    def expected(self) -> dict[str, tuple]:
        """What a message of this layout holds, ``{name: (shape, dtype)}``, for
        ``fc.decode(..., expect=...)``."""
        if self.flatten:
            return {FLAT_NAME: ((sum(self.numels),), torch.float32)}
        # layouts pickled in checkpoints before dtypes were kept held float32 tensors
        dtypes = getattr(self, "dtypes", [torch.float32] * len(self.names))
        return {n: (s, d) for n, s, d in zip(self.names, self.shapes, dtypes)}

    def unpack(self, message: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.flatten:
            return message
        if set(message) != {FLAT_NAME} or message[FLAT_NAME].shape != (sum(self.numels),):
            raise ValueError(
                f"flat message must hold one tensor {FLAT_NAME!r} of {sum(self.numels)} elements, "
                f"got {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in message.items())}}}"
            )
        parts = torch.split(message[FLAT_NAME], self.numels)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}


def _add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] + b[k].to(a[k].device, a[k].dtype) for k in a}


class DeltaLink:
    """Both directions of a delta-transport run; see the module docstring.

    Parameters
    ----------
    init : dict of tensors
        The initial trainable tensors, which every client can rebuild from the seed.
    down_spec : callable ``rnd -> CodecSpec``
        The broadcast's spec in round ``rnd``.
    up_spec : callable ``(cid, rnd) -> CodecSpec``
        Client ``cid``'s upload spec in round ``rnd`` (density tiers, decay).
    server_ef, client_ef : bool
        Error feedback on the download (server residual) and the upload.
    flatten : bool
        One flat tensor per message (see :class:`Layout`).
    codec : object with ``encode(tensors, encoder) -> bytes`` and ``decode(bytes, device)``
        The timing wrapper the loop uses (``fl.comm.Timer``; encoders from ``fl.comm.encoder``).
    """

    # defaults for links unpickled from checkpoints written before these attributes existed
    down_mode = "broadcast"
    global_: dict | None = None

    def __init__(
        self,
        init: dict[str, torch.Tensor],
        down_spec: Callable,
        up_spec: Callable,
        server_ef: bool = True,
        client_ef: bool = True,
        flatten: bool = False,
        down_mode: str = "broadcast",
    ):
        if down_mode not in ("broadcast", "per_client"):
            raise ValueError(f"down_mode must be 'broadcast' or 'per_client', got {down_mode!r}")
        self.down_mode = down_mode
        self.layout = Layout(init, flatten)
        self.init = {k: v.detach().clone() for k, v in init.items()}
        self.public = {k: v.detach().clone() for k, v in init.items()}
        self.global_ = self.public  # per-client mode: the server's model as of the last aggregation
        self.down_spec, self.up_spec = down_spec, up_spec
        self.server_ef, self.client_ef = server_ef, client_ef
        self.log: list[tuple[int, bytes]] = []  # (round broadcast after, message)
        self.clients: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # cid -> (synced through round, copy)
        self.residuals: dict[int, fc.ErrorFeedback] = {}
        self.snapshot_bytes = len(fc.encode({k: v.cpu() for k, v in self.public.items()}, fc.CodecSpec.raw()))

    # -- server ------------------------------------------------------------------------
    def broadcast(self, rnd: int, global_tensors: dict[str, torch.Tensor], codec) -> tuple[bytes, dict]:
        """Compress ``global - public`` after round ``rnd``; returns the message and
        the tensors the server should now hold as ``global`` (per-client mode:
        nothing is broadcast, ``(None, global)``)."""
        if self.down_mode == "per_client":
            self.global_ = global_tensors
            return None, global_tensors
        diff = {k: global_tensors[k] - self.public[k] for k in self.public}
        msg = codec.encode(self.layout.pack(diff), Plain(self.down_spec(rnd)))
        self.public = _add(self.public, self.layout.unpack(codec.decode(msg, None)))
        self.log.append((rnd, msg))
        self._trim_log()
        new_global = global_tensors if self.server_ef else {k: v.clone() for k, v in self.public.items()}
        return msg, new_global

    def _trim_log(self) -> None:
        # a client further behind than the snapshot's worth of messages gets the snapshot
        total = sum(len(m) for _, m in self.log)
        while self.log and total - len(self.log[0][1]) >= self.snapshot_bytes:
            total -= len(self.log.pop(0)[1])

    # -- client ------------------------------------------------------------------------
    def sync(self, cid: int, rnd: int, codec, device) -> tuple[dict[str, torch.Tensor], list[bytes], str]:
        """Bring client ``cid`` up to ``public`` at the start of round ``rnd``.

        Returns its model copy, the messages it received (their lengths are
        the download bytes) and how: ``"seed"``, ``"catch-up"`` or ``"snapshot"``.
        """
        synced, state = self.clients.get(cid, (0, None))
        if state is None:
            state = {k: v.clone() for k, v in self.init.items()}
        if self.down_mode == "per_client":
            if rnd == 1:  # nothing has changed since the seed
                how, received = "seed", []
            elif synced == 0:  # first contact after round 1: the exact model, raw
                snap = codec.encode({k: v.cpu() for k, v in self.global_.items()}, Plain(fc.CodecSpec.raw()))
                state = {k: v.to(device) for k, v in codec.decode(snap, device, expect=self.init).items()}
                how, received = "snapshot", [snap]
            else:
                diff = {k: self.global_[k] - state[k] for k in state}
                msg = codec.encode(self.layout.pack(diff), Plain(self.down_spec(rnd)))
                state = _add(state, self.layout.unpack(codec.decode(msg, device, expect=self.layout.expected())))
                how, received = "per-client", [msg]
            self.clients[cid] = (rnd, state)
            return {k: v.clone() for k, v in state.items()}, received, how
        # it holds every broadcast made before round `synced` (none if 0)
        missed = [m for r, m in self.log if r >= synced]
        complete = not self.log or self.log[0][0] <= max(synced, 1)  # nothing it needs was trimmed
        if synced == 0 and not self.log:
            how, received = "seed", []
        elif complete and sum(len(m) for m in missed) <= self.snapshot_bytes:
            how, received = "catch-up", missed
            for m in missed:  # in broadcast order: the same additions the server made
                state = _add(state, self.layout.unpack(codec.decode(m, device, expect=self.layout.expected())))
        else:
            snap = codec.encode({k: v.cpu() for k, v in self.public.items()}, Plain(fc.CodecSpec.raw()))
            how, received = "snapshot", [snap]
            state = {k: v.to(device) for k, v in codec.decode(snap, device, expect=self.init).items()}
        self.clients[cid] = (rnd, state)
        return {k: v.clone() for k, v in state.items()}, received, how

    def upload(self, cid: int, rnd: int, delta: dict[str, torch.Tensor], codec) -> bytes:
        """Client side: ``C(delta + e_cid)``, keeping the new residual."""
        spec = self.up_spec(cid, rnd)
        ef = self.residuals.setdefault(cid, fc.ErrorFeedback(spec)) if self.client_ef else None
        return codec.encode(self.layout.pack(delta), encoder(spec, ef))

    def receive(self, msg: bytes, codec, device) -> dict[str, torch.Tensor]:
        """Server side: decode one upload into per-tensor deltas. The message
        must hold exactly the layout's tensors, checked before any allocation."""
        return self.layout.unpack(codec.decode(msg, device, expect=self.layout.expected()))
