"""A node's plan cache and policy: a plan arrives once, is checked once, and is kept by fingerprint.

The bytes are kept in ``context.state`` (a RecordDict the SuperNode keeps per run, across rounds and
across ClientApp processes), so later messages carry only the fingerprint. Sessions are also kept in
this process, for the simulation engine's long-lived workers.

The data owner's policy comes from the node's config (``flower-supernode --node-config``):

* ``planwire-allowed-plans``: sha256 fingerprints (space or comma separated) of the only plans this node
  runs; empty runs any plan that passes the checks below.
* ``planwire-max-plan-mb``: the largest plan accepted (default 512, as ``plan-worker --max-plan-mb``).

Every plan also passes plan-worker's own checker (``planwire.transport.plancheck.check_model``: no external
data, standard op domains only, bounded size and node count) before onnxruntime sees it.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, RecordDict

from planwire.flower.ports import PlanPorts, fingerprint
from planwire.flower.server import BYTES_KEY, PLAN_RECORD, SHA_KEY
from planwire.transport.plancheck import check_model

STATE_KEY = "planwire.plan"  # context.state ConfigRecord: {"plan-sha256": hex, "plan-onnx": bytes}
_SHA = re.compile(r"[0-9a-f]{64}")


class PlanRefused(RuntimeError):
    """This node will not (or cannot) run the plan a message names; the reason says which and why."""


@dataclass(frozen=True)
class NodePolicy:
    """What the data owner allows, from the node config."""

    allowed: frozenset[str] = frozenset()
    max_bytes: int = 512 << 20

    @classmethod
    def from_node_config(cls, config: dict) -> NodePolicy:
        raw = str(config.get("planwire-allowed-plans", "") or "")
        allowed = frozenset(s for s in re.split(r"[\s,]+", raw.lower()) if s)
        bad = [s for s in allowed if not _SHA.fullmatch(s)]
        if bad:
            raise PlanRefused(f"node config planwire-allowed-plans: {bad[0]!r} is not a sha256 fingerprint (64 hex)")
        mb = config.get("planwire-max-plan-mb", 512)
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise PlanRefused(f"node config planwire-max-plan-mb must be a positive integer, got {mb!r}")
        return cls(allowed, mb << 20)


def plan_for(content: RecordDict, context: Context) -> tuple[bytes, PlanPorts]:
    """The checked plan a message names: from its bytes (first time) or this node's cache."""
    record = content.get(PLAN_RECORD)
    if not isinstance(record, ConfigRecord) or not isinstance(record.get(SHA_KEY), str):
        raise PlanRefused(f"message has no {PLAN_RECORD!r} ConfigRecord with {SHA_KEY!r}: use planwire's PlanStrategy")
    sha = record[SHA_KEY]
    policy = NodePolicy.from_node_config(dict(context.node_config))
    if policy.allowed and sha not in policy.allowed:
        raise PlanRefused(f"plan {sha[:12]} is not in this node's planwire-allowed-plans")
    data = record.get(BYTES_KEY)
    if data is not None and not (isinstance(data, bytes) and hmac.compare_digest(fingerprint(data), sha)):
        raise PlanRefused(f"plan bytes do not match their fingerprint {sha[:12]}")
    hit = _cached.get(sha)
    if hit is not None:  # checked in this process already (the simulation's workers serve many nodes)
        if len(hit[0]) > policy.max_bytes:  # this node's limit may be lower than the one it was checked under
            check_model(hit[0], max_bytes=policy.max_bytes)  # raises PlanRejected, worded as plan-worker's
        _keep(context, sha, hit[0])
        return hit
    if data is None:
        kept = context.state.get(STATE_KEY)
        if isinstance(kept, ConfigRecord) and kept.get(SHA_KEY) == sha and isinstance(kept.get(BYTES_KEY), bytes):
            data = kept[BYTES_KEY]
            if not hmac.compare_digest(fingerprint(data), sha):
                raise PlanRefused(f"this node's cached plan {sha[:12]} is corrupt; the server will send it again")
    if data is None:
        raise PlanRefused(f"plan {sha[:12]} is not cached on this node and the message does not carry it")
    ports = PlanPorts.check(data, max_bytes=policy.max_bytes)  # PlanRejected names what is unsafe
    _keep(context, sha, data)
    _cached.clear()  # one plan per process: a new plan replaces the old one
    _cached[sha] = (data, ports)
    return data, ports


def _keep(context: Context, sha: str, data: bytes) -> None:
    kept = context.state.get(STATE_KEY)
    if not (isinstance(kept, ConfigRecord) and kept.get(SHA_KEY) == sha):
        context.state[STATE_KEY] = ConfigRecord({SHA_KEY: sha, BYTES_KEY: data})  # the latest plan only


_cached: dict[str, tuple[bytes, PlanPorts]] = {}
