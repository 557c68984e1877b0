"""Layers in training mode: what a plan built from them computes, said once at build.

A plan computes what eager torch computes for one call, in the mode its layers are in. In training mode
that means BatchNorm normalizes with each call's batch statistics (:mod:`planwire.exporter.translations`)
and Dropout draws a fresh random mask per call, but a plan never writes anything back: the running
statistics that eager torch would update (``running_mean``, ``running_var``, ``num_batches_tracked``)
stay as they were on the worker and in the user's module. :func:`training_mode_warning` says so, naming
the layers, because the usual intent is inference (``model.eval()``) or training (``training_plan``).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from planwire.exporter.reach import Reach
from planwire.exporter.torch_compat import EXPORT_LOCK


def training_layers(modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every BatchNorm that tracks running statistics and every Dropout with
    ``p > 0`` that is in training mode, in ``named_modules`` order, each once.

    Read under :data:`EXPORT_LOCK`, the lock :func:`exportable` switches flags under: another thread's
    export never shows its switched-off BatchNorm layers here."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    with EXPORT_LOCK:
        _collect(modules, found, seen)
    return found


def _collect(modules: Iterable[tuple[str, nn.Module]], found: list[tuple[str, nn.Module]], seen: set[int]) -> None:
    for prefix, module in modules:
        for name, layer in module.named_modules(prefix=prefix):
            if id(layer) in seen or not layer.training:
                continue
            seen.add(id(layer))
            batch_norm = isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
            dropout = isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0
            if batch_norm or dropout:
                found.append((name or type(layer).__name__, layer))


def modules_used(function: Callable[..., Any]) -> list[tuple[str, nn.Module]]:
    """The torch modules a function plan's code can reach (exporter/reach.py: its closure, globals, defaults,
    helpers, containers and plain objects' attributes), each once, named by how the code reaches it."""
    if not isinstance(function, types.FunctionType):
        return []
    return _modules(Reach().function(function))


def reachable_modules(holder: nn.Module, *methods: Callable[..., Any]) -> list[tuple[str, nn.Module]]:
    """Modules a class plan reaches outside its registered submodules: held in containers or plain objects
    among its submodules' attributes (``self.models = [net]``) or named by ``methods``' code (globals, helpers)."""
    reach = Reach({id(m) for m in holder.modules()})
    out: list[tuple[str, nn.Module]] = []
    for prefix, module in holder.named_modules():
        for key, value in vars(module).items():
            if not key.startswith("_"):
                out += _modules(reach.value(f"{prefix}.{key}" if prefix else key, value))
    for method in methods:
        fn = getattr(method, "__func__", method)
        if isinstance(fn, types.FunctionType):
            out += _modules(reach.function(fn))
    return out


def _modules(found: Iterable[tuple[str, Any]]) -> list[tuple[str, nn.Module]]:
    return [(name, value) for name, value in found if isinstance(value, nn.Module)]


def training_mode_warning(plan: str, layers: list[tuple[str, nn.Module]], *, random: bool = False) -> str | None:
    """The build's one warning about ``layers`` (from :func:`training_layers`), or about a graph that
    draws random numbers (``random``) no Dropout layer there explains; None when there is nothing to say."""
    kinds = {type(layer) for _, layer in layers}
    dropout = any(issubclass(k, nn.modules.dropout._DropoutNd) for k in kinds)
    if not layers:
        if not random:
            return None
        return (
            f"plan {plan!r} draws random numbers (F.dropout, whose training argument defaults to True, or a "
            "random op): every call gives different values, as eager torch does, and the build checked only "
            "the shapes and types of its outputs. For inference pass training=False to F.dropout."
        )
    names = ", ".join(f"{name!r} ({type(layer).__name__})" for name, layer in layers)
    effects = []
    if any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds):
        effects.append(
            "BatchNorm normalizes with each call's batch statistics but does not update running_mean/"
            "running_var (plans are stateless: neither the worker nor this module keeps them), and with one "
            "value per channel (a batch of 1 on (1, C)), where eager torch raises, it returns the bias"
        )
    if dropout:
        effects.append("Dropout zeroes a fresh random selection on every call")
    return (
        f"plan {plan!r} is built with layers in training mode: {names}. It computes what they compute in "
        f"training mode: {'; '.join(effects)}. For inference call .eval() on the model before building; to "
        "train on a worker use planwire.training_plan."
    )


