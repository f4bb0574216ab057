// Publish one qty.adjust request with Node's amqplib and wait for its reply on
// direct reply-to.
//
//     node amqplib_publish.js ITEM_ID DELTA [MESSAGE_ID]
//
// Reads AMQP_URL (the first URL of a list) and QTY_EXCHANGE. Exits 0 when
// applied, 3 when not_found, 4 when rejected.
const amqp = require("amqplib");
const { randomUUID } = require("node:crypto");

async function main() {
  const [itemId, delta, id] = process.argv.slice(2);
  const messageId = id ?? randomUUID();
  const url = (process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f").split(",")[0];
  const exchange = process.env.QTY_EXCHANGE ?? "inventory";

  const connection = await amqp.connect(url);
  const channel = await connection.createConfirmChannel();
  const reply = new Promise((resolve) => {
    // Direct reply-to: consume (no-ack) before publishing.
    channel.consume("amq.rabbitmq.reply-to", (message) => {
      if (message.properties.correlationId === messageId) {
        resolve(JSON.parse(message.content.toString("utf8")));
      }
    }, { noAck: true });
  });
  // delta is sent as a JSON integer: JSON.stringify of a Number, never a string.
  const body = Buffer.from(JSON.stringify({ item_id: itemId, delta: Number(delta) }));
  channel.publish(exchange, "qty.adjust", body, {
    messageId, // the idempotency key: reuse it to retry safely
    correlationId: messageId,
    replyTo: "amq.rabbitmq.reply-to",
    contentType: "application/json",
    persistent: true,
    mandatory: true,
    // The item again, as a header: partitioned workers route by it.
    headers: { item_id: itemId },
  });
  await channel.waitForConfirms();
  const timeout = new Promise((_, reject) =>
    setTimeout(() => reject(new Error("no reply within 30 s")), 30_000).unref());
  const answer = await Promise.race([reply, timeout]);
  console.log(JSON.stringify(answer));
  await connection.close();
  process.exitCode = { applied: 0, not_found: 3 }[answer.outcome] ?? 4;
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = 1;
});
