"""The tensor half of a Service (worker/service.py): ``put``, ``get``, ``delete``, ``search`` and ``describe``,
and the helpers that read a tensor out of a request's frames and write tensors into a reply.

A mixin of :class:`~planwire.worker.service.Service`: it works on the service's store and releaser, for the
client the request counts against (``self._client``).
"""

from __future__ import annotations

import numpy as np
from msgspec import UNSET

from planwire.transport import codec, framing
from planwire.transport import messages as m
from planwire.transport.framing import Frame
from planwire.worker.release import Pending


class TensorHandlers:
    """put, get, delete, search and describe, and the tensor helpers the run path shares."""

    def _put(self, msg: m.Put, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = [self._tensor(t.dtype, t.shape, t.frame, buffers, f"put tensor {t.key!r}") for t in msg.tensors]
        self.store.check_writable(self._client, (t.key for t in msg.tensors))
        self.store.check_quota(
            self._client, ((t.key, a.nbytes) for t, a in zip(msg.tensors, arrays, strict=True)), f"put #{msg.id}"
        )
        for t, arr in zip(msg.tensors, arrays, strict=True):
            self.store.put(self._client, t.key, arr, t.tags)
        return m.Ok(re=msg.id, session=self.session), []

    def _get(self, msg: m.Get, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = self.store.take(self._client, msg.keys, msg.keep, self._release)  # host values, one lookup each
        return self._tensors_reply(msg.id, msg.keys, arrays)

    def _delete(self, msg: m.Delete, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        self.store.delete(self._client, msg.keys)
        return m.Ok(re=msg.id, session=self.session), []

    def _search(self, msg: m.Search, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, e) for k, e in self.store.search(self._client, msg.tags)]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _describe(self, msg: m.Describe, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, self.store.entry(self._client, k)) for k in msg.keys]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _tensor(self, dtype: str, shape: list[int], index: int, buffers: list[memoryview], what: str) -> np.ndarray:
        return codec.from_frame(dtype, shape, framing.frame_at(buffers, index, what), what=what)

    def _tensors_reply(self, rid: int, keys: list[str], arrays: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        out, frames = [], []
        for key, arr in zip(keys, arrays, strict=True):
            wire, shape, buf = codec.to_frame(arr)
            out.append(m.KeyedTensor(key=key, dtype=wire, shape=shape, frame=len(frames)))
            frames.append(buf)
        return m.Tensors(re=rid, session=self.session, tensors=out), frames

    @staticmethod
    def _info(key: str, entry) -> m.TensorInfo:
        return m.TensorInfo(
            key=key,
            dtype=codec.dtypes.to_wire(entry.array.dtype),
            shape=list(entry.array.shape),
            tags=list(entry.tags),
            private=entry.private,
            owner="worker" if entry.worker else "client",
            release=entry.pending.how.how if isinstance(entry.pending, Pending) else UNSET,
        )
