-- Who consumes which partition queue of a fleet (QTY_PARTITIONS, contract §3).
--
-- Rows, not session-level advisory locks: behind PgBouncer's transaction
-- pooling a session lock stays on whichever server session took it, and neither
-- follows the worker nor ends with it. A lease has an owner, an expiry by the
-- database's clock and an epoch that grows at every claim: its owner renews it
-- while it consumes, gives it up (owner null) once it has settled or handed
-- back every delivery of that partition, and a lease left to expire (its owner
-- died) may be claimed by another worker. A renewal names the epoch it holds,
-- so an owner whose lease was claimed meanwhile learns it, and never renews a
-- lease that is now someone else's.
--
-- `fleet` is the request queue's name (QTY_QUEUE), so fleets on one database
-- but different queues do not meet. The runtime role reaches these tables only
-- through the functions below, which run as their owner (as qty_adjust does).

create table fleet_members (
    fleet      text        not null,
    member     text        not null,
    expires_at timestamptz not null,
    primary key (fleet, member)
);

create table partition_leases (
    fleet      text        not null,
    partition  int         not null check (partition >= 0),
    owner      text,
    epoch      bigint      not null default 0,
    expires_at timestamptz not null default '-infinity',
    primary key (fleet, partition)
);

-- One call per tick of a worker: keeps `member_id` a member for `ttl_ms`,
-- forgets members that have stopped renewing, makes sure partitions
-- 0..partitions-1 have rows, and answers the live members (in order), each
-- partition's owner (null when free or expired), and whether it is free because
-- its owner stopped renewing (lapsed) rather than gave it up.
create function qty_fleet_tick(fleet_name text, member_id text, partitions int, ttl_ms int)
returns table (members text[], partition int, owner text, lapsed boolean)
language plpgsql
security definer
as $$
#variable_conflict use_column
begin
    insert into fleet_members as m (fleet, member, expires_at)
    values (fleet_name, member_id, clock_timestamp() + ttl_ms * interval '1 millisecond')
    on conflict (fleet, member) do update set expires_at = excluded.expires_at;
    delete from fleet_members m where m.fleet = fleet_name and m.expires_at < clock_timestamp();
    insert into partition_leases (fleet, partition)
    select fleet_name, p from generate_series(0, partitions - 1) as p
    on conflict do nothing;
    return query
    select (select array_agg(m.member order by m.member) from fleet_members m where m.fleet = fleet_name),
           l.partition,
           case when l.expires_at > clock_timestamp() then l.owner end,
           l.owner is not null and l.expires_at <= clock_timestamp()
      from partition_leases l
     where l.fleet = fleet_name and l.partition < partitions
     order by l.partition;
end;
$$;

-- Claims a partition that is free, whose lease has expired, or that this
-- member holds already (after it dropped its broker connection); answers the
-- new epoch, or null when someone else holds it. A lease without a row yet
-- (the unpartitioned queue's drain, which no tick creates) starts free.
create function qty_lease_claim(fleet_name text, part int, member_id text, ttl_ms int)
returns bigint
language sql
security definer
as $$
    insert into partition_leases (fleet, partition) values (fleet_name, part)
    on conflict do nothing;
    update partition_leases
       set owner = member_id, epoch = epoch + 1,
           expires_at = clock_timestamp() + ttl_ms * interval '1 millisecond'
     where fleet = fleet_name and partition = part
       and (owner is null or owner = member_id or expires_at <= clock_timestamp())
    returning epoch
$$;

-- Renews the leases `member_id` still holds at the epochs it names; answers
-- the partitions renewed (a partition missing from the answer was lost).
create function qty_lease_renew(fleet_name text, member_id text, parts int[], epochs bigint[], ttl_ms int)
returns setof int
language sql
security definer
as $$
    update partition_leases l
       set expires_at = clock_timestamp() + ttl_ms * interval '1 millisecond'
      from unnest(parts, epochs) as u(part, epoch)
     where l.fleet = fleet_name and l.partition = u.part
       and l.owner = member_id and l.epoch = u.epoch
    returning l.partition
$$;

-- Gives a partition up (its deliveries are settled or handed back), so that
-- another worker may claim it at once.
create function qty_lease_release(fleet_name text, member_id text, part int, lease_epoch bigint)
returns boolean
language sql
security definer
as $$
    with released as (
        update partition_leases
           set owner = null, expires_at = '-infinity'
         where fleet = fleet_name and partition = part
           and owner = member_id and epoch = lease_epoch
        returning 1
    )
    select exists (select 1 from released)
$$;

-- A worker that stops leaves the fleet at once rather than when its
-- membership expires, so that the others take its share without waiting.
create function qty_fleet_leave(fleet_name text, member_id text)
returns void
language sql
security definer
as $$
    delete from fleet_members where fleet = fleet_name and member = member_id
$$;

do $$
begin
    execute format('alter function qty_fleet_tick(text, text, int, int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_lease_claim(text, int, text, int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_lease_renew(text, text, int[], bigint[], int) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_lease_release(text, text, int, bigint) set search_path = pg_catalog, %I', current_schema());
    execute format('alter function qty_fleet_leave(text, text) set search_path = pg_catalog, %I', current_schema());
end;
$$;

revoke execute on function qty_fleet_tick(text, text, int, int) from public;
revoke execute on function qty_lease_claim(text, int, text, int) from public;
revoke execute on function qty_lease_renew(text, text, int[], bigint[], int) from public;
revoke execute on function qty_lease_release(text, text, int, bigint) from public;
revoke execute on function qty_fleet_leave(text, text) from public;
