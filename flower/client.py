"""Client side: a Flower ClientApp whose training code is the plan the server sends (no torch here).

The only user code is ``load_data(context)``: the node's own examples as numpy arrays (model inputs, then
targets). Everything else comes from the plan: the step, the optimizer, its default hyper-parameters.
Settings are read from the message's config, then the run config (Flower's conventions):

``batch-size`` (any size, not only the build's), ``local-epochs`` or ``local-steps`` (steps win when
> 0), hyper-parameters by name (``lr``, ``momentum``, ...), ``proximal-mu`` (FedProx), ``seed``.

A node whose config names ``planwire-worker`` forwards the plan to that plan-worker instead (see
:mod:`planwire.flower.bridge`): the same app serves both kinds of nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from planwire.flower.cache import plan_for
from planwire.flower.ports import PlanPorts, fingerprint
from planwire.flower.records import arrays_to_state, state_to_arrays
from planwire.flower.runner import Data, Outcome, PlanRunner

DataLoader = Callable[[Context], Data]
_runners: dict[str, PlanRunner] = {}


def settings(msg: Message, context: Context) -> dict[str, Any]:
    """The run config, overridden by the config record the strategy sent with this message."""
    merged: dict[str, Any] = dict(context.run_config)
    config = msg.content.get("config")
    if config is not None:
        merged.update(dict(config))
    return merged


def hyper_overrides(conf: Mapping[str, Any], ports: PlanPorts) -> dict[str, Any]:
    """The settings that name one of the plan's hyper-parameters (``lr`` for ``hyper.lr``), as given: a value
    that is no number, or that the input cannot hold, is refused by ``PlanPorts.hyper_feeds``, naming it."""
    return {k: conf[k] for k in ports.hyper_names if k in conf}


def reply(msg: Message, outcome: Outcome, arrays: Any | None = None) -> Message:
    """Flower's reply shape: one ArrayRecord (train only) and one MetricRecord with ``num-examples``."""
    metrics = MetricRecord({**outcome.metrics, "num-examples": outcome.num_examples})
    content = RecordDict({"metrics": metrics} if arrays is None else {"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _runner(plan: bytes, ports: PlanPorts) -> PlanRunner:
    sha = fingerprint(plan)
    runner = _runners.get(sha)
    if runner is None:
        _runners.clear()
        runner = _runners[sha] = PlanRunner(plan, ports)
    return runner


def config_int(conf: Mapping[str, Any], key: str, default: int) -> int:
    """A non-negative integer setting; ValueError naming the key otherwise."""
    value = conf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config {key!r} must be a non-negative integer, got {value!r}")
    return value


def shuffle_key(context: Context) -> int:
    """Which node this is, for its shuffling: its ``partition-id`` where its node config has one (the
    simulation engine sets it; node ids are drawn at random per run, so a run with the same seed would not
    replay its batches), else its node id."""
    partition = context.node_config.get("partition-id")
    if isinstance(partition, int) and not isinstance(partition, bool) and partition >= 0:
        return partition
    return int(context.node_id) & 0xFFFFFFFF


def round_rng(conf: Mapping[str, Any], context: Context) -> np.random.Generator:
    """This node's shuffling for this round: seeded by the run's ``seed``, the node (``shuffle_key``) and
    the round, so a run with the same seed and partitions draws the same batches in the same order."""
    seed = config_int(conf, "seed", 0)
    return np.random.default_rng([seed, shuffle_key(context), config_int(conf, "server-round", 0)])


def opened(msg: Message, context: Context) -> tuple[bytes, PlanPorts, dict[str, Any], dict[str, np.ndarray]]:
    """What every message starts with: the checked plan it names, the settings and the server's weights."""
    plan, ports = plan_for(msg.content, context)
    weights = arrays_to_state(ports, msg.content["arrays"], what="server arrays")
    return plan, ports, settings(msg, context), weights


def plan_client_app(load_data: DataLoader, load_eval_data: DataLoader | None = None) -> ClientApp:
    """A ClientApp that trains (and evaluates) with the plan its messages name, on ``load_data``'s arrays.
    ``load_eval_data`` gives the node's evaluation split (default: its training data). A node whose config
    names ``planwire-worker`` forwards both to that plan-worker (:mod:`planwire.flower.bridge`)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_config.get("planwire-worker"):
            from planwire.flower.bridge import bridge_train

            return bridge_train(msg, context)
        plan, ports, conf, weights = opened(msg, context)
        runner = _runner(plan, ports)
        outcome = runner.train(
            weights,
            load_data(context),
            batch_size=config_int(conf, "batch-size", 32),
            epochs=config_int(conf, "local-epochs", 1),
            steps=config_int(conf, "local-steps", 0),
            hyper=hyper_overrides(conf, ports),
            rng=round_rng(conf, context),
            proximal_mu=float(conf.get("proximal-mu", 0.0)),
        )
        return reply(msg, outcome, state_to_arrays(ports, outcome.state))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if context.node_config.get("planwire-worker"):
            from planwire.flower.bridge import bridge_evaluate

            return bridge_evaluate(msg, context)
        plan, ports, conf, weights = opened(msg, context)
        data = (load_eval_data or load_data)(context)
        outcome = _runner(plan, ports).evaluate(weights, data, batch_size=max(1, config_int(conf, "batch-size", 32)))
        return reply(msg, outcome)

    return app


__all__ = ["DataLoader", "config_int", "opened", "plan_client_app", "reply", "round_rng", "settings", "shuffle_key"]
