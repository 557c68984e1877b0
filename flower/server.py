"""Server side: any Flower strategy, with a training plan shipped to each node once.

:class:`PlanStrategy` wraps a Flower strategy (FedAvg, FedProx, FedAdam, Krum, ...) by composition: the
wrapped strategy samples nodes, builds its messages and aggregates exactly as it does for PyTorch clients.
The wrapper only adds a ``planwire`` ConfigRecord naming the plan by fingerprint, with the plan's bytes for
nodes that do not hold it yet, and drops replies that do not fit the plan before aggregation.

Which nodes hold the plan: a node that answered without error holds it (the ClientApp caches it in
``context.state``, which its SuperNode keeps for the run). A node that answers with an error (e.g. its
SuperNode restarted and lost the cache) is sent the bytes again next time, but at most ``max_deliveries``
times in a row per plan (keyed by node and fingerprint) until it answers without error: a node that keeps
failing (refuses the plan, crashes) then gets messages naming the plan only, not megabytes every round. So
the bytes cross the network once per node, not once per round, and no extra round trip is needed to ask.

Replies are screened before the wrapped strategy sees them. Flower's strategies skip a whole round's
aggregation when replies disagree (other record names, other metric keys, a list where others have a
number), so one hostile node could stop every round: a reply is kept only if its records are named as
the plan's ClientApp names them and its MetricRecord holds exactly the plan's loss and metrics, the weight
key (``num-examples``) and any ``extra_metrics`` the server declares, each a finite number. Others are left
out with a log line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from planwire.flower.ports import PlanPorts, fingerprint
from planwire.flower.records import arrays_to_state

PLAN_RECORD = "planwire"  # ConfigRecord key in messages: {"plan-sha256": hex, "plan-onnx": bytes (first time)}
SHA_KEY, BYTES_KEY = "plan-sha256", "plan-onnx"
ARRAYS, METRICS = "arrays", "metrics"  # record names in replies (Flower's convention; the ClientApps use them)
MAX_DELIVERIES = 3
MAX_EXAMPLES = 1_000_000  # examples one reply may claim (its weight), by default


class PlanStrategy(Strategy):
    """``strategy`` with ``plan`` (a planwire training plan's ONNX bytes) as the clients' training code.

    ``extra_metrics``: metric keys the clients add beside the plan's own (e.g. a wrapped ClientApp that
    reports its memory); every reply must carry the same keys. ``max_deliveries``: how many times in a row
    the plan's bytes are sent to a node that has not answered without error. ``max_examples``: the most
    examples one reply may claim (its weight in the average: a whole number from 1 to this); a node that
    claims more is left out, so that one node cannot outweigh the others by its word alone. What it sends
    is still trusted within that weight: robust strategies (Krum, trimmed mean) bound a hostile node's arrays."""

    def __init__(
        self,
        strategy: Strategy,
        plan: bytes,
        *,
        weighted_by_key: str = "num-examples",
        extra_metrics: Iterable[str] = (),
        max_deliveries: int = MAX_DELIVERIES,
        max_examples: int = MAX_EXAMPLES,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        if max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {max_examples}")
        self.max_examples = max_examples
        self.strategy = strategy
        self.plan = bytes(plan)
        self.ports = PlanPorts.check(self.plan)
        self.fingerprint = fingerprint(self.plan)
        self.weighted_by_key = weighted_by_key
        self.metric_keys = frozenset(self.ports.reported.values()) | {weighted_by_key} | frozenset(extra_metrics)
        self.max_deliveries = max_deliveries
        self.holders: set[int] = set()  # nodes known to hold the plan
        self.deliveries: dict[tuple[int, str], int] = {}  # (node, fingerprint) -> bytes sent since it last succeeded
        self.given_up: set[int] = set()  # nodes no longer sent the bytes (max_deliveries failed in a row)
        self.plan_bytes_sent = 0
        self.left_out: list[tuple[int, str]] = []  # (node, why) of every reply screened out

    # -- Strategy -----------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._attach(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self._screen(replies, train=True))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._attach(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, self._screen(replies, train=False))

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> planwire plan %r (sha256 %s, %d bytes)",
            self.ports.name,
            self.fingerprint[:12],
            len(self.plan),
        )
        log(INFO, "\t└──> wrapped strategy: %s", type(self.strategy).__name__)
        self.strategy.summary()

    # -- plan delivery and reply screening -------------------------------------------------------------

    def _attach(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        fresh = 0
        for msg in messages:
            node = msg.metadata.dst_node_id
            record = ConfigRecord({SHA_KEY: self.fingerprint})
            if node not in self.holders and self._deliver(node):
                record[BYTES_KEY] = self.plan
                self.plan_bytes_sent += len(self.plan)
                fresh += 1
            content = RecordDict({**msg.content, PLAN_RECORD: record})
            out.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=msg.metadata.message_type,
                    group_id=msg.metadata.group_id,
                )
            )
        if fresh:
            log(
                INFO,
                "planwire: plan %s (%d bytes) sent to %d node(s) that lack it",
                self.fingerprint[:12],
                len(self.plan),
                fresh,
            )
        return out

    def _deliver(self, node: int) -> bool:
        """Whether this node's next message may carry the plan's bytes: not after ``max_deliveries`` in a
        row that it did not answer without error (said once in the log)."""
        key = (node, self.fingerprint)
        sent = self.deliveries.get(key, 0)
        if sent < self.max_deliveries:
            self.deliveries[key] = sent + 1
            return True
        if node not in self.given_up:
            self.given_up.add(node)
            log(
                WARNING,
                "planwire: node %d failed after plan %s was sent to it %d times; its messages now name the plan "
                "without its bytes (it gets them again once it answers without error)",
                node,
                self.fingerprint[:12],
                sent,
            )
        return False

    def _screen(self, replies: Iterable[Message], *, train: bool) -> list[Message]:
        """Replies that fit the plan; errors and misfits are logged and left out (a hostile or broken node
        must not stop the round, nor reach the aggregate)."""
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.holders.discard(node)  # maybe lost its cache: send the bytes again next time
                kept.append(msg)  # the wrapped strategy counts and logs failures itself
                continue
            self.holders.add(node)  # it ran the plan the message named
            self.deliveries.pop((node, self.fingerprint), None)
            self.given_up.discard(node)
            why = self._misfit(msg.content, train)
            if why:
                log(WARNING, "planwire: reply from node %d left out: %s", node, why)
                self.left_out.append((node, why))
                continue
            kept.append(msg)
        return kept

    def _misfit(self, content: RecordDict, train: bool) -> str | None:
        """Why this reply cannot be aggregated with the others, or None. Flower aggregates by the first
        reply's record names and metric keys: every reply must have the same ones."""
        metrics = content.metric_records
        if list(metrics) != [METRICS]:
            return f"expected one MetricRecord named {METRICS!r}, got {sorted(metrics)}"
        record = metrics[METRICS]
        if set(record) != self.metric_keys:
            missing, unexpected = sorted(self.metric_keys - set(record)), sorted(set(record) - self.metric_keys)
            return (
                f"metrics do not fit plan {self.ports.name!r}: missing {missing}, unexpected {unexpected} "
                "(every reply must carry the same keys)"
            )
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"metric {key!r} must be a finite number, got {value!r}"
        weight = record[self.weighted_by_key]
        if weight != int(weight) or not 1 <= weight <= self.max_examples:
            return f"{self.weighted_by_key!r} must be a whole number from 1 to {self.max_examples}, got {weight!r}"
        if not train:
            return None
        arrays = content.array_records
        if list(arrays) != [ARRAYS]:
            return f"expected one ArrayRecord named {ARRAYS!r}, got {sorted(arrays)}"
        try:
            arrays_to_state(self.ports, arrays[ARRAYS], what="reply arrays")
        except (ValueError, TypeError) as e:
            return str(e)
        return None


__all__ = ["ARRAYS", "BYTES_KEY", "MAX_DELIVERIES", "MAX_EXAMPLES", "METRICS", "PLAN_RECORD", "SHA_KEY", "PlanStrategy"]
