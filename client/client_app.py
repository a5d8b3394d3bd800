"""The Flower ClientApp: a few lines of wiring around `client.site` (what runs in a hospital).

A train reply holds the site's trainable arrays and a MetricRecord of scalars; an evaluate reply
only scalars; a check reply scalars and the site's configured name. No row, note, identifier or
cell value ever goes into a reply. When the site cannot take part (its table breaks the data
contract, its encoder differs, ...), it answers with an error whose reason is the off-site form of
edfed's message: files, columns, rules and row numbers, never values. The site's own log keeps the
full message for its staff.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from logging import ERROR

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from client.instructions import guard_for
from client.site import check_site, evaluate_site, settings_from_configs, train_round
from common.config import TrainConfig
from common.errors import EdfedError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a hospital's node reports nothing to Flower's telemetry

app = ClientApp()


def _refuse_cleanly(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except EdfedError as exc:
            log(ERROR, "edfed: this site does not take part: %s", exc)  # the site's own log, no traceback
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"edfed: {exc.offsite}"),
                           reply_to=msg)
    return guarded


def _signed(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run only the coordinator's signed, current, once-only instructions to this node (client.instructions),
    checked before the handler reads the arrays or the ledger; sign the reply with the site's key."""
    @functools.wraps(handler)
    def checked(msg: Message, context: Context) -> Message:
        guard = guard_for(dict(context.node_config))
        guard.accept(msg, context.node_id)
        return guard.sign(handler(msg, context), msg, context.node_id)
    return checked


def _site_and_config(msg: Message, context: Context):
    message_config = dict(msg.content["config"])
    settings = settings_from_configs(dict(context.node_config), message_config)
    config = TrainConfig.from_message(json.loads(message_config["train-config"]))
    # The encoder is the site's own copy (its model-path, else the packaged default), never a path the server
    # sends; the fingerprint check in train_round guards the match.
    config = config.replace(model=settings.model_path)
    return settings, config, message_config


@app.query("check")
@_refuse_cleanly
@_signed
def check(msg: Message, context: Context) -> Message:
    settings, config, cfg = _site_and_config(msg, context)
    metrics = check_site(settings, config, expected_fingerprint=str(cfg.get("encoder-fingerprint", "")))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "site": ConfigRecord({"site-name": settings.name})}), reply_to=msg)


@app.train()
@_refuse_cleanly
@_signed
def train(msg: Message, context: Context) -> Message:
    settings, config, cfg = _site_and_config(msg, context)
    state, metrics = train_round(
        settings, config, msg.content["arrays"].to_torch_state_dict(), run_id=str(cfg["run-id"]),
        server_round=int(cfg["server-round"]) + int(cfg.get("round-offset", 0)), num_rounds=int(cfg["num-rounds"]),
        local_epochs=int(cfg["local-epochs"]), proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        max_grad_norm=float(cfg["max-grad-norm"]), dp_clipping=str(cfg.get("dp-clipping", "per-layer")),
        expected_fingerprint=str(cfg.get("encoder-fingerprint", "")),
        expected_frozen=str(cfg.get("frozen-fingerprint", "")))
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if state is not None:
        content["arrays"] = ArrayRecord(state)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_refuse_cleanly
@_signed
def evaluate(msg: Message, context: Context) -> Message:
    settings, config, cfg = _site_and_config(msg, context)
    metrics = evaluate_site(settings, config, msg.content["arrays"].to_torch_state_dict(),
                            split=str(cfg.get("split", "val")), run_id=str(cfg.get("run-id", "")))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
