//! One misbehaving party beside healthy traffic, against a running worker with
//! its defaults: the two cases of "one bad item or one bad client must not stall
//! the worker", measured the way an operator would see them.
//!
//! 1. Healthy traffic alone: 50 items at 100 requests/s for 10 s (the baseline).
//! 2. A popular item's row held `FOR UPDATE`, 1,500 requests published for it,
//!    then the same healthy traffic for 20 s; the lock is released afterwards
//!    and the locked item's requests must be applied in publish order.
//! 3. A client whose reply queue is bounded (`x-max-length` 10, `x-overflow`
//!    `reject-publish`) and not consumed: 1,200 requests with that `reply_to`,
//!    then the healthy traffic for 10 s.
//!
//! For each it prints how many healthy requests were answered, their rate, and
//! the p50/p99 from publish to reply. `bench/one_bad_party.sh` starts the worker
//! (release build, defaults) and reports its RSS and counters beside these.
//! Settings: `AMQP_URL`, `DATABASE_URL`, `QTY_EXCHANGE`, `QTY_QUEUE`.

use futures::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use qty_test_support::app::{listen, request_body};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

type Sent = Arc<Mutex<HashMap<String, Instant>>>;
/// Replies by request message_id: when each arrived, and its `qty`.
type Answered = Arc<Mutex<HashMap<String, (Instant, Option<i64>)>>>;

/// Healthy traffic's outcome.
struct Figures {
    published: usize,
    answered: usize,
    p50_ms: f64,
    p99_ms: f64,
    per_second: f64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} healthy requests answered, {:.1}/s, p50 {:.1} ms, p99 {:.1} ms",
            self.answered, self.published, self.per_second, self.p50_ms, self.p99_ms
        )
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let amqp = std::env::var("AMQP_URL")?;
    let database = std::env::var("DATABASE_URL")?;
    let exchange = std::env::var("QTY_EXCHANGE")?;
    let queue = std::env::var("QTY_QUEUE")?;
    let pool = PgPool::connect(&database).await?;
    let connection = Connection::connect(&amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (reply_queue, replies) = listen(&channel, None).await;
    let answered: Answered = Arc::default();
    {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut replies = replies;
            while let Some(Ok(delivery)) = replies.next().await {
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                if let Some(id) = body["message_id"].as_str() {
                    let qty = body["qty"].as_i64();
                    answered
                        .lock()
                        .expect("lock")
                        .insert(id.to_owned(), (Instant::now(), qty));
                }
            }
        });
    }
    let mut items = Vec::new();
    for _ in 0..50 {
        items.push(create_item(&pool, 1_000_000).await?);
    }
    let hot = create_item(&pool, 0).await?;
    let sent: Sent = Arc::default();
    let publish = Publish {
        channel: &channel,
        exchange: &exchange,
        reply_to: &reply_queue,
        sent: &sent,
    };

    let baseline = publish.healthy(&items, "base", 10, &answered).await?;
    println!("healthy alone: {baseline}");

    let mut lock = pool.begin().await?;
    sqlx::query("select 1 from items where id = $1 for update")
        .bind(hot)
        .execute(&mut *lock)
        .await?;
    for n in 0..1_500 {
        publish
            .one(&format!("hot-{n}"), hot, 1, &reply_queue)
            .await?;
    }
    let locked = publish.healthy(&items, "locked", 20, &answered).await?;
    println!(
        "beside 1,500 requests for a locked item: {locked} ({:.2}x the rate alone)",
        locked.per_second / baseline.per_second
    );
    let hot_answered_while_locked = (0..1_500)
        .filter(|n| {
            answered
                .lock()
                .expect("lock")
                .contains_key(&format!("hot-{n}"))
        })
        .count();
    lock.rollback().await?;
    let released = Instant::now();
    wait_for(
        &answered,
        (0..1_500).map(|n| format!("hot-{n}")),
        Duration::from_secs(120),
    )
    .await;
    let in_order = (0..1_500).all(|n| {
        answered
            .lock()
            .expect("lock")
            .get(&format!("hot-{n}"))
            .map(|(_, q)| *q)
            == Some(Some(n + 1))
    });
    println!(
        "the locked item: {hot_answered_while_locked} answered while locked; all 1,500 applied {:.1} s after the release, in publish order: {in_order}",
        released.elapsed().as_secs_f64()
    );

    let stalled = format!("{queue}.stalled-client");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            stalled.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await?;
    for n in 0..1_200 {
        publish
            .one(
                &format!("stalled-{n}"),
                items[n % items.len()],
                -1,
                &stalled,
            )
            .await?;
    }
    let beside_stalled = publish.healthy(&items, "client", 10, &answered).await?;
    println!(
        "beside a stalled client's 1,200 requests: {beside_stalled} ({:.2}x the rate alone)",
        beside_stalled.per_second / baseline.per_second
    );
    channel
        .queue_delete(stalled.as_str().into(), Default::default())
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(())
}

async fn create_item(pool: &PgPool, qty: i64) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    sqlx::query("insert into items (id, qty) values ($1, $2)")
        .bind(id)
        .bind(qty)
        .execute(pool)
        .await?;
    Ok(id)
}

struct Publish<'a> {
    channel: &'a Channel,
    exchange: &'a str,
    reply_to: &'a str,
    sent: &'a Sent,
}

impl Publish<'_> {
    async fn one(
        &self,
        message_id: &str,
        item: Uuid,
        delta: i64,
        reply_to: &str,
    ) -> Result<(), lapin::Error> {
        let properties = BasicProperties::default()
            .with_message_id(message_id.into())
            .with_content_type("application/json".into())
            .with_reply_to(reply_to.into());
        self.sent
            .lock()
            .expect("lock")
            .insert(message_id.to_owned(), Instant::now());
        self.channel
            .basic_publish(
                self.exchange.into(),
                "qty.adjust".into(),
                BasicPublishOptions::default(),
                request_body(item, delta).as_bytes(),
                properties,
            )
            .await?
            .await?;
        Ok(())
    }

    /// 100 requests/s over the items for `seconds`, then up to 5 s for the last
    /// replies; what came back.
    async fn healthy(
        &self,
        items: &[Uuid],
        label: &str,
        seconds: u64,
        answered: &Answered,
    ) -> Result<Figures, lapin::Error> {
        let count = (seconds * 100) as usize;
        let started = Instant::now();
        let ids: Vec<String> = (0..count).map(|n| format!("{label}-{n}")).collect();
        for (n, id) in ids.iter().enumerate() {
            tokio::time::sleep_until((started + Duration::from_millis(10 * n as u64)).into()).await;
            self.one(id, items[n % items.len()], 1, self.reply_to)
                .await?;
        }
        wait_for(answered, ids.iter().cloned(), Duration::from_secs(5)).await;
        let mut latencies: Vec<f64> = {
            let answered = answered.lock().expect("lock");
            let sent = self.sent.lock().expect("lock");
            ids.iter()
                .filter_map(|id| Some(answered.get(id)?.0.duration_since(*sent.get(id)?)))
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect()
        };
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        Ok(Figures {
            published: count,
            answered: latencies.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            per_second: if latencies.is_empty() {
                0.0
            } else {
                latencies.len() as f64 / (seconds as f64 + at(0.99) / 1000.0)
            },
        })
    }
}

/// Waits until every id is answered, or `within` has passed.
async fn wait_for(answered: &Answered, ids: impl Iterator<Item = String>, within: Duration) {
    let ids: Vec<String> = ids.collect();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let done = {
            let answered = answered.lock().expect("lock");
            ids.iter().all(|id| answered.contains_key(id))
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
