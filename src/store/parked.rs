//! The parked requests' queries (migration 0007): judging an item's parked rows
//! once its lock is free, retiring them once their replies are confirmed, and
//! what waits, for the gauges, `/readyz` and `qty-worker parked`. Simple queries
//! with their values written in (see `literal`), as PgBouncer's transaction
//! pooling needs.

use super::database::Database;
use super::{StoreError, literal};
use crate::outcome::{Outcome, Reason};
use crate::reply::ReplyRoute;
use serde::Serialize;
use sqlx::{PgPool, Row as _};
use std::time::Duration;
use uuid::Uuid;

/// Which parked rows a worker judges (see `qty_parked_mine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The queues this worker consumes now.
    pub mine: Vec<String>,
    /// Every queue of the fleet: a row from none of them (an old partition) is
    /// anyone's.
    pub fleet: Vec<String>,
    /// The fleet's name, the request queue's: rows from queues named after it.
    pub name: String,
}

/// A parked request judged (or judged before, with its reply still owed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub seq: i64,
    pub message_id: String,
    pub item_id: Uuid,
    pub delta: i64,
    pub outcome: Outcome,
    pub replayed: bool,
    /// Judged earlier; its judge did not confirm the reply in time.
    pub resent: bool,
    pub route: ReplyRoute,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Judges up to `most` parked rows of `sources` whose items are free, each
/// item's in order, in one transaction; answers them after the owed replies
/// whose judge seems gone. Every row answered is owed a reply within
/// `reply_within`, then [`replied`].
pub async fn judge(
    db: &Database,
    sources: &Sources,
    most: u32,
    reply_within: Duration,
) -> Result<Vec<Judged>, StoreError> {
    let sql = format!(
        "select seq, message_id, item_id, delta, outcome, reason, qty_after, replayed, resent, \
                reply_to, correlation_id, traceparent \
           from qty_judge_parked({}, {}, {}, {most}, {})",
        literal::text_array(sources.mine.iter().map(|s| Some(s.as_str()))),
        literal::text_array(sources.fleet.iter().map(|s| Some(s.as_str()))),
        literal::text(&sources.name),
        millis(reply_within),
    );
    let mut connection = db.pool.acquire().await?;
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *connection)
        .await
        .map_err(|error| {
            let error = StoreError::from(error);
            if error.spoils_connection() {
                connection.close_on_drop();
            }
            error
        })?;
    rows.iter()
        .map(|row| {
            let outcome: String = row.try_get(4)?;
            let reason: Option<String> = row.try_get(5)?;
            let qty_after: Option<i64> = row.try_get(6)?;
            let outcome = match (outcome.as_str(), reason.as_deref(), qty_after) {
                ("applied", None, Some(qty)) => Some(Outcome::Applied { qty }),
                ("not_found", None, None) => Some(Outcome::NotFound),
                ("rejected", Some(code), None) => Reason::from_code(code).map(Outcome::Rejected),
                _ => None,
            }
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!(
                    "qty_judge_parked answered an impossible outcome {outcome:?}/{reason:?}/{qty_after:?}"
                ))
            })?;
            Ok(Judged {
                seq: row.try_get(0)?,
                message_id: row.try_get(1)?,
                item_id: row.try_get(2)?,
                delta: row.try_get(3)?,
                outcome,
                replayed: row.try_get(7)?,
                resent: row.try_get(8)?,
                route: ReplyRoute {
                    reply_to: row.try_get(9)?,
                    correlation_id: row.try_get(10)?,
                    traceparent: row.try_get(11)?,
                },
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The replies of these judged rows are confirmed: retire them.
pub async fn replied(db: &Database, seqs: &[i64]) -> Result<(), StoreError> {
    let sql = format!(
        "select qty_parked_replied({})",
        literal::bigint_array(seqs.iter().copied())
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// What waits in a fleet's queues.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub items: u64,
    /// How long the oldest has waited.
    pub oldest: Duration,
    /// Judged requests whose replies are still owed.
    pub owed: u64,
    /// The items with the most waiting (at most as many as asked), most first.
    pub top: Vec<(Uuid, u64)>,
}

/// What waits in the queues of the fleet `name`.
pub async fn summary(db: &Database, name: &str, most: u32) -> Result<Summary, StoreError> {
    let sql = format!(
        "select item_id, requests, items, oldest_seconds, owed from qty_parked_summary({}, {most})",
        literal::text(name)
    );
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await?;
    let mut summary = Summary::default();
    for row in rows {
        let item: Option<Uuid> = row.try_get(0)?;
        let requests = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
        match item {
            None => {
                summary.requests = requests;
                summary.items = u64::try_from(row.try_get::<i64, _>(2)?).unwrap_or(0);
                summary.oldest = Duration::try_from_secs_f64(row.try_get(3)?).unwrap_or_default();
                summary.owed = u64::try_from(row.try_get::<i64, _>(4)?).unwrap_or(0);
            }
            Some(item) => summary.top.push((item, requests)),
        }
    }
    Ok(summary)
}

/// One parked request, as `qty-worker parked` lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ParkedEntry {
    pub item_id: Uuid,
    pub message_id: String,
    pub delta: i64,
    pub publisher: Option<String>,
    pub source: String,
    pub parked_at: String,
    pub waited_seconds: f64,
    /// `waiting`, or `judged` (its reply is being sent).
    pub state: String,
}

/// Every parked request (at most `limit`), per item in order (as the owner
/// role, like the other operator commands).
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<ParkedEntry>, sqlx::Error> {
    sqlx::query_as(
        "select item_id, message_id, delta, publisher, source, \
                to_char(parked_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as parked_at, \
                extract(epoch from clock_timestamp() - parked_at)::float8 as waited_seconds, \
                case when judged_at is null then 'waiting' else 'judged' end as state \
           from parked order by item_id, seq limit $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