class _ExportView:
    """``track_running_stats`` of BatchNorm layers, installed on ``_BatchNorm`` while :func:`exportable` runs:
    the exporting thread reads it off for the layers switched; any other thread, and any other layer, reads
    and writes the layer's own value (in its ``__dict__``, untouched)."""

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.off: set[int] = set()

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        if id(layer) in self.off and (torch.compiler.is_compiling() or threading.get_ident() == self.thread):
            return False  # (torch.export's strict mode traces this: being traced, it is the export's thread)
        return layer.__dict__["track_running_stats"]

    def __set__(self, layer: Any, value: bool) -> None:
        layer.__dict__["track_running_stats"] = value


@contextmanager
def exportable(modules: Iterable[tuple[str, nn.Module]]) -> Iterator[None]:
    """Within this block, BatchNorm layers in training mode track no running statistics, as this thread sees
    them: another thread running the same layers eagerly meanwhile still sees them track and update theirs
    (not one tracing them with torch.compile, which sees them off, nor layers of a subclass that defines
    ``track_running_stats`` itself: those are switched in place, as every thread sees).

    Their output is the same (training mode normalizes with the batch's statistics either way), but their
    forward then neither updates ``running_mean``/``running_var``/``num_batches_tracked`` nor reads
    ``num_batches_tracked`` for ``momentum=None``: a plan drops those updates anyway, torch.export cannot
    capture ``1 / float(num_batches_tracked)``, and a module that a function plan reads (its buffers
    become constants of the graph) cannot be exported mutating them at all.

    The layers are not changed: for the block, ``_BatchNorm.track_running_stats`` is a descriptor
    (:class:`_ExportView`) that answers this thread alone. The block holds :data:`EXPORT_LOCK` (re-entrant;
    the export inside takes it too): one export at a time installs it; a nested block adds its layers.
    """
    cls = nn.modules.batchnorm._BatchNorm
    with EXPORT_LOCK:
        view = cls.__dict__.get("track_running_stats")
        installed = not isinstance(view, _ExportView)
        if installed:
            view = _ExportView(threading.get_ident())
        assert isinstance(view, _ExportView)
        layers = [layer for _, layer in training_layers(modules) if isinstance(layer, cls)]
        # a subclass that defines track_running_stats itself hides the view: its layers are switched in place
        switched = [layer for layer in layers if _shadows(type(layer), cls)]
        added = {id(layer) for layer in layers} - view.off - {id(layer) for layer in switched}
        kept = [(layer, layer.__dict__.get("track_running_stats", _ABSENT)) for layer in switched]
        view.off |= added
        if installed:
            cls.track_running_stats = view  # type: ignore[attr-defined]
        try:
            for layer in switched:
                layer.__dict__["track_running_stats"] = False
            yield
        finally:
            for layer, old in kept:
                if old is _ABSENT:
                    layer.__dict__.pop("track_running_stats", None)
                else:
                    layer.__dict__["track_running_stats"] = old
            view.off -= added
            if installed:
                del cls.track_running_stats  # type: ignore[attr-defined]


_ABSENT = object()


def _shadows(layer_type: type, base: type) -> bool:
    """Whether a class between ``layer_type`` and ``base`` defines ``track_running_stats`` (hiding base's view)."""
    mro = layer_type.__mro__
    return any("track_running_stats" in vars(k) for k in mro[: mro.index(base)])
