"""Publish one qty.adjust request with kombu (the library under Celery), through
its ordinary Producer.publish, and wait for its reply.

    python3 kombu_publish.py ITEM_ID DELTA [MESSAGE_ID]

kombu serializes the body to JSON itself and sets content_type
application/json and content_encoding utf-8, which the worker accepts. Reads
AMQP_URL (the first URL of a list) and QTY_EXCHANGE. Exits 0 when applied, 3
when not_found, 4 when rejected.
"""
import json
import os
import sys
import uuid

from kombu import Connection, Consumer, Exchange, Producer, Queue

item_id, delta = sys.argv[1], int(sys.argv[2])
message_id = sys.argv[3] if len(sys.argv) > 3 else str(uuid.uuid4())
url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f").split(",")[0]
# The worker declares the exchange; kombu must not declare it with other settings.
exchange = Exchange(os.environ.get("QTY_EXCHANGE", "inventory"), type="topic", durable=True, no_declare=True)
reply_queue = Queue(f"kombu-reply-{uuid.uuid4()}", exclusive=True, auto_delete=True)
replies = []

with Connection(url) as connection:
    with Consumer(connection, queues=[reply_queue], accept=["json"],
                  callbacks=[lambda body, message: replies.append(body)]):
        Producer(connection).publish(
            {"item_id": item_id, "delta": delta},
            exchange=exchange,
            routing_key="qty.adjust",
            serializer="json",
            delivery_mode=2,
            message_id=message_id,  # the idempotency key: reuse it to retry safely
            correlation_id=message_id,
            reply_to=reply_queue.name,
            # The item again, as a header: partitioned workers route by it.
            headers={"item_id": item_id},
        )
        while not replies:
            connection.drain_events(timeout=30)

reply = replies[0]
print(json.dumps(reply))
sys.exit({"applied": 0, "not_found": 3}.get(reply["outcome"], 4))
