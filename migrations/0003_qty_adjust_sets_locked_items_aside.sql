-- qty_adjust with bounded lock waits: a row or message_id locked by someone else
-- (another worker's transaction, an operator's long UPDATE, a reporting query
-- FOR UPDATE) no longer holds up the batch. The worker passes how long one lock
-- may be waited for; a request whose item (or message_id) is still locked then is
-- answered 'busy': nothing is recorded or changed for it, and the worker retries
-- it later in order, without holding a connection meanwhile. Every other request
-- of the batch is applied as before.
--
-- Locks are first taken without waiting (try-locks, FOR UPDATE SKIP LOCKED), so
-- the usual batch, which meets no foreign lock, pays nothing more. Only a lock
-- found taken is waited for, one at a time in key order, each under lock_timeout
-- in a subtransaction of its own, whose failure releases nothing else. A wait
-- shorter than deadlock_timeout also means two batches never wait on each other
-- long enough to deadlock.
--
-- Every request for a set-aside item is set aside, so an item's requests are never
-- applied out of their order; so is a repeat of a message_id whose first
-- occurrence is set aside. What remains is applied by qty_apply_locked, the
-- 0002 walk without its lock-taking, on the batch compacted to the requests kept:
-- marking positions inside the walk instead cost every batch a tenth of its time.
-- The three-argument version from 0002 stays for workers of the previous release
-- during a rolling upgrade.

-- The walk of 0002, for a batch whose message_id and item locks the caller
-- already holds.
create function qty_apply_locked(message_ids text[], item_ids uuid[], deltas bigint[])
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off
as $$
declare
    n          int := coalesce(array_length(message_ids, 1), 0);
    -- For each position, the first position in the batch with its message_id.
    firsts     int[];
    outcomes   text[] := array_fill(null::text, array[n]);
    reasons    text[] := array_fill(null::text, array[n]);
    qtys       bigint[] := array_fill(null::bigint, array[n]);
    replays    boolean[] := array_fill(false, array[n]);
    r          record;
    walk_item  uuid;
    -- The walked item's quantity so far; null when the item does not exist.
    walk_qty   numeric;
    touched    int;
    written    int;
begin
    if n = 0 then
        return;
    end if;
    select array_agg(s.first order by s.p) into firsts
      from (select u.p, min(u.p) over (partition by u.m) as first
              from unnest(message_ids) with ordinality as u(m, p)) as s;

    -- Recorded before: replay, or refuse a changed payload.
    for r in select u.p, a.item_id, a.delta, a.outcome, a.reason, a.qty_after
               from unnest(message_ids) with ordinality as u(m, p)
               join adjustments a on a.message_id = u.m
    loop
        replays[r.p] := true;
        if r.item_id = item_ids[r.p] and r.delta = deltas[r.p] then
            outcomes[r.p] := r.outcome; reasons[r.p] := r.reason; qtys[r.p] := r.qty_after;
        else
            outcomes[r.p] := 'rejected'; reasons[r.p] := 'idempotency_conflict';
        end if;
    end loop;

    -- New: each item's requests in batch order, judged as the guard judges them.
    for r in select u.p, u.i, u.d, it.qty
               from unnest(item_ids, deltas) with ordinality as u(i, d, p)
               left join items it on it.id = u.i
              where not replays[u.p] and firsts[u.p] = u.p
              order by u.i, u.p
    loop
        if walk_item is distinct from r.i then
            walk_item := r.i;
            walk_qty := r.qty;
        end if;
        if walk_qty is null then
            outcomes[r.p] := 'not_found';
        elsif walk_qty + r.d < 0 then
            outcomes[r.p] := 'rejected'; reasons[r.p] := 'insufficient_qty';
        elsif walk_qty + r.d > 9223372036854775807 then
            outcomes[r.p] := 'rejected'; reasons[r.p] := 'qty_out_of_range';
        else
            walk_qty := walk_qty + r.d;
            outcomes[r.p] := 'applied'; qtys[r.p] := walk_qty;
        end if;
    end loop;

    -- A repeat within the batch answers like its first occurrence.
    for p in 1 .. n loop
        if firsts[p] <> p and not replays[p] then
            replays[p] := true;
            if item_ids[p] = item_ids[firsts[p]] and deltas[p] = deltas[firsts[p]] then
                outcomes[p] := outcomes[firsts[p]];
                reasons[p] := reasons[firsts[p]];
                qtys[p] := qtys[firsts[p]];
            else
                outcomes[p] := 'rejected'; reasons[p] := 'idempotency_conflict';
            end if;
        end if;
    end loop;

    update items it
       set qty = it.qty + s.net, updated_at = now()
      from (select u.i, sum(u.d) as net
              from unnest(item_ids, deltas) with ordinality as u(i, d, p)
             where not replays[u.p] and outcomes[u.p] = 'applied'
             group by u.i) as s
     where it.id = s.i
       and it.qty::numeric + s.net between 0 and 9223372036854775807;
    get diagnostics written = row_count;
    select count(distinct u.i) into touched
      from unnest(item_ids) with ordinality as u(i, p)
     where not replays[u.p] and outcomes[u.p] = 'applied';
    if written <> touched then
        raise exception 'qty_adjust: the guard refused % of % net changes the walk allowed',
            touched - written, touched;
    end if;

    insert into adjustments (message_id, item_id, delta, outcome, reason, qty_after)
    select message_ids[p], item_ids[p], deltas[p], outcomes[p], reasons[p], qtys[p]
      from generate_series(1, n) as p
     where not replays[p]
     order by p;

    return query
    select p, outcomes[p], reasons[p], qtys[p], replays[p] from generate_series(1, n) as p;
