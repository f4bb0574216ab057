"""Publish one qty.adjust request with pika and wait for its reply.

    python3 pika_publish.py ITEM_ID DELTA [MESSAGE_ID]

Reads AMQP_URL (the first URL of a list) and QTY_EXCHANGE. Prints the reply and
exits 0 when it is applied, 3 when not_found, 4 when rejected, like
`qty-worker adjust`.
"""
import json
import os
import sys
import uuid

import pika

item_id, delta = sys.argv[1], int(sys.argv[2])
message_id = sys.argv[3] if len(sys.argv) > 3 else str(uuid.uuid4())
url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f").split(",")[0]
exchange = os.environ.get("QTY_EXCHANGE", "inventory")

connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.confirm_delivery()
# A private queue for the reply, gone with the connection.
reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue

channel.basic_publish(
    exchange=exchange,
    routing_key="qty.adjust",
    body=json.dumps({"item_id": item_id, "delta": delta}),
    properties=pika.BasicProperties(
        message_id=message_id,  # the idempotency key: reuse it to retry safely
        reply_to=reply_queue,
        correlation_id=message_id,
        content_type="application/json",
        delivery_mode=2,
        # The item again, as a header: partitioned workers route by it, so that
        # one item's requests keep their order across a fleet.
        headers={"item_id": item_id},
    ),
    mandatory=True,
)

for method, properties, body in channel.consume(reply_queue, auto_ack=True, inactivity_timeout=30):
    if method is None:
        sys.exit("no reply within 30 s")
    if properties.correlation_id == message_id:
        reply = json.loads(body)
        print(json.dumps(reply))
        connection.close()
        sys.exit({"applied": 0, "not_found": 3}.get(reply["outcome"], 4))
