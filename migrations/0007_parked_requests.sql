-- Requests waiting for a locked item are parked here, not held unacked
-- (contract §3 and §5).
--
-- Before, a request whose item stayed locked past the lock wait was set aside in
-- the worker's memory with its delivery unacked. Each broker version then
-- decided its fate by its own rules: after a crash 3.10 returned such
-- deliveries out of order, and 3.10 and 4.0 charged every restart or hand-over
-- to the delivery limit, until healthy requests were dead-lettered.
--
-- Now the database parks it: one row holding everything needed to judge it
-- and to answer it, and the worker acks the delivery. A later request for an
-- item that has parked rows is parked behind them, decided in the same call
-- that would otherwise apply it, so nothing overtakes a parked request: not in
-- another worker, not after a crash, not after a hand-over.
--
-- qty_judge_parked judges an item's parked rows in their order once its lock
-- is free: the apply (qty_apply_locked, the same walk as always) and the
-- retirement of the rows are one transaction. A judged row stays until its
-- reply is confirmed (qty_parked_replied): the obligation to answer is here,
-- like an outbox, so a crash between the commit and the reply re-sends it.
--
-- No foreign key to items: checking one takes FOR KEY SHARE on the item's row,
-- which waits for an operator's SELECT … FOR UPDATE: the very lock a parked
-- request must not wait for.

create table parked (
    -- The order: an item's rows are judged by ascending seq.
    seq            bigint      generated always as identity primary key,
    message_id     text        not null unique,
    item_id        uuid        not null,
    delta          bigint      not null,
    publisher      text,
    -- The reply's route: as the delivery would have been answered.
    reply_to       text,
    correlation_id text,
    traceparent    text,
    -- The queue it was delivered from (a partition queue, or the request
    -- queue): whoever consumes that queue judges it.
    source         text        not null,
    parked_at      timestamptz not null default clock_timestamp(),
    -- Set when judged: from then on its reply is owed.
    judged_at      timestamptz,
    -- Until when the worker that judged it (or last re-sent its reply) is
    -- trusted to be sending the reply.
    reply_due      timestamptz
);

-- An item's waiting rows in order; and whether anything waits at all, which
-- the hot path asks first.
create index parked_waiting on parked (item_id, seq) where judged_at is null;
create index parked_owed on parked (reply_due) where judged_at is not null;

-- Whether a parked row's source is judged by a worker consuming `mine`, in a
-- fleet whose queues are `fleet_sources`, all named after `fleet`: its own
-- queues, and a queue of the fleet that no longer exists (partitions
-- renumbered, or a switch between partitioned and not), which anyone judges.
create function qty_parked_mine(source text, mine text[], fleet_sources text[], fleet text)
returns boolean
language sql
immutable
as $$
    select source = any(mine)
        or (source <> all(fleet_sources)
            and (source = fleet or left(source, length(fleet) + 1) = fleet || '.'))
$$;

