-- A request that arrives alone costs what a one-message worker's transaction
-- costs.
--
-- Below a few hundred requests a second the worker's batches hold one request.
-- The batch path of 0004 then pays its fixed cost for one row: the lock_timeout
-- setting, set-returning aggregates over one-element arrays, the nested walk
-- with its own SET clauses, and a dozen statements where a one-message worker
-- runs two. PostgreSQL spent about twice the CPU of that worker's transaction
-- on each such call.
--
-- qty_adjust now answers a batch of one itself, in five statements, when
-- nothing has to wait: its message_id lock and its item's row lock are both
-- free, and the item exists. It takes the same locks in the same order as the
-- batch path and records the same ledger row, so a duplicate is answered the
-- same whichever path recorded it. Anything else (a lock held elsewhere, an
-- item that does not exist, a batch of several) goes down the batch path.
--
-- The batch path is 0004's qty_adjust body, copied under a new name rather
-- than renamed: `create or replace` keeps qty_adjust itself the same function,
-- so the runtime role's EXECUTE grant (which a dropped and recreated function
-- would lose) stays as it is across this migration.

-- The batch path: 0004's qty_adjust, unchanged but for its name and for
-- running with its caller's rights and search_path, which are qty_adjust's
-- (its owner's, pinned). Only the owner may call it directly.
create function qty_adjust_batch(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[], lock_wait_ms int)
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
        return query select * from qty_apply_locked(message_ids, item_ids, deltas, publishers);
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
                   array(select deltas[k] from unnest(kept) with ordinality as u(k, o) order by o),
                   array(select publishers[k] from unnest(kept) with ordinality as u(k, o) order by o)) as a
    )
    select g.p::int, coalesce(a.outcome, 'busy'), a.reason, a.qty_after, coalesce(a.replayed, false)
      from generate_series(1, n) as g(p)
      left join applied a on a.p = g.p
     order by g.p;
end;
$$;


create or replace function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
security definer
as $$
declare
    prior     record;
    old_qty   bigint;
begin
    -- Both try-locks take nothing that a wait could be needed for: the batch
    -- path, which can wait (at most lock_wait_ms), takes them again.
    if cardinality(message_ids) = 1
       and pg_try_advisory_xact_lock(hashtextextended(message_ids[1], 7301)) then
        pos := 1;
        select a.item_id, a.delta, a.outcome, a.reason, a.qty_after into prior
          from adjustments a where a.message_id = message_ids[1];
        if found then
            replayed := true;
            if prior.item_id = item_ids[1] and prior.delta = deltas[1] then
                outcome := prior.outcome; reason := prior.reason; qty_after := prior.qty_after;
            else
                outcome := 'rejected'; reason := 'idempotency_conflict';
            end if;
            return next;
            return;
        end if;
        select i.qty into old_qty from items i where i.id = item_ids[1] for update skip locked;
        if found then
            replayed := false;
            if old_qty::numeric + deltas[1] < 0 then
                outcome := 'rejected'; reason := 'insufficient_qty';
            elsif old_qty::numeric + deltas[1] > 9223372036854775807 then
                outcome := 'rejected'; reason := 'qty_out_of_range';
            else
                -- The guard is still the update's own: the row is locked, so it
                -- holds, and a change it refused would be a bug worth an error.
                update items i set qty = i.qty + deltas[1], updated_at = now()
                 where i.id = item_ids[1]
                   and i.qty::numeric + deltas[1] between 0 and 9223372036854775807
                returning i.qty into qty_after;
                if not found then
                    raise exception 'qty_adjust: the guard refused a change the walk allowed';
                end if;
                outcome := 'applied';
            end if;
            insert into adjustments (message_id, item_id, delta, outcome, reason, qty_after, publisher)
            values (message_ids[1], item_ids[1], deltas[1], outcome, reason, qty_after, publishers[1]);
            return next;
            return;
        end if;
    end if;
    return query select * from qty_adjust_batch(message_ids, item_ids, deltas, publishers, lock_wait_ms);
end;
$$;

do $$
begin
    execute format('alter function qty_adjust(text[], uuid[], bigint[], text[], int) set search_path = pg_catalog, %I', current_schema());
end;
$$;

revoke execute on function qty_adjust_batch(text[], uuid[], bigint[], text[], int) from public;
