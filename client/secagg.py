"""Secure aggregation at the hospital: Flower's SecAgg+ client mod around the training
handler.

The server's SecAgg+ workflow (``fedtwin.server.secagg``) runs four message exchanges per
round. Three are key agreement and unmasking, answered by Flower's ``secaggplus_mod``
alone; in the third the mod calls the training handler, masks the weights it returns and
sends only the masked integers, so the server never sees this hospital's update. The
workflow speaks Flower's legacy fit messages (FitIns/FitRes); ``legacy_fit`` translates
them to and from the records the training handler reads and writes (``fedtwin.messages``).

Before its weights are masked, the hospital checks them itself (``fedtwin.checks``): the
server cannot, as it sees only the sum. An update that fails is not sent, and the round
goes on without this hospital as if it had dropped out.
"""

from __future__ import annotations

import json
import logging
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedtwin.checks import secagg_clip_problem, update_problem
from fedtwin.server import messages

NAMES = "array-names"  # fit config: the model's array names (JSON), in the parameters' order
MAX_NORM = "max-update-norm"  # fit config: the federation's bound on an update's L2 norm
CLIP = "clipping-range"  # fit config: SecAgg+ clips weights x examples / MAX_WEIGHT to +- this
MAX_WEIGHT = "max-weight"  # fit config: SecAgg+'s max_weight (federation.secagg.max_examples)


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Client mod: SecAgg+ training messages go through Flower's ``secaggplus_mod`` with
    the training handler behind ``legacy_fit``; every other message passes unchanged."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)
    # secaggplus_mod logs every protocol step at DEBUG, and Ray's simulation workers hand
    # flwr's records on to a root handler that prints them all; FLWR_LOG_LEVEL=DEBUG keeps them
    if "FLWR_LOG_LEVEL" not in os.environ and FLOWER_LOGGER.level < logging.INFO:
        FLOWER_LOGGER.setLevel(logging.INFO)
    return secaggplus_mod(msg, context, lambda m, c: legacy_fit(m, c, call_next))


def legacy_fit(msg: Message, context: Context, call_next) -> Message:
    """Run the training handler (``call_next``) on a legacy FitIns message and give its
    reply as a FitRes, after the hospital's own check of its update."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = [str(n) for n in json.loads(str(config.pop(NAMES)))]
    max_norm, clip = float(config.pop(MAX_NORM)), float(config.pop(CLIP))
    max_weight = float(config.pop(MAX_WEIGHT))
    sent = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    msg.content = RecordDict(
        {messages.ARRAYS: messages.to_record(sent), messages.CONFIG: ConfigRecord(config)}
    )
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    content = reply.content
    name = str(content[messages.HOSPITAL]["name"])
    weights = messages.from_record(content[messages.ARRAYS])
    metrics = dict(content[messages.METRICS])
    scale = int(metrics["num-examples"]) / max_weight
    problem = update_problem(weights, sent, max_norm) or secagg_clip_problem(weights, clip, scale)
    if problem:
        raise ValueError(f"{name}: own update failed its check and was not sent: {problem}")
    fitres = FitRes(
        status=Status(Code.OK, "OK"),
        parameters=ndarrays_to_parameters([weights[n] for n in names]),
        num_examples=int(metrics["num-examples"]),
        # legacy metrics hold scalars only: the round metrics travel as one JSON text
        metrics={"hospital": name, "round-metrics": json.dumps(metrics)},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
