//! Batched transactions keep each request's own semantics: the same randomized
//! stream gives identical answers and final state whether it is applied one
//! request per transaction or many, and concurrent batches neither deadlock nor
//! apply a key twice.

use qty_test_support::app::Names;
use qty_worker::decode::Request;
use qty_worker::store::{self, Adjusted, Answer, Database, Incoming};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// A migrated database of its own, dropped with the value.
struct TestDb {
    names: Names,
    db: Database,
    pool: PgPool,
}

impl TestDb {
    async fn create() -> TestDb {
        let names = Names::random();
        let db = store::open_prepared(&names.database_url(), 8)
            .await
            .expect("create database");
        let pool = db.pool.clone();
        TestDb { names, db, pool }
    }

    async fn seed(&self, items: &[(Uuid, i64)]) {
        for (id, qty) in items {
            store::create_item(&self.pool, *id, *qty)
                .await
                .expect("seed item");
        }
    }

    async fn state(&self) -> Vec<(Uuid, i64)> {
        sqlx::query_as("select id, qty from items order by id")
            .fetch_all(&self.pool)
            .await
            .expect("read items")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.names.remove_all();
    }
}

/// Items near both edges of the range, plus ids that do not exist; deltas that
/// fit, that overdraw, that overflow; repeated keys with the same payload and
/// with another one.
fn random_stream(seed: u64, len: usize) -> (Vec<(Uuid, i64)>, Vec<Request>) {
    let mut mix = fastrand::Rng::with_seed(seed);
    let items: Vec<(Uuid, i64)> = (0..6)
        .map(|n| {
            (
                Uuid::from_u128(seed as u128 * 100 + n),
                [0, 3, 10, 50, i64::MAX - 5, 7][n as usize],
            )
        })
        .collect();
    let mut requests: Vec<Request> = Vec::with_capacity(len);
    for n in 0..len {
        let roll = mix.u64(..100);
        if roll < 15 && n > 0 {
            let earlier = requests[mix.usize(..n)].clone();
            requests.push(earlier);
            continue;
        }
        if roll < 20 && n > 0 {
            let mut conflicting = requests[mix.usize(..n)].clone();
            conflicting.delta = conflicting.delta.wrapping_add(1);
            requests.push(conflicting);
            continue;
        }
        let item = if mix.u64(..10) == 0 {
            Uuid::new_v4()
        } else {
            items[mix.usize(..items.len())].0
        };
        let delta = match mix.u64(..20) {
            0 => i64::MIN,
            1 => i64::MAX,
            2 => 3,
            _ => mix.i64(-8..5),
        };
        requests.push(Request {
            message_id: format!("m-{n}"),
            item_id: item,
            delta,
            publisher: None,
        });
    }
    (items, requests)
}

/// The worker's default lock wait.
const LOCK_WAIT: Duration = Duration::from_millis(qty_worker::settings::DEFAULT_LOCK_WAIT_MS);

/// The final answers for `requests`, as the worker gets them: a batch that lost
/// a deadlock is applied again; requests parked (their item or key locked by a
/// concurrent writer for the whole wait) are judged as a judge does, and
/// answered from the ledger.
async fn adjust(db: &Database, requests: &[&Request]) -> Vec<Adjusted> {
    let incoming: Vec<Incoming> = requests
        .iter()
        .map(|&request| Incoming {
            request: request.clone(),
            route: Default::default(),
            source: "t".into(),
        })
        .collect();
    let batch: Vec<&Incoming> = incoming.iter().collect();
    for _attempt in 0..1_000 {
        let got = match store::adjust(db, &batch, LOCK_WAIT).await {
            Ok(got) => got,
            Err(error) if error.is_transient() => continue,
            Err(error) => panic!("adjust: {error}"),
        };
        let mut answers = Vec::with_capacity(got.len());
        for (request, answer) in requests.iter().zip(got) {
            answers.push(match answer {
                Answer::Done(adjusted) => adjusted,
                Answer::Parked(_) => judged(db, request).await,
            });
        }
        return answers;
    }
    panic!("every batch answered within 1,000 attempts")
}

