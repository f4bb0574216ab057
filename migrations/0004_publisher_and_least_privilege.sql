-- Who sent each adjustment, and a runtime role that cannot touch the tables.
--
-- * adjustments.publisher keeps the request's validated AMQP user_id (null when
--   it had none).
-- * qty_adjust takes the publishers alongside the batch and runs as its owner
--   (security definer) with a search_path pinned to pg_catalog and this schema,
--   so a login role with no privilege on items or adjustments changes them only
--   through it. PUBLIC loses EXECUTE on every function here; `qty-worker migrate
--   --runtime-role NAME` grants a role exactly what the worker needs.
-- * One walk and one signature: the walk of 0002 (copied into 0003) now lives
--   only in qty_apply_locked, and the three-argument qty_adjust of 0001/0002,
--   which nothing calls, is gone. The previous release's four-argument
--   signature stays as a one-line wrapper (no walk of its own) so that its
--   workers keep working while a rolling upgrade replaces them; drop it once
--   none is left.

alter table adjustments add column publisher text;

drop function qty_adjust(text[], uuid[], bigint[]);
drop function qty_adjust(text[], uuid[], bigint[], int);
drop function qty_apply_locked(text[], uuid[], bigint[]);

-- The walk, for a batch whose message_id and item locks the caller already
-- holds (the reasoning is in 0002 and 0003).
create function qty_apply_locked(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[])
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

    insert into adjustments (message_id, item_id, delta, outcome, reason, qty_after, publisher)
    select message_ids[p], item_ids[p], deltas[p], outcomes[p], reasons[p], qtys[p], publishers[p]
      from generate_series(1, n) as p
     where not replays[p]
     order by p;

    return query
    select p, outcomes[p], reasons[p], qtys[p], replays[p] from generate_series(1, n) as p;
end;
$$;

create function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
security definer
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

-- The previous release's call, for its workers during a rolling upgrade.
create function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language sql
security definer
as $$
    select * from qty_adjust(message_ids, item_ids, deltas,
                             array_fill(null::text, array[coalesce(cardinality(message_ids), 0)]),
                             lock_wait_ms)
$$;

-- Pinned search_path: this schema, whatever the caller's search_path says.
do $$
begin
    execute format('alter function qty_apply_locked(text[], uuid[], bigint[], text[]) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_adjust(text[], uuid[], bigint[], text[], int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_adjust(text[], uuid[], bigint[], int) set search_path = pg_catalog, %I', current_schema());
end;
$$;

revoke execute on function qty_apply_locked(text[], uuid[], bigint[], text[]) from public;
revoke execute on function qty_adjust(text[], uuid[], bigint[], text[], int) from public;
revoke execute on function qty_adjust(text[], uuid[], bigint[], int) from public;