end;
$$;

create function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
as $$
declare
    n       int := coalesce(array_length(message_ids, 1), 0);
    -- Items whose lock could not be had within the wait.
    busy    uuid[] := '{}';
    locked  uuid[];
    wanted  int;
    -- The positions applied now, in batch order.
    kept    int[];
    r       record;
begin
    if n = 0 then
        return;
    end if;
    -- Zero would mean "wait for ever".
    perform set_config('lock_timeout', greatest(lock_wait_ms, 1) || 'ms', true);

    -- message_id advisory locks.
    for r in select s.key
               from (select distinct hashtextextended(m, 7301) as key
                       from unnest(message_ids) as m) as s
              where not pg_try_advisory_xact_lock(s.key)
              order by s.key
    loop
        begin
            perform pg_advisory_xact_lock(r.key);
        exception when lock_not_available then
            busy := busy || array(select item_ids[p] from generate_series(1, n) as p
                                   where hashtextextended(message_ids[p], 7301) = r.key);
        end;
    end loop;

    -- Item row locks. Only when fewer rows were locked than the batch names
    -- (some row is taken, or some item does not exist) are the rest looked at
    -- one by one.
    select coalesce(array_agg(l.id), '{}') into locked
      from (select i.id from items i
             where i.id = any(item_ids) and not i.id = any(busy)
             order by i.id for update skip locked) as l;
    select count(distinct u.i) into wanted
      from unnest(item_ids) as u(i)
     where not u.i = any(busy);
    if cardinality(locked) < wanted then
        for r in select distinct u.i from unnest(item_ids) as u(i)
                  where not u.i = any(locked) and not u.i = any(busy)
                  order by 1
        loop
            begin
                -- Finds nothing (and waits for nothing) when the item does not exist.
                perform 1 from items i where i.id = r.i for update;
            exception when lock_not_available then
                busy := busy || r.i;
            end;
        end loop;
    end if;

    if cardinality(busy) = 0 then
        return query select * from qty_apply_locked(message_ids, item_ids, deltas);
        return;
    end if;

    select array_agg(s.p order by s.p) into kept
      from (select u.p, u.i, first_value(u.i) over (partition by u.m order by u.p) as first_item
              from unnest(message_ids, item_ids) with ordinality as u(m, i, p)) as s
     where not s.i = any(busy) and not s.first_item = any(busy);
    return query
    with applied as (
        select kept[a.pos] as p, a.outcome, a.reason, a.qty_after, a.replayed
          from qty_apply_locked(
                   array(select message_ids[k] from unnest(kept) with ordinality as u(k, o) order by o),
                   array(select item_ids[k] from unnest(kept) with ordinality as u(k, o) order by o),
                   array(select deltas[k] from unnest(kept) with ordinality as u(k, o) order by o)) as a
    )
    select g.p::int, coalesce(a.outcome, 'busy'), a.reason, a.qty_after, coalesce(a.replayed, false)
      from generate_series(1, n) as g(p)
      left join applied a on a.p = g.p
     order by g.p;
end;
$$;