/// A parked request's answer, once a judge (this one, or a concurrent
/// writer's) has judged it: the judge's own, or the ledger's for a repeat.
async fn judged(db: &Database, request: &Request) -> Adjusted {
    let sources = store::parked::Sources {
        mine: vec!["t".into()],
        fleet: vec!["t".into()],
        name: "t".into(),
    };
    let again = Incoming {
        request: request.clone(),
        route: Default::default(),
        source: "t".into(),
    };
    for _attempt in 0..1_000 {
        if let Ok(judged) = store::parked::judge(db, &sources, 1_000, Duration::from_secs(60)).await
        {
            let seqs: Vec<i64> = judged.iter().map(|j| j.seq).collect();
            store::parked::replied(db, &seqs).await.expect("retire");
            if let Some(mine) = judged.iter().find(|j| j.message_id == request.message_id) {
                return Adjusted {
                    outcome: mine.outcome.clone(),
                    replayed: mine.replayed,
                };
            }
        }
        // Judged by another writer's judge: the ledger answers a repeat.
        if let Ok(answers) = store::adjust(db, &[&again], LOCK_WAIT).await
            && let Some(Answer::Done(adjusted)) = answers.into_iter().next()
        {
            return adjusted;
        }
    }
    panic!("{} was never judged", request.message_id)
}

async fn apply_in_chunks(
    pool: &Database,
    requests: &[Request],
    mut chunk: impl FnMut() -> usize,
) -> Vec<Adjusted> {
    let mut answers = Vec::with_capacity(requests.len());
    let mut rest = requests;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(chunk().clamp(1, rest.len()));
        let refs: Vec<&Request> = now.iter().collect();
        answers.extend(adjust(pool, &refs).await);
        rest = later;
    }
    answers
}

#[tokio::test]
async fn batched_and_unbatched_streams_give_identical_answers_and_state() {
    for seed in 1..=5u64 {
        let (items, requests) = random_stream(seed, 400);
        let one_by_one = TestDb::create().await;
        let batched = TestDb::create().await;
        one_by_one.seed(&items).await;
        batched.seed(&items).await;

        let single = apply_in_chunks(&one_by_one.db, &requests, || 1).await;
        let mut mix = fastrand::Rng::with_seed(seed ^ 0xABCD);
        let many = apply_in_chunks(&batched.db, &requests, || 1 + mix.usize(..60)).await;

        assert_eq!(single, many, "answers differ for seed {seed}");
        assert_eq!(
            one_by_one.state().await,
            batched.state().await,
            "final state differs for seed {seed}"
        );
        let outcomes: std::collections::HashSet<String> =
            single.iter().map(|a| format!("{:?}", a.outcome)).collect();
        assert!(
            outcomes.len() >= 5,
            "the stream should exercise every outcome, got {outcomes:?}"
        );
    }
}

#[tokio::test]
async fn two_adjustments_to_one_item_in_one_batch_see_each_other() {
    let db = TestDb::create().await;
    let item = Uuid::new_v4();
    db.seed(&[(item, 5)]).await;
    let requests =
        [("a", -3), ("b", -3), ("c", 4), ("b", -3), ("d", -6)].map(|(id, delta)| Request {
            message_id: id.into(),
            item_id: item,
            delta,
            publisher: None,
        });
    let refs: Vec<&Request> = requests.iter().collect();
    let answers: Vec<String> = adjust(&db.db, &refs)
        .await
        .into_iter()
        .map(|a| format!("{:?}/{}", a.outcome, a.replayed))
        .collect();
    assert_eq!(
        answers,
        [
            "Applied { qty: 2 }/false",
            "Rejected(InsufficientQty)/false",
            "Applied { qty: 6 }/false",
            "Rejected(InsufficientQty)/true",
            "Applied { qty: 0 }/false",
        ]
    );
}