-- The call of this release: qty_adjust with each request's reply route and
-- source, which parks what cannot be applied now. Answers, besides the final
-- outcomes, `parked` with reason `locked` (the lock wait ran out), `behind`
-- (earlier requests of its item are parked) or `duplicate` (its message_id is
-- parked already: the one reply comes when that is judged).
create function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[],
                           reply_tos text[], correlation_ids text[], traceparents text[],
                           sources text[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
security definer
as $$
declare
    n         int := coalesce(cardinality(message_ids), 0);
    prior     record;
    old_qty   bigint;
    -- Positions tried now, in order; the rest are parked or duplicates.
    now_pos   int[] := '{}';
    behind    int[] := '{}';
    dups      int[] := '{}';
    locked    int[] := '{}';
    r         record;
    k         int;
begin
    if n = 0 then
        return;
    end if;
    -- 0005's path for a request that arrives alone, when nothing of its own
    -- waits (neither its message_id nor its item): five statements, as in
    -- 0005, when its locks are free and the item exists. Whether anything of
    -- it is parked is asked in the statement that locks the item.
    if n = 1 and pg_try_advisory_xact_lock(hashtextextended(message_ids[1], 7301)) then
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
        select i.qty into old_qty from items i
         where i.id = item_ids[1]
           and not exists (select 1 from parked p
                            where p.judged_at is null
                              and (p.item_id = item_ids[1] or p.message_id = message_ids[1]))
           for update of i skip locked;
        if found then
            replayed := false;
            if old_qty::numeric + deltas[1] < 0 then
                outcome := 'rejected'; reason := 'insufficient_qty';
            elsif old_qty::numeric + deltas[1] > 9223372036854775807 then
                outcome := 'rejected'; reason := 'qty_out_of_range';
            else
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

    if exists (select 1 from parked p where p.judged_at is null) then
        -- Recorded already: answered now from the ledger. Parked already: a
        -- duplicate. Its item has parked rows: parked behind them (and so is
        -- every later request of the item in this batch). Else: tried now.
        -- One statement, an index probe or three a request.
        select coalesce(array_agg(c.p order by c.p) filter (where c.class = 'now'), '{}'),
               coalesce(array_agg(c.p order by c.p) filter (where c.class = 'dup'), '{}'),
               coalesce(array_agg(c.p order by c.p) filter (where c.class = 'behind'), '{}')
          into now_pos, dups, behind
          from (select u.p,
                       case when exists (select 1 from adjustments a where a.message_id = u.m) then 'now'
                            when exists (select 1 from parked w where w.message_id = u.m) then 'dup'
                            when exists (select 1 from parked w
                                          where w.item_id = u.i and w.judged_at is null) then 'behind'
                            else 'now'
                       end as class
                  from unnest(message_ids, item_ids) with ordinality as u(m, i, p)) as c;
    else
        -- Nothing waits: all of them are tried now.
        now_pos := null;
    end if;

    if now_pos is null or cardinality(now_pos) = n then
        -- The batch path of 0005, parking what stays locked.
        for r in select b.pos, b.outcome, b.reason, b.qty_after, b.replayed
                   from qty_adjust_batch(message_ids, item_ids, deltas, publishers, lock_wait_ms) as b
        loop
            if r.outcome = 'busy' then
                locked := locked || r.pos;
            else
                pos := r.pos; outcome := r.outcome; reason := r.reason;
                qty_after := r.qty_after; replayed := r.replayed;
                return next;
            end if;
        end loop;
    elsif cardinality(now_pos) > 0 then
        for r in select b.pos, b.outcome, b.reason, b.qty_after, b.replayed
                   from qty_adjust_batch(
                            array(select message_ids[u.x] from unnest(now_pos) with ordinality as u(x, o) order by u.o),
                            array(select item_ids[u.x] from unnest(now_pos) with ordinality as u(x, o) order by u.o),
                            array(select deltas[u.x] from unnest(now_pos) with ordinality as u(x, o) order by u.o),
                            array(select publishers[u.x] from unnest(now_pos) with ordinality as u(x, o) order by u.o),
                            lock_wait_ms) as b
        loop
            if r.outcome = 'busy' then
                locked := locked || now_pos[r.pos];
            else
                pos := now_pos[r.pos]; outcome := r.outcome; reason := r.reason;
                qty_after := r.qty_after; replayed := r.replayed;
                return next;
            end if;
        end loop;
    end if;

    -- Parked in batch order: an item's requests keep their order.
    for k in select u.x from unnest(behind || locked) as u(x) order by u.x loop
        insert into parked (message_id, item_id, delta, publisher, reply_to, correlation_id, traceparent, source)
        values (message_ids[k], item_ids[k], deltas[k], publishers[k], reply_tos[k],
                correlation_ids[k], traceparents[k], sources[k])
        on conflict (message_id) do nothing;
        if found then
            pos := k; outcome := 'parked'; qty_after := null; replayed := false;
            reason := case when k = any(locked) then 'locked' else 'behind' end;
            return next;
        else
            -- Its message_id came twice in this batch: the first is parked.
            dups := dups || k;
        end if;
    end loop;

    for k in select u.x from unnest(dups) as u(x) loop
        pos := k; qty_after := null; replayed := true;
        if exists (select 1 from parked p where p.message_id = message_ids[k]
                      and p.item_id = item_ids[k] and p.delta = deltas[k]) then
            outcome := 'parked'; reason := 'duplicate';
        else
            outcome := 'rejected'; reason := 'idempotency_conflict';
        end if;
        return next;
    end loop;
end;
$$;

-- The previous release's call, for its workers during a rolling upgrade: they
-- cannot park, so a request whose item has parked rows is `busy` to them (they
-- set it aside and try again) until a worker of this release judges the rows.
create or replace function qty_adjust(message_ids text[], item_ids uuid[], deltas bigint[], publishers text[], lock_wait_ms int)
returns table (pos int, outcome text, reason text, qty_after bigint, replayed boolean)
language plpgsql
security definer
as $$
begin
    if exists (select 1 from parked p where p.item_id = any(item_ids) and p.judged_at is null) then
        return query select g.p::int, 'busy'::text, null::text, null::bigint, false
                       from generate_series(1, coalesce(cardinality(message_ids), 0)) as g(p);
        return;
    end if;
    return query select * from qty_adjust_batch(message_ids, item_ids, deltas, publishers, lock_wait_ms);
end;
$$;

-- Judges parked rows whose lock is free, each item's in order, at most `most`
-- rows: the items whose oldest waiting row is this worker's (see
-- qty_parked_mine), one judge at a time per item. Answers them, and before
-- them the judged rows whose reply is overdue (their judge seems gone), with
-- `resent` true. A caller owes the reply of every row answered, within
-- `reply_within_ms`, and then calls qty_parked_replied.
create function qty_judge_parked(mine text[], fleet_sources text[], fleet text, most int, reply_within_ms int)
returns table (seq bigint, message_id text, item_id uuid, delta bigint, outcome text, reason text,
               qty_after bigint, replayed boolean, resent boolean,
               reply_to text, correlation_id text, traceparent text)
