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

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

from edfed.client.instructions import guard_for
from edfed.client.site import (
    check_site,
    evaluate_site,
    secagg_policy,
    secure_contribution,
    settings_from_configs,
    train_round,
)
from edfed.common.config import TrainConfig
from edfed.common.errors import EdfedError

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
    metrics = check_site(settings, config, expected_fingerprint=str(cfg.get("encoder-fingerprint", "")),
                         secure=cfg if bool(cfg.get("secure-aggregation", False)) else None)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "site": ConfigRecord({"site-name": settings.name})}), reply_to=msg)


def _refusing_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    return _refuse_cleanly(call_next)(msg, context)


def _signed_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """`_signed` as a mod: outside SecAgg+'s, so every stage of a secure round (its setup, key shares, masked
    vector and unmasking messages) is checked before SecAgg+ reads it, and every answer it gives is signed."""
    return _signed(call_next)(msg, context)


def _secure_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's SecAgg+ (secaggplus_mod) for the messages of a secure round; a plain train message passes by.

    At SecAgg+'s setup a deployed site checks, before it makes any key, that it accepts secure aggregation and
    that the protocol's threshold is at least its min-secagg-sites; the round itself is checked again, against its
    budget and max-epsilon-without-secagg, when its gradient is asked for (client.site.secure_round)."""
    if RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, context)
    setup = msg.content[RECORD_KEY_CONFIGS]
    if setup.get(Key.STAGE) == Stage.SETUP and "data-path" in context.node_config:
        policy = secagg_policy(dict(context.node_config))
        threshold = int(setup.get(Key.THRESHOLD, 0))
        if not policy:
            raise EdfedError("this site does not take part in secure aggregation (its node config has no "
                             "secure-aggregation=true); refusing the round")
        if threshold < policy["min_secagg_sites"]:
            raise EdfedError(f"SecAgg+'s threshold {threshold} is below this site's min-secagg-sites="
                             f"{policy['min_secagg_sites']}; refusing the round")
    return secaggplus_mod(msg, context, call_next)


def _secure_train(msg: Message, context: Context) -> Message:
    """A secure round's gradient (SecAgg+'s collect stage): Flower's legacy fit message in, a FitRes out, which
    secaggplus_mod quantises and masks before anything leaves."""
    cfg = dict(msg.content["fitins.config"])
    settings = settings_from_configs(dict(context.node_config), cfg)
    config = TrainConfig.from_message(json.loads(str(cfg["train-config"]))).replace(model=settings.model_path)
    names = json.loads(str(cfg["array-names"]))
    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(msg.content["fitins.parameters"], keep_input=True))
    if len(names) != len(arrays):
        raise EdfedError(f"the secure round names {len(names)} arrays and sends {len(arrays)}; refusing it")
    threshold = int(context.state.config_records[RECORD_KEY_STATE]["threshold"])
    contribution, units, metrics = secure_contribution(
        settings, config, {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)}, cfg,
        threshold)
    if set(contribution) != set(names):
        raise EdfedError("the secure round's arrays are not the GLM's; refusing it")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([contribution[n] for n in names]), units, metrics)
    return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@app.train(mods=[_refusing_mod, _signed_mod, _secure_mod])
def train(msg: Message, context: Context) -> Message:
    if "fitins.config" in msg.content:
        return _secure_train(msg, context)
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
