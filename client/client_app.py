"""storefed ClientApp: one market. Trains on its own data and device, keeps its heads private
(in ``context.state`` and on disk: ``client/node.py``), and replies with the encoder update and
metrics only (under SecAgg+, a masked vector: ``client/secagg.py``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from storefed.client.node import MetricDict, market_policy, open_node, train_reply
from storefed.client.secagg import Identity, SecAggRefusedError, handle_secagg, piggyback
from storefed.shared.policy import PolicyRefusedError
from storefed.shared.ranker import write_node_ranker
from storefed.shared.report import VALID_METRICS, flatten_eval
from storefed.shared.secagg import RECORD
from storefed.shared.serving_state import write_node_serving

log = logging.getLogger("storefed")


def make_app(overrides: Mapping[str, Any] | None = None,
             mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's run config with ``overrides`` on top.

    ``train.secagg`` messages (SecAgg+, ``client/secagg.py``) are served by the same app, so a
    node needs no different setup when the server runs with ``secagg = true``. ``mods`` wrap
    every handler (Flower client mods)."""
    app = ClientApp(mods=mods)
    fixed = dict(overrides or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, fixed)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, market, policy, market_dir = market_policy(context, fixed)
        node, global_encoder = open_node(msg, context, fixed)
        summary = node.evaluate(global_encoder, "test")
        if context.node_config.get("ranker") in (True, "true"):  # the market's own choice
            write_node_ranker(node)  # before the serving file: the service finds both
        # the market's service (client/serve.py) picks up exactly the model just evaluated
        rnd = msg.content.config_records.get("config", ConfigRecord()).get("server-round", 0)
        write_node_serving(node, int(cast(int, rnd)))
        content = RecordDict()
        if policy.share_evaluation:
            flat = flatten_eval(summary)
            flat["num-examples"] = flat["examples"]
            valid = node.evaluate(None, "valid")  # for choosing rounds without the test split
            flat.update({f"valid/{k}": float(cast(float, valid[k])) for k in VALID_METRICS})
            content["metrics"] = MetricRecord(cast(MetricDict, flat))
            content["info"] = ConfigRecord({"market": node.market})
        if RECORD in msg.content.config_records:  # SecAgg+: the next round's masked upload
            try:  # a refusal (budget spent, bad request) still sends the evaluation
                for key, record in piggyback(msg, context, fixed, policy,
                                             Identity.of(market, policy, market_dir)).items():
                    content[key] = record
            except (PolicyRefusedError, SecAggRefusedError) as exc:
                log.warning("market %s: no masked upload with this evaluation: %s", market, exc)
        return Message(content, reply_to=msg)

    @app.train("secagg")
    def train_secagg(msg: Message, context: Context) -> Message:
        _, market, policy, market_dir = market_policy(context, fixed)
        return handle_secagg(msg, context, fixed, policy,
                             Identity.of(market, policy, market_dir))

    return app


app = make_app()
