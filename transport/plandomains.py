"""Which operators a plan may name: the allowed op domains, the domains reserved for built-in operators, and
the plan's own local functions (the domain rules of :mod:`.plancheck`'s policy).

onnxruntime resolves a node to a built-in operator *before* it looks for a model-local function, so a local
function may live neither in an allowed domain nor in one that onnxruntime (or a known execution provider)
registers operators in: a "function" named ``com.microsoft::Gelu`` would really run the contrib kernel. A
node in a domain that is not allowed must call exactly a ``(domain, name, overload)`` the plan defines.
"""

from __future__ import annotations

from collections.abc import Callable

from planwire.transport.onnxproto import PlanRejected

DEFAULT_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx"})
"""The standard ONNX operator set only."""
ML_DOMAINS: frozenset[str] = DEFAULT_DOMAINS | {"ai.onnx.ml"}
"""Standard operators plus the classical-ML operator set (opt-in)."""

ONNX_ALIASES = frozenset({"", "ai.onnx"})
"""Two names of the standard domain: allowing one allows both."""
# Domains in which onnxruntime or a known execution provider registers operators (checked as prefixes).
_RESERVED_PREFIXES = ("ai.onnx", "onnx", "com.microsoft", "com.ms", "org.pytorch", "pkg.onnxruntime", "trt")


def reserved(domain: str) -> bool:
    """Whether built-in operators may live in ``domain`` (so a local function there would not be called)."""
    return domain == "" or domain.startswith(_RESERVED_PREFIXES)


def domain_list(domains: frozenset[str]) -> str:
    return ", ".join(repr(d) for d in sorted(domains)) or "(none)"


class Domains:
    """The domain rules of one plan: the domains its nodes and opset imports may name, and its local functions
    by ``(domain, name, overload)``. Refusals are made by ``reject``, the walk's, which says where it is."""

    def __init__(self, allowed: frozenset[str], reject: Callable[[str], PlanRejected]) -> None:
        self.shown = allowed  # as the worker was configured, for messages
        self.allowed = allowed | ONNX_ALIASES if allowed & ONNX_ALIASES else allowed
        self.reject = reject
        self.functions: dict[tuple[str, str, str], int] = {}  # -> its index, in the order defined
        self.function_domains: set[str] = set()

    def define(self, domain: str, name: str, overload: str) -> str:
        """Add a local function (they are all defined before any node is matched); returns its qualified name."""
        qual = f"{domain}::{name}" + (f" (overload '{overload}')" if overload else "")
        if domain in self.allowed or reserved(domain):
            raise self.reject(
                f"function '{qual}' uses domain '{domain}', which is reserved for built-in operators "
                "(onnxruntime would run a built-in op instead); local functions need their own domain"
            )
        if (domain, name, overload) in self.functions:
            raise self.reject(f"function '{qual}' is defined twice")
        self.functions[domain, name, overload] = len(self.functions)
        self.function_domains.add(domain)
        return qual

    def called(self, desc: str, domain: str, op: str, overload: str) -> int:
        """The local function a node of a domain that is not allowed calls (its index); refused otherwise."""
        called = self.functions.get((domain, op, overload))
        if called is None:
            if domain in self.function_domains:
                raise self.reject(f"{desc} calls '{domain}::{op}', which is not a function defined in the plan")
            raise self.reject(f"{desc} uses domain '{domain}' which is not allowed; allowed: {domain_list(self.shown)}")
        return called

    def opset(self, domain: str, where: str) -> None:
        """An ``opset_import`` may name an allowed domain or a local function's."""
        if domain not in self.allowed and domain not in self.function_domains:
            raise self.reject(f"{where} domain '{domain}' is not allowed; allowed: {domain_list(self.shown)}")
