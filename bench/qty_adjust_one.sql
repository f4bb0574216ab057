-- One call of the worker's `qty_adjust` carrying a single request: what the
-- worker sends when requests arrive one at a time. pgbench script; `-D items=N`
-- sets how many items it spreads over.
\set item random(1, :items)
\set delta random(-3, 2)
select * from qty_adjust(array[gen_random_uuid()::text], array[md5(:item::text)::uuid], array[:delta::bigint], array[null::text], array[null::text], array[null::text], array[null::text], array['qty.adjust'], 200);