#[tokio::test]
async fn concurrent_overlapping_batches_neither_deadlock_nor_apply_a_key_twice() {
    let db = TestDb::create().await;
    let items: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    db.seed(&items.iter().map(|id| (*id, 1_000_000)).collect::<Vec<_>>())
        .await;

    // Eight writers send the same 300 keys, each in its own order and chunking,
    // so batches overlap on items and on keys in every possible way.
    let keys: Vec<Request> = (0..300)
        .map(|n| Request {
            message_id: format!("k-{n}"),
            item_id: items[n % 4],
            delta: -((n % 7) as i64),
            publisher: None,
        })
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8u64 {
        let pool = db.db.clone();
        let mut mine = keys.clone();
        let mut mix = fastrand::Rng::with_seed(writer + 1);
        for i in (1..mine.len()).rev() {
            mine.swap(i, mix.usize(..=i));
        }
        writers.spawn(async move { apply_in_chunks(&pool, &mine, || 1 + mix.usize(..40)).await });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("a writer failed (deadlock or error)");
    }
    for (n, item) in items[..4].iter().enumerate() {
        let spent: i64 = keys
            .iter()
            .filter(|k| k.item_id == *item)
            .map(|k| k.delta)
            .sum();
        let qty: i64 = sqlx::query_scalar("select qty from items where id = $1")
            .bind(item)
            .fetch_one(&db.pool)
            .await
            .expect("item");
        assert_eq!(
            qty,
            1_000_000 + spent,
            "item {n} applied a key more than once"
        );
    }
    let rows: i64 = sqlx::query_scalar("select count(*) from adjustments")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 300);
}

#[tokio::test]
async fn concurrent_duplicates_that_lock_no_item_are_still_recorded_once() {
    let db = TestDb::create().await;
    // No item exists, so no row lock orders these transactions: only the
    // per-key lock stands between two first attempts at one key.
    let keys: Vec<Request> = (0..50)
        .map(|n| Request {
            message_id: format!("nf-{n}"),
            item_id: Uuid::new_v4(),
            delta: 1,
            publisher: None,
        })
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (pool, keys) = (db.db.clone(), keys.clone());
        writers.spawn(async move { apply_in_chunks(&pool, &keys, || 1).await });
    }
    let mut replayed = 0;
    while let Some(done) = writers.join_next().await {
        let answers = done.expect("a writer failed (a key inserted twice?)");
        assert!(
            answers
                .iter()
                .all(|a| a.outcome == qty_worker::outcome::Outcome::NotFound)
        );
        replayed += answers.iter().filter(|a| a.replayed).count();
    }
    assert_eq!(replayed, 7 * 50, "each key answered first exactly once");
}

/// Calls `qty_adjust` with 50 new requests for item 1 on `connection`.
async fn adjust_on(connection: &mut sqlx::PgConnection, round: usize) {
    let ids: Vec<String> = (0..50).map(|n| format!("r{round}-{n}")).collect();
    sqlx::query("select count(*) from qty_adjust($1, $2, $3, $4, $4, $4, $4, $5, 1000)")
        .bind(&ids)
        .bind(vec![Uuid::from_u128(1); 50])
        .bind(vec![1_i64; 50])
        .bind(vec![None::<String>; 50])
        .bind(vec!["t"; 50])
        .execute(connection)
        .await
        .expect("adjust");
}

#[tokio::test]
async fn the_ledger_lookup_never_scans_the_whole_ledger_however_much_it_grew() {
    use sqlx::Connection as _;
    let db = TestDb::create().await;
    db.seed(&[(Uuid::from_u128(1), 1_000)]).await;
    // One connection throughout: PL/pgSQL keeps its plans per connection, and the
    // ones made while the ledger was empty must still fit once it is large.
    let mut connection = sqlx::PgConnection::connect(&db.names.database_url())
        .await
        .expect("connect");
    for round in 0..8 {
        adjust_on(&mut connection, round).await;
    }
    sqlx::query(
        "insert into adjustments (message_id, item_id, delta, outcome, qty_after)
         select 'old-' || n, gen_random_uuid(), 1, 'applied', 1 from generate_series(1, 20000) n",
    )
    .execute(&db.pool)
    .await
    .expect("grow the ledger");

    // This backend's table scans not yet reported, which include the call's own.
    let scans = "select seq_scan from pg_stat_xact_user_tables where relname = 'adjustments'";
    let mut transaction = connection.begin().await.expect("begin");
    let before: i64 = sqlx::query_scalar(scans)
        .fetch_one(&mut *transaction)
        .await
        .expect("read the table statistics");
    adjust_on(&mut transaction, 8).await;
    let after: i64 = sqlx::query_scalar(scans)
        .fetch_one(&mut *transaction)
        .await
        .expect("read the table statistics");
    assert_eq!(after - before, 0, "qty_adjust read the whole ledger");
}

/// An answer of `qty_adjust` (or `qty_adjust_batch`): outcome, reason, qty_after,
/// replayed.
type OneAnswer = (String, Option<String>, Option<i64>, bool);

