//! A reply's confirm is the broker's confirm for that reply, however many
//! runtime threads publish on the channel at once (contract §3: the request is
//! acked only once its own reply is confirmed).

use futures::future::join_all;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use qty_test_support::app::{amqp_url, connect_any};
use qty_worker::broker::{publish, short};

const TASKS: usize = 8;
const EACH: usize = 250;

/// A server-named queue that lives as long as the test's connection.
async fn own_queue(channel: &Channel, arguments: FieldTable) -> String {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, arguments)
        .await
        .expect("declare a queue of the test's own");
    queue.name().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_publish_gets_its_own_confirm_when_threads_publish_on_one_channel_at_once() {
    let connection = connect_any(amqp_url())
        .await
        .expect("test broker connection");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // One queue refuses every message (the broker nacks it), one takes every message.
    let mut refusing = FieldTable::default();
    refusing.insert("x-max-length".into(), AMQPValue::LongInt(0));
    refusing.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let refusing = own_queue(&channel, refusing).await;
    let taking = own_queue(&channel, FieldTable::default()).await;

    // Tasks on every thread publish at once, alternating between the two queues.
    let tasks = (0..TASKS).map(|task| {
        let (channel, refusing, taking) = (channel.clone(), refusing.clone(), taking.clone());
        tokio::spawn(async move {
            let mut confirms = Vec::with_capacity(EACH);
            for n in 0..EACH {
                let refused = (task + n) % 2 == 0;
                let queue = if refused { &refusing } else { &taking };
                let confirm = publish(
                    &channel,
                    short(""),
                    short(queue),
                    Default::default(),
                    format!("{task}-{n}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
                confirms.push(async move { (refused, confirm.await.expect("a confirm")) });
                tokio::task::yield_now().await;
            }
            join_all(confirms).await
        })
    });
    let mut mismatched = Vec::new();
    for (task, confirms) in join_all(tasks).await.into_iter().enumerate() {
        for (n, (refused, confirmation)) in confirms.expect("task").into_iter().enumerate() {
            let nacked = matches!(confirmation, Confirmation::Nack(_));
            if nacked != refused {
                mismatched.push(format!("{task}-{n} (to the refusing queue: {refused})"));
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "{} of {} publishes got another publish's confirm: {:?}",
        mismatched.len(),
        TASKS * EACH,
        &mismatched[..mismatched.len().min(10)]
    );
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let taken = channel
        .queue_declare(short(&taking), passive, FieldTable::default())
        .await
        .expect("the taking queue");
    assert_eq!(taken.message_count() as usize, TASKS * EACH / 2);
    connection.close(200, "done".into()).await.ok();
}