language plpgsql
security definer
as $$
#variable_conflict use_column
declare
    due     timestamptz := clock_timestamp() + reply_within_ms * interval '1 millisecond';
    taken   int := 0;
    item    uuid;
    seqs    bigint[];
    ids     text[];
    r       record;
begin
    return query
    with owed as (
        update parked p set reply_due = due
         where p.seq in (select o.seq from parked o
                          where o.judged_at is not null and o.reply_due < clock_timestamp()
                            and qty_parked_mine(o.source, mine, fleet_sources, fleet)
                          order by o.seq limit most
                            for update skip locked)
        returning p.*
    )
    select o.seq, o.message_id, o.item_id, o.delta, a.outcome, a.reason, a.qty_after, true, true,
           o.reply_to, o.correlation_id, o.traceparent
      from owed o join adjustments a on a.message_id = o.message_id
     order by o.seq;

    for item in
        select w.item_id
          from (select distinct on (p.item_id) p.item_id, p.seq, p.source
                  from parked p where p.judged_at is null
                 order by p.item_id, p.seq) as w
         where qty_parked_mine(w.source, mine, fleet_sources, fleet)
         order by w.seq
    loop
        exit when taken >= most;
        -- One judge per item (a row lock alone would not cover an item that
        -- does not exist), and only while nobody else holds its row.
        continue when not pg_try_advisory_xact_lock(hashtextextended(item::text, 7302));
        begin
            perform 1 from items i where i.id = item for update nowait;
        exception when lock_not_available then
            continue;
        end;
        select array_agg(w.seq order by w.seq), array_agg(w.message_id order by w.seq)
          into seqs, ids
          from (select p.seq, p.message_id from parked p
                 where p.item_id = item and p.judged_at is null
                 order by p.seq limit most - taken) as w;
        continue when seqs is null;
        perform pg_advisory_xact_lock(s.key)
           from (select distinct hashtextextended(m, 7301) as key from unnest(ids) as m order by 1) as s;
        update parked p set judged_at = clock_timestamp(), reply_due = due where p.seq = any(seqs);
        return query
        select p.seq, p.message_id, p.item_id, p.delta, a.outcome, a.reason, a.qty_after, a.replayed, false,
               p.reply_to, p.correlation_id, p.traceparent
          from qty_apply_locked(
                   ids,
                   array(select p.item_id from unnest(seqs) with ordinality as u(s, o) join parked p on p.seq = u.s order by u.o),
                   array(select p.delta from unnest(seqs) with ordinality as u(s, o) join parked p on p.seq = u.s order by u.o),
                   array(select p.publisher from unnest(seqs) with ordinality as u(s, o) join parked p on p.seq = u.s order by u.o)) as a
          join parked p on p.seq = seqs[a.pos]
         order by a.pos;
        taken := taken + cardinality(seqs);
    end loop;