/// `sql`, a call of `qty_adjust` or `qty_adjust_batch` with `$1`..`$5`, bound
/// to `request` alone.
fn call_with_one<'q>(
    sql: &'static str,
    request: &'q Request,
    lock_wait_ms: i32,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, OneAnswer, sqlx::postgres::PgArguments> {
    sqlx::query_as(sql)
        .bind(vec![request.message_id.as_str()])
        .bind(vec![request.item_id])
        .bind(vec![request.delta])
        .bind(vec![request.publisher.as_deref()])
        .bind(lock_wait_ms)
}

/// `qty_adjust`'s call of this release, `$1`..`$9`, bound to `request` alone,
/// with no reply route, from source `t`.
fn call_routed<'q>(
    sql: &'static str,
    request: &'q Request,
    lock_wait_ms: i32,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, OneAnswer, sqlx::postgres::PgArguments> {
    let none: Vec<Option<&str>> = vec![None];
    sqlx::query_as(sql)
        .bind(vec![request.message_id.as_str()])
        .bind(vec![request.item_id])
        .bind(vec![request.delta])
        .bind(vec![request.publisher.as_deref()])
        .bind(none.clone())
        .bind(none.clone())
        .bind(none)
        .bind(vec!["t"])
        .bind(lock_wait_ms)
}

/// `qty_adjust`'s answer for one request and how often it went down the batch
/// path (`qty_adjust_batch`), asked in a transaction of its own so that
/// PostgreSQL's per-transaction function counts show the route.
async fn adjust_one_counting_batch_path(
    connection: &mut sqlx::PgConnection,
    request: &Request,
    lock_wait_ms: i32,
) -> (OneAnswer, i64) {
    use sqlx::Connection as _;
    let mut transaction = connection.begin().await.expect("begin");
    sqlx::query("set local track_functions = 'pl'")
        .execute(&mut *transaction)
        .await
        .expect("track functions");
    // Read before and after the call: counts not yet reported may include
    // earlier transactions' calls.
    let batch_calls = "select coalesce(sum(calls), 0)::bigint from pg_stat_xact_user_functions
                        where funcname = 'qty_adjust_batch'";
    let before: i64 = sqlx::query_scalar(batch_calls)
        .fetch_one(&mut *transaction)
        .await
        .expect("function counts");
    let answer = call_routed(
        "select outcome, reason, qty_after, replayed from qty_adjust($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        request,
        lock_wait_ms,
    )
    .fetch_one(&mut *transaction)
    .await
    .expect("qty_adjust");
    let after: i64 = sqlx::query_scalar(batch_calls)
        .fetch_one(&mut *transaction)
        .await
        .expect("function counts");
    let batch_calls = after - before;
    transaction.commit().await.expect("commit");
    (answer, batch_calls)
}

/// Every ledger row but its timestamp, in message_id order.
async fn ledger(
    pool: &PgPool,
) -> Vec<(
    String,
    Uuid,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
)> {
    sqlx::query_as(
        "select message_id, item_id, delta, outcome, reason, qty_after, publisher
           from adjustments order by message_id",
    )
    .fetch_all(pool)
    .await
    .expect("read the ledger")
}

#[tokio::test]
async fn a_lone_request_takes_the_short_path_and_answers_and_records_as_the_batch_path_does() {
    use sqlx::Connection as _;
    for seed in 1..=3u64 {
        let (items, requests) = random_stream(seed, 300);
        let short = TestDb::create().await;
        let batch = TestDb::create().await;
        short.seed(&items).await;
        batch.seed(&items).await;
        let mut connection = sqlx::PgConnection::connect(&short.names.database_url())
            .await
            .expect("connect");
        let mut short_answers = Vec::new();
        let mut batch_answers = Vec::new();
        let (mut short_path, mut batch_path) = (0, 0);
        for (n, request) in requests.iter().enumerate() {
            let mut request = request.clone();
            request.publisher = (n % 3 == 0).then(|| format!("publisher-{n}"));
            let (answer, batch_calls) =
                adjust_one_counting_batch_path(&mut connection, &request, 200).await;
            let item_exists = items.iter().any(|(id, _)| *id == request.item_id);
            // Only a request for an item that does not exist needs the batch
            // path (nothing here holds a lock); a replay never does.
            if item_exists || answer.3 {
                assert_eq!(batch_calls, 0, "{request:?} went down the batch path");
                short_path += 1;
            } else {
                batch_path += batch_calls;
            }
            short_answers.push(answer);
            // The batch path, forced: what 0004's qty_adjust answered and recorded.
            batch_answers.push(
                call_with_one(
                    "select outcome, reason, qty_after, replayed \
                     from qty_adjust_batch($1, $2, $3, $4, $5)",
                    &request,
                    200,
                )
                .fetch_one(&batch.pool)
                .await
                .expect("qty_adjust_batch"),
            );
        }
        assert!(
            short_path > 200 && batch_path > 0,
            "{short_path} short, {batch_path} batch"
        );
        assert_eq!(
            short_answers, batch_answers,
            "answers differ for seed {seed}"
        );
        assert_eq!(
            short.state().await,
            batch.state().await,
            "items differ for seed {seed}"
        );
        assert_eq!(
            ledger(&short.pool).await,
            ledger(&batch.pool).await,
            "ledgers differ for seed {seed}"
        );
    }
}

