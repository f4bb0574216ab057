#!/usr/bin/env bash
# Deletes a benchmark's queues and exchanges from the local RabbitMQ:
#   bench/forget-names.sh EXCHANGE QUEUE
exchange=$1 queue=$2
for q in "$queue" "$queue.dead"; do
  rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
done
# rabbitmqctl has no delete_exchange without the management plugin.
for x in "$exchange" "$exchange.dlx"; do
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"bench\">>)." >/dev/null 2>&1 || true
done
