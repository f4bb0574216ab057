"""A plain Python worker, as the baseline a user would otherwise write: pika +
psycopg, prefetch 100, one transaction per message (ledger insert + guarded
update), reply published with a confirm, then ack. It does the same durable work
per message as qty-worker, but it is not a full implementation of the contract:
a duplicate gets a fresh "rejected" reply instead of the stored one, and a
missing item is "rejected" instead of "not_found". For throughput only.

    python3 bench/python_worker.py   # reads AMQP_URL, DATABASE_URL, QTY_QUEUE, QTY_EXCHANGE
"""
import json
import os
import uuid

import pika
import psycopg

amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
database_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/inventory")
queue = os.environ.get("QTY_QUEUE", "qty.adjust")
exchange = os.environ.get("QTY_EXCHANGE", "inventory")

db = psycopg.connect(database_url)
connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()
channel.basic_qos(prefetch_count=100)


def handle(ch, method, props, body):
    request = json.loads(body)
    item, delta = uuid.UUID(request["item_id"]), request["delta"]
    with db.transaction():
        inserted = db.execute(
            "insert into adjustments (message_id, item_id, delta, outcome, qty_after)"
            " values (%s, %s, %s, 'applied', 0) on conflict do nothing returning 1",
            (props.message_id, item, delta),
        ).fetchone()
        row = db.execute(
            "update items set qty = qty + %s where id = %s and qty + %s >= 0 returning qty",
            (delta, item, delta),
        ).fetchone() if inserted else None
        if inserted:
            db.execute("update adjustments set qty_after = %s, outcome = %s where message_id = %s",
                       (row[0] if row else None, "applied" if row else "rejected", props.message_id))
    reply = {"message_id": props.message_id, "outcome": "applied" if row else "rejected",
             "item_id": str(item), "delta": delta}
    if row:
        reply["qty"] = row[0]
    target = props.reply_to or f"qty.adjust.{reply['outcome']}"
    ch.basic_publish("" if props.reply_to else exchange, target, json.dumps(reply).encode(),
                     pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                          correlation_id=props.correlation_id or props.message_id))
    ch.basic_ack(method.delivery_tag)


channel.basic_consume(queue, handle)
try:
    channel.start_consuming()
except KeyboardInterrupt:
    pass
