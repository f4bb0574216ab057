-- The best per-message transaction a one-message-at-a-time worker could run: the
-- ledger insert `on conflict do nothing` plus the guarded update plus COMMIT.
-- pgbench script; `-D items=N` sets how many items it spreads over.
\set item random(1, :items)
\set delta random(-3, 2)
begin;
insert into adjustments (message_id, item_id, delta, outcome, qty_after)
  values (gen_random_uuid()::text, md5(:item::text)::uuid, :delta, 'applied', 0)
  on conflict do nothing;
update items set qty = qty + :delta where id = md5(:item::text)::uuid and qty + :delta >= 0;
commit;