end;
$$;

-- The replies of these judged rows are confirmed: they are owed no more.
create function qty_parked_replied(seqs bigint[])
returns void
language sql
security definer
as $$
    delete from parked where seq = any(seqs) and judged_at is not null
$$;

-- What waits in `fleet`'s queues: a first row (item_id null) with every
-- waiting request, the items, the oldest one's wait in seconds, and the judged
-- requests whose replies are owed; then the `most` items with the most
-- waiting, most first.
create function qty_parked_summary(fleet text, most int)
returns table (item_id uuid, requests bigint, items bigint, oldest_seconds double precision, owed bigint)
language sql
security definer
as $$
    with fleets as (
        select p.item_id, p.parked_at, p.judged_at
          from parked p
         where p.source = fleet or left(p.source, length(fleet) + 1) = fleet || '.'
    ), waiting as (
        select f.item_id, count(*) as requests, min(f.parked_at) as since
          from fleets f where f.judged_at is null
         group by f.item_id
    )
    (select null::uuid, coalesce(sum(w.requests), 0)::bigint, count(*),
            coalesce(extract(epoch from clock_timestamp() - min(w.since)), 0)::double precision,
            (select count(*) from fleets f where f.judged_at is not null)
       from waiting w)
    union all
    (select w.item_id, w.requests, 1::bigint,
            extract(epoch from clock_timestamp() - w.since)::double precision, 0::bigint
       from waiting w order by w.requests desc, w.item_id limit most)
$$;

do $$
begin
    execute format('alter function qty_parked_mine(text, text[], text[], text) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_adjust(text[], uuid[], bigint[], text[], text[], text[], text[], text[], int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_judge_parked(text[], text[], text, int, int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_parked_replied(bigint[]) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_parked_summary(text, int) set search_path = pg_catalog, %I', current_schema());
end;
$$;

revoke execute on function qty_parked_mine(text, text[], text[], text) from public;
revoke execute on function qty_adjust(text[], uuid[], bigint[], text[], text[], text[], text[], text[], int) from public;
revoke execute on function qty_judge_parked(text[], text[], text, int, int) from public;
revoke execute on function qty_parked_replied(bigint[]) from public;
revoke execute on function qty_parked_summary(text, int) from public;

-- A runtime role granted the previous release's call gets this release's
-- functions too, so a rolling upgrade needs no new grant (`qty-worker migrate
-- --runtime-role` grants the same).
do $$
declare
    role_name name;
begin
    for role_name in
        select r.rolname from pg_roles r
         where r.rolname <> current_user
           and has_function_privilege(r.oid, 'qty_adjust(text[], uuid[], bigint[], text[], int)'::regprocedure, 'execute')
           and not r.rolsuper
    loop
        execute format('grant execute on function qty_adjust(text[], uuid[], bigint[], text[], text[], text[], text[], text[], int) to %I', role_name);
        execute format('grant execute on function qty_judge_parked(text[], text[], text, int, int) to %I', role_name);
        execute format('grant execute on function qty_parked_replied(bigint[]) to %I', role_name);
        execute format('grant execute on function qty_parked_summary(text, int) to %I', role_name);
    end loop;
end;
$$;
