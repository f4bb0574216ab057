//! The hot path: one call of the `qty_adjust` function (see `migrations/`) records
//! and applies a batch of requests in one transaction, or parks those that must
//! wait for an item locked elsewhere (contract §5).
//!
//! The call is a prepared statement, kept per connection: at low load a request
//! is one call, and parsing and planning the call afresh cost PostgreSQL about a
//! fifth of the transaction (BENCHMARKS.md). When `DATABASE_URL` says that
//! connections keep no prepared statements (`statement-cache-capacity=0`, for
//! PgBouncer's transaction pooling), the call is one simple query with its
//! values written as literals instead (see `literal`).

use super::{Database, StoreError, literal};
use crate::decode::Request;
use crate::outcome::{Outcome, Reason};
use crate::reply::ReplyRoute;
use sqlx::FromRow as _;
use std::sync::Arc;
use std::time::Duration;

/// A request as the database takes it: with what a parked row needs to judge
/// and answer it later, whichever worker does.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub request: Request,
    pub route: ReplyRoute,
    /// The queue it was delivered from, whose consumer judges it if parked.
    pub source: Arc<str>,
}

/// The database's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Recorded (or found recorded): the outcome is final.
    Done(Adjusted),
    /// Parked: nothing is recorded or changed yet; the delivery may be acked,
    /// and the reply follows when the request is judged.
    Parked(Parking),
}

/// Why a request was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// Its item (or its message_id) stayed locked elsewhere for the lock wait.
    Locked,
    /// Earlier requests of its item are parked: it waits behind them.
    Behind,
    /// Its message_id is parked already: that one's reply answers it.
    Duplicate,
}

impl Parking {
    pub fn code(self) -> &'static str {
        match self {
            Parking::Locked => "locked",
            Parking::Behind => "behind",
            Parking::Duplicate => "duplicate",
        }
    }
}

/// A final outcome, and whether it came from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjusted {
    pub outcome: Outcome,
    pub replayed: bool,
}

#[derive(sqlx::FromRow)]
struct AdjustRow {
    pos: i32,
    outcome: String,
    reason: Option<String>,
    qty_after: Option<i64>,
    replayed: bool,
}

/// Records and applies `requests` in order, in one transaction, one answer each.
/// A lock held elsewhere is waited for at most `lock_wait`, then the request is
/// parked. A connection that failed in a way that may last (lost, read-only) is
/// closed rather than reused.
pub async fn adjust(
    db: &Database,
    requests: &[&Incoming],
    lock_wait: Duration,
) -> Result<Vec<Answer>, StoreError> {
    let lock_wait_ms = i32::try_from(lock_wait.as_millis()).unwrap_or(i32::MAX);
    let mut connection = db.pool.acquire().await?;
    let rows = if db.target.prepared_statements {
        let text =
            |f: fn(&Incoming) -> Option<&str>| requests.iter().map(|r| f(r)).collect::<Vec<_>>();
        sqlx::query_as::<_, AdjustRow>(CALL)
            .bind(text(|r| Some(r.request.message_id.as_str())))
            .bind(
                requests
                    .iter()
                    .map(|r| r.request.item_id)
                    .collect::<Vec<_>>(),
            )
            .bind(requests.iter().map(|r| r.request.delta).collect::<Vec<_>>())
            .bind(text(|r| r.request.publisher.as_deref()))
            .bind(text(|r| r.route.reply_to.as_deref()))
            .bind(text(|r| r.route.correlation_id.as_deref()))
            .bind(text(|r| r.route.traceparent.as_deref()))
            .bind(text(|r| Some(&r.source)))
            .bind(lock_wait_ms)
            .fetch_all(&mut *connection)
            .await
    } else {
        sqlx::raw_sql(sqlx::AssertSqlSafe(call_text(requests, lock_wait_ms)))
            .fetch_all(&mut *connection)
            .await
            .and_then(|rows| {
                rows.iter()
                    .map(AdjustRow::from_row)
                    .collect::<Result<Vec<_>, _>>()
            })
    };
    let rows = rows.map_err(|error| {
        let error = StoreError::from(error);
        if error.spoils_connection() {
            connection.close_on_drop();
        }
        error
    })?;
    if rows.len() != requests.len()
        || rows
            .iter()
            .enumerate()
            .any(|(i, r)| r.pos as usize != i + 1)
    {
        return Err(StoreError::Permanent(sqlx::Error::Protocol(format!(
            "qty_adjust answered {} rows for {} requests",
            rows.len(),
            requests.len()
        ))));
    }
    rows.into_iter().map(AdjustRow::into_answer).collect()
}

/// The `qty_adjust` call, as a prepared statement.
const CALL: &str = "select pos, outcome, reason, qty_after, replayed \
                    from qty_adjust($1, $2, $3, $4, $5, $6, $7, $8, $9) order by pos";

/// The same call for `requests` as one simple query, its arguments written as
/// literals.
fn call_text(requests: &[&Incoming], lock_wait_ms: i32) -> String {
    let text =
        |f: fn(&Incoming) -> Option<&str>| literal::text_array(requests.iter().map(|r| f(r)));
    format!(
        "select pos, outcome, reason, qty_after, replayed from qty_adjust({}, {}, {}, {}, {}, {}, {}, {}, {lock_wait_ms}) order by pos",
        text(|r| Some(r.request.message_id.as_str())),
        literal::uuid_array(requests.iter().map(|r| r.request.item_id)),
        literal::bigint_array(requests.iter().map(|r| r.request.delta)),
        text(|r| r.request.publisher.as_deref()),
        text(|r| r.route.reply_to.as_deref()),
        text(|r| r.route.correlation_id.as_deref()),
        text(|r| r.route.traceparent.as_deref()),
        text(|r| Some(&r.source)),
    )
}

impl AdjustRow {
    fn into_answer(self) -> Result<Answer, StoreError> {
        let outcome = match (
            self.outcome.as_str(),
            self.reason.as_deref(),
            self.qty_after,
        ) {
            ("parked", Some("locked"), None) => return Ok(Answer::Parked(Parking::Locked)),
            ("parked", Some("behind"), None) => return Ok(Answer::Parked(Parking::Behind)),
            ("parked", Some("duplicate"), None) => return Ok(Answer::Parked(Parking::Duplicate)),
            ("applied", None, Some(qty)) => Some(Outcome::Applied { qty }),
            ("not_found", None, None) => Some(Outcome::NotFound),
            ("rejected", Some(code), None) => Reason::from_code(code).map(Outcome::Rejected),
            _ => None,
        };
        let outcome = outcome.ok_or_else(|| {
            StoreError::Permanent(sqlx::Error::Protocol(format!(
                "qty_adjust answered an impossible outcome {:?}/{:?}/{:?}",
                self.outcome, self.reason, self.qty_after
            )))
        })?;
        Ok(Answer::Done(Adjusted {
            outcome,
            replayed: self.replayed,
        }))
    }
}
