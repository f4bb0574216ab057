-- Items and the idempotency ledger (contract section 6).

create table items (
    id         uuid primary key,
    -- The backstop: even a bug in the worker cannot make a quantity negative.
    qty        bigint not null check (qty >= 0),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- One row per recorded message_id. The reply sent for it is rendered from these
-- columns alone, so a duplicate is answered with the very same body.
-- No foreign key to items: a not_found outcome is recorded for an id that has none.
create table adjustments (
    message_id  text primary key,
    item_id     uuid not null,
    delta       bigint not null,
    outcome     text not null check (outcome in ('applied', 'not_found', 'rejected')),
    reason      text check (reason in ('insufficient_qty', 'qty_out_of_range')),
    qty_after   bigint,
    recorded_at timestamptz not null default clock_timestamp(),
    check ((outcome = 'applied') = (qty_after is not null)),
    check ((outcome = 'rejected') = (reason is not null))
);

create index adjustments_item_history on adjustments (item_id, recorded_at);

-- Applies a batch of adjustments in order, in the caller's transaction, and returns
-- one row per input position (1-based `pos`).
--
-- * Each message_id is serialised by a transaction-scoped advisory lock, so the
--   ledger lookup that follows sees any concurrent first attempt that committed.
--   Locks are taken in one global order (message_id locks by key, then item rows by
--   id), so two batches never wait on each other in a cycle.
-- * The guard is the update's own WHERE clause, computed in numeric so that neither
--   `qty + delta` nor `-delta` can overflow bigint (think delta = -2^63).
-- * A message_id already in the ledger changes nothing and returns the stored
--   outcome (replayed), or idempotency_conflict when item_id or delta differ.
create function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[])
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql as $$
declare
    prior   adjustments%rowtype;
    new_qty bigint;
    old_qty bigint;
begin
    perform pg_advisory_xact_lock(k.key)
       from (select distinct hashtextextended(m, 7301) as key
               from unnest(message_ids) as m order by 1) as k;
    perform 1 from items i where i.id = any(item_ids) order by i.id for update;

    for n in 1 .. coalesce(array_length(message_ids, 1), 0) loop
        pos := n;
        select * into prior from adjustments a where a.message_id = message_ids[n];
        if found then
            replayed := true;
            if prior.item_id = item_ids[n] and prior.delta = deltas[n] then
                outcome := prior.outcome; reason := prior.reason; qty_after := prior.qty_after;
            else
                outcome := 'rejected'; reason := 'idempotency_conflict'; qty_after := null;
            end if;
            return next;
            continue;
        end if;

        replayed := false;
        update items i
           set qty = i.qty + deltas[n], updated_at = now()
         where i.id = item_ids[n]
           and i.qty::numeric + deltas[n] between 0 and 9223372036854775807
        returning i.qty into new_qty;
        if found then
            outcome := 'applied'; reason := null; qty_after := new_qty;
        else
            -- The row is locked above, so this read explains the refusal the update
            -- just made; it never feeds a write.
            select i.qty into old_qty from items i where i.id = item_ids[n];
            qty_after := null;
            if not found then
                outcome := 'not_found'; reason := null;
            elsif old_qty::numeric + deltas[n] < 0 then
                outcome := 'rejected'; reason := 'insufficient_qty';
            else
                outcome := 'rejected'; reason := 'qty_out_of_range';
            end if;
        end if;

        insert into adjustments as a (message_id, item_id, delta, outcome, reason, qty_after)
        values (message_ids[n], item_ids[n], deltas[n], outcome, reason, qty_after);
        return next;
    end loop;
end;
$$;
