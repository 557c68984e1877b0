"""Server side: any Flower strategy, with a training plan shipped to each node once.

:class:`PlanStrategy` wraps a Flower strategy (FedAvg, FedProx, FedAdam, Krum, ...) by composition: the
wrapped strategy samples nodes, builds its messages and aggregates exactly as it does for PyTorch clients.
The wrapper only adds a ``planwire`` ConfigRecord naming the plan by fingerprint, with the plan's bytes for
nodes that do not hold it yet, and drops replies that do not fit the plan before aggregation.

Which nodes hold the plan: a node that answered a message carrying the bytes without error holds it (the
ClientApp caches it in ``context.state``, which its SuperNode keeps for the run). A node that answers with
an error (e.g. its SuperNode restarted and lost the cache) is sent the bytes again next time. So the
bytes cross the network once per node, not once per round, and no extra round trip is needed to ask.
"""

from __future__ import annotations

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


class PlanStrategy(Strategy):
    """``strategy`` with ``plan`` (a planwire training plan's ONNX bytes) as the clients' training code."""

    def __init__(self, strategy: Strategy, plan: bytes, *, weighted_by_key: str = "num-examples") -> None:
        self.strategy = strategy
        self.plan = bytes(plan)
        self.ports = PlanPorts.check(self.plan)
        self.fingerprint = fingerprint(self.plan)
        self.weighted_by_key = weighted_by_key
        self.holders: set[int] = set()  # nodes known to hold the plan
        self._sent_bytes: set[int] = set()  # nodes sent the bytes in the messages now in flight
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
            if node not in self.holders:
                record[BYTES_KEY] = self.plan
                self._sent_bytes.add(node)
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
            if node in self._sent_bytes:
                self.holders.add(node)
            why = self._misfit(msg.content, train)
            if why:
                log(WARNING, "planwire: reply from node %d left out: %s", node, why)
                self.left_out.append((node, why))
                continue
            kept.append(msg)
        self._sent_bytes -= self.holders
        return kept

    def _misfit(self, content: RecordDict, train: bool) -> str | None:
        metrics = list(content.metric_records.values())
        if len(metrics) != 1:
            return f"expected one MetricRecord, got {len(metrics)}"
        weight = metrics[0].get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or not weight > 0:
            return f"{self.weighted_by_key!r} must be a positive number, got {weight!r}"
        if not train:
            return None
        arrays = list(content.array_records.values())
        if len(arrays) != 1:
            return f"expected one ArrayRecord, got {len(arrays)}"
        try:
            arrays_to_state(self.ports, arrays[0], what="reply arrays")
        except (ValueError, TypeError) as e:
            return str(e)
        return None


__all__ = ["BYTES_KEY", "PLAN_RECORD", "SHA_KEY", "PlanStrategy"]
