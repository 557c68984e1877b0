"""Resources a plan fixes before it runs, bounded: tensor sizes, constant-driven op outputs, loop trips,
and the node count once local functions are inlined (the :class:`PlanTooLarge` rules of :mod:`.plancheck`).

Sizes are known up front for declared dims, densified sparse tensors, and the outputs of
``ConstantOfShape``, ``Expand``, ``Tile``, ``Range`` and ``Resize`` whose size inputs are initializers or
``Constant``s; what depends on the data (a shape read from an input) is left to containment.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from planwire.transport.onnxproto import ELEM_BITS, TENSOR, Buffer, Fields, Reader, itemsize

# Standard ops whose output size constants can decide (checked against max_tensor_bytes), and Loop.
SIZED_OPS = frozenset({"Constant", "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Loop"})
SMALL = 64
"""Most elements of a constant whose values are read (shapes, repeats, scalars)."""
PACKED = {1: "<f", 6: "<i", 7: "<q", 11: "<d", 10: "<e", 12: "<I", 13: "<Q", 2: "<B", 3: "<b", 4: "<H", 5: "<h"}


@dataclass
class Const:
    """A tensor the plan fixes before it runs (initializer or Constant): its type, dims, and values when
    small enough to matter."""

    dtype: int
    dims: list[int]
    values: list[float] | None


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


class SizeRules(Reader):
    """The size rules of one walk: constants of the scope being walked (by value name) and the limits."""

    def __init__(self, buf: Buffer, max_tensor_bytes: int, max_function_depth: int, max_loop_trips: int) -> None:
        super().__init__(buf)
        self.max_tensor_bytes = max_tensor_bytes
        self.max_function_depth = max_function_depth
        self.max_loop_trips = max_loop_trips
        self.max_nodes = 0
        self.consts: dict[str, Const] = {}  # small constants of the scope being walked, by value name

    def bound(self, dims: Sequence[float], itemsize: float, what: str) -> None:
        """plan_too_large when a tensor of ``dims`` would pass max_tensor_bytes."""
        limit = self.max_tensor_bytes
        count = 1.0
        for d in dims:
            count *= max(d, 0)
        if count * itemsize > limit:
            shown = [int(d) if math.isfinite(d) else d for d in dims][:8]
            raise self.too_large(
                f"{what} would make a tensor of {count:.3g} elements (shape {shown}"
                f"{'...' if len(dims) > 8 else ''}), more than {human_size(limit)}, the worker's limit per tensor"
            )

    def constant(self, f: Fields, name: bytes | None = None) -> None:
        """Remember a small or sized constant tensor (fields of a TensorProto) under its value name."""
        key = self.raw(f[8][-1]) if name is None and f.get(8) else name
        if not key:
            return
        dims = self.ints(f.get(1, []), "constant dims")
        types = f.get(2)
        dtype = types[-1] if types else 1
        count = 1
        for d in dims:
            count *= max(d, 0)
        values = self.values(f, dtype, count) if count <= SMALL else None
        self.consts[key] = Const(dtype, dims, values)

    def values(self, f: Fields, dtype: int, count: int) -> list[float] | None:
        """Values of a small tensor from raw_data or its typed field; None when unreadable."""
        raw = f.get(9)
        if raw:
            fmt = PACKED.get(dtype)
            s, e = raw[-1]
            if fmt is None or (e - s) != count * struct.calcsize(fmt):
                return None
            return [v for (v,) in struct.iter_unpack(fmt, bytes(self.buf[s:e]))]
        if dtype in (6, 7, 2, 3, 4, 5, 9) and f.get(5 if dtype != 7 else 7):  # int32_data holds small ints
            out = self.ints(f[5 if dtype != 7 else 7], "constant values", most=SMALL)
            return [float(v) for v in out] if len(out) == count else None
        packed = {1: (4, "<f"), 11: (10, "<d")}.get(dtype)
        if packed and f.get(packed[0]):
            spans = [x for x in f[packed[0]] if isinstance(x, tuple)]
            data = b"".join(bytes(self.buf[a:b]) for a, b in spans[:SMALL])
            if len(data) != count * struct.calcsize(packed[1]):
                return None
            return [v for (v,) in struct.iter_unpack(packed[1], data)]
        return [] if count == 0 else None

    def sized(self, op: str, desc: str, ins: list[bytes], outs: list[bytes], attrs: dict[str, Fields]) -> None:
        """Refuse a standard op whose constant inputs make its output (or trip count) too large."""
        consts = self.consts

        def const(i: int) -> Const | None:
            return consts.get(ins[i]) if i < len(ins) and ins[i] else None

        def vals(i: int) -> list[float] | None:
            c = const(i)
            return c.values if c is not None else None

        if op == "Constant":
            a = attrs.get("value")
            if a and a.get(5) and outs:
                s = a[5][-1]
                self.constant(self.scan(s, 0, TENSOR), outs[0])
            elif outs and (a := attrs.get("value_ints") or attrs.get("value_int")):
                key = 8 if "value_ints" in attrs else 3
                v = [float(x) for x in self.ints(a.get(key, []), "value_ints", most=SMALL)]
                consts[outs[0]] = Const(7, [len(v)] if key == 8 else [], v)
            return
        if op == "ConstantOfShape":
            shape = vals(0)
            a = attrs.get("value")
            size = itemsize(self.scan(a[5][-1], 0, TENSOR)) if a and a.get(5) else 4
            if shape is not None:
                self.bound(shape, size, desc)
        elif op == "Expand":
            shape, x = vals(1), const(0)
            if shape is not None:
                self.bound(shape, ELEM_BITS.get(x.dtype, 8) / 8 if x else 1, desc)
        elif op == "Tile":
            reps, x = vals(1), const(0)
            if reps is not None:
                base = x.dims if x else []
                self.bound([*base, *reps], ELEM_BITS.get(x.dtype, 8) / 8 if x else 1, desc)
        elif op == "Range":
            start, limit, delta = vals(0), vals(1), vals(2)
            if start and limit and delta and delta[0]:
                span = (limit[0] - start[0]) / delta[0]
                n = math.ceil(span) if math.isfinite(span) else math.inf
                c = const(0)
                self.bound([n], ELEM_BITS.get(c.dtype if c else 7, 64) / 8, desc)
        elif op == "Resize":
            x = const(0)
            sizes, scales = vals(3), vals(2)
            size = ELEM_BITS.get(x.dtype, 8) / 8 if x else 1
            if sizes:
                self.bound(sizes, size, desc)
            elif scales:
                base = x.dims if x and len(x.dims) == len(scales) else [1] * len(scales)
                out = [math.floor(d * c) if math.isfinite(c) else math.inf for d, c in zip(base, scales, strict=True)]
                self.bound(out, size, desc)
        elif op == "Loop":
            trips = vals(0) if ins and ins[0] else None
            cond = vals(1) if len(ins) > 1 and ins[1] else None
            has_cond = len(ins) > 1 and bool(ins[1])
            if not (ins and ins[0]) and not has_cond:
                raise self.too_large(f"{desc} has neither a trip count nor a condition: it never ends")
            always = not has_cond or (cond is not None and len(cond) == 1 and cond[0] != 0)
            if trips and always and trips[0] > self.max_loop_trips:
                raise self.too_large(
                    f"{desc} runs {int(trips[0])} times, more than the worker's limit of {self.max_loop_trips} "
                    "loop trips"
                )

    def expand(
        self, nodes: int, calls: list[int], fn_nodes: list[int], fn_calls: list[list[int]], names: list[str]
    ) -> int:
        """Node count after inlining; rejects recursion and expansion past ``max_nodes``."""
        cap = self.max_nodes + 1
        pending = [len(set(c)) for c in fn_calls]
        callers: list[list[int]] = [[] for _ in fn_calls]
        for i, c in enumerate(fn_calls):
            for j in set(c):
                callers[j].append(i)
        cost = [0] * len(fn_calls)
        depth = [0] * len(fn_calls)  # levels of functions inside one call, itself included
        ready = [i for i, p in enumerate(pending) if p == 0]
        done = 0
        while ready:  # leaves first (Kahn's algorithm on the call graph)
            i = ready.pop()
            done += 1
            cost[i] = min(cap, fn_nodes[i] - len(fn_calls[i]) + sum(cost[j] for j in fn_calls[i]))
            depth[i] = 1 + max((depth[j] for j in fn_calls[i]), default=0)
            if depth[i] > self.max_function_depth:
                raise self.too_large(
                    f"local function {names[i]!r} nests {depth[i]} levels of function calls, more than the "
                    f"worker's limit of {self.max_function_depth}"
                )
            for k in callers[i]:
                pending[k] -= 1
                if pending[k] == 0:
                    ready.append(k)
        if done < len(fn_calls):
            stuck = ", ".join(repr(names[i]) for i, p in enumerate(pending) if p)
            raise self.reject(f"local functions call themselves recursively: {stuck}")
        total = nodes - len(calls) + sum(cost[j] for j in calls)  # a call is replaced by its body
        if total > self.max_nodes:
            raise self.too_large(f"plan expands to more than {self.max_nodes} nodes once local functions are inlined")
        return total