#[tokio::test]
async fn a_lone_request_whose_item_is_locked_waits_on_the_batch_path_and_is_parked_and_the_next_behind_it()
 {
    use sqlx::Connection as _;
    let db = TestDb::create().await;
    let item = Uuid::from_u128(7);
    db.seed(&[(item, 10)]).await;
    let mut holder = sqlx::PgConnection::connect(&db.names.database_url())
        .await
        .expect("connect");
    let mut held = holder.begin().await.expect("begin");
    sqlx::query("select 1 from items where id = $1 for update")
        .bind(item)
        .execute(&mut *held)
        .await
        .expect("lock the item");

    let mut connection = sqlx::PgConnection::connect(&db.names.database_url())
        .await
        .expect("connect");
    let request = |id: &str, delta| Request {
        message_id: id.into(),
        item_id: item,
        delta,
        publisher: None,
    };
    let waited = std::time::Instant::now();
    let (answer, batch_calls) =
        adjust_one_counting_batch_path(&mut connection, &request("locked-1", 1), 300).await;
    assert_eq!(
        answer,
        ("parked".into(), Some("locked".into()), None, false)
    );
    assert_eq!(
        batch_calls, 1,
        "the locked item should go down the batch path"
    );
    assert!(
        waited.elapsed() >= Duration::from_millis(300),
        "the batch path waits the whole lock wait before parking"
    );
    assert!(
        ledger(&db.pool).await.is_empty(),
        "a parked request is not recorded"
    );

    held.rollback().await.expect("release the item");
    // Free now, but a request parked before it: the next waits behind, and a
    // repeat of the parked one is not parked twice.
    let (answer, _) =
        adjust_one_counting_batch_path(&mut connection, &request("locked-2", -12), 300).await;
    assert_eq!(
        answer,
        ("parked".into(), Some("behind".into()), None, false)
    );
    let (answer, _) =
        adjust_one_counting_batch_path(&mut connection, &request("locked-1", 1), 300).await;
    assert_eq!(
        answer,
        ("parked".into(), Some("duplicate".into()), None, true)
    );
    let (answer, _) =
        adjust_one_counting_batch_path(&mut connection, &request("locked-1", 2), 300).await;
    assert_eq!(
        answer,
        (
            "rejected".into(),
            Some("idempotency_conflict".into()),
            None,
            true
        )
    );

    let sources = store::parked::Sources {
        mine: vec!["t".into()],
        fleet: vec!["t".into()],
        name: "t".into(),
    };
    let judged = store::parked::judge(&db.db, &sources, 100, Duration::from_secs(60))
        .await
        .expect("judge");
    let judged: Vec<(String, String)> = judged
        .iter()
        .map(|j| (j.message_id.clone(), format!("{:?}", j.outcome)))
        .collect();
    assert_eq!(
        judged,
        [
            ("locked-1".to_owned(), "Applied { qty: 11 }".to_owned()),
            (
                "locked-2".to_owned(),
                "Rejected(InsufficientQty)".to_owned()
            )
        ],
        "judged in the order they were parked"
    );
    let (answer, batch_calls) =
        adjust_one_counting_batch_path(&mut connection, &request("locked-3", 1), 300).await;
    assert_eq!(answer, ("applied".into(), None, Some(12), false));
    assert_eq!(batch_calls, 0, "once judged, the item takes the short path");
}
