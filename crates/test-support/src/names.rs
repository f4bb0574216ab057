//! Names of a test's own: a database, an exchange and a queue with a random
//! suffix, on the shared servers or on servers of the test's own, and their
//! removal when the test ends.

use crate::amqp::connect_any;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use qty_servers::rabbitmq::{Cluster, Release};
use qty_worker::settings::{
    BrokerArgs, Connections, DatabaseArgs, ExchangeArg, QueueArg, Settings, WorkerSettings,
};
use sqlx::{Connection as _, PgConnection};
use uuid::Uuid;

/// The machine's RabbitMQ, which the tests share when `QTY_TEST_RABBITMQ` names
/// no other release.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker the tests of this process share: the machine's RabbitMQ on 5672,
/// or, when `QTY_TEST_RABBITMQ` names another release (`4.0`, `current`), one
/// node of that release started on a free port for this process. That node is
/// never dropped: the watchdog removes it when the process ends.
pub fn amqp_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| match Release::from_env() {
        Release::Machine => DEFAULT_AMQP_URL.to_owned(),
        release => {
            let node = Cluster::start_full(&release, 1, "", &[]);
            let url = node.urls();
            std::mem::forget(node);
            url
        }
    })
}

/// A fresh set of names for one test, and the servers they live on.
#[derive(Clone, Debug)]
pub struct Names {
    pub database: String,
    pub exchange: String,
    pub queue: String,
    /// `postgres://postgres@HOST:PORT`, without a database.
    pub postgres: String,
    /// The broker's URL, or several comma-separated (a cluster's nodes).
    pub amqp_url: String,
}

impl Names {
    /// Names on the servers at the default addresses.
    pub fn random() -> Names {
        let suffix = Uuid::new_v4().simple().to_string()[..12].to_owned();
        Names {
            database: format!("qtyw_test_{suffix}"),
            exchange: format!("qtyw-test-{suffix}"),
            queue: format!("qtyw-test-{suffix}.adjust"),
            postgres: "postgres://postgres@127.0.0.1:5432".into(),
            amqp_url: amqp_url().into(),
        }
    }

    /// Names on servers of the test's own (the fault suite's).
    pub fn on_own_servers(postgres: String, amqp_url: String) -> Names {
        Names {
            postgres,
            amqp_url,
            ..Names::random()
        }
    }

    /// A guard that removes these names when dropped, even when the test fails.
    pub fn removed_on_drop(&self) -> RemovedOnDrop {
        RemovedOnDrop(self.clone())
    }

    pub fn database_url(&self) -> String {
        format!("{}/{}", self.postgres, self.database)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            connections: Connections {
                broker: BrokerArgs {
                    amqp_url: self.amqp_url.clone(),
                    amqp_ca_file: None,
                },
                database: DatabaseArgs {
                    database_url: self.database_url(),
                },
                exchange: ExchangeArg {
                    exchange: self.exchange.clone(),
                },
                queue: QueueArg {
                    queue: self.queue.clone(),
                },
            },
            worker: WorkerSettings {
                prefetch: 32,
                threads: qty_worker::settings::DEFAULT_THREADS,
                http_addr: "127.0.0.1:0".parse().expect("valid address"),
                delivery_limit: 10,
                db_pool: 4,
                batch_max: 100,
                lock_wait_ms: qty_worker::settings::DEFAULT_LOCK_WAIT_MS,
                drain_secs: 10,
                publishers: None,
                migrate: qty_worker::settings::MigrateMode::Apply,
                partitions: None,
            },
        }
    }

    /// Deletes the test's queues, exchanges and database. Runs on its own runtime
    /// so it can be called from `Drop`.
    pub fn remove_all(&self) {
        let names = self.clone();
        run_apart(async move {
            if let Some(connection) = connect_any(&names.amqp_url).await
                && let Ok(channel) = connection.create_channel().await
            {
                let topology = qty_worker::broker::Topology::new(&names.exchange, &names.queue, 1);
                let queues = [
                    topology.queue,
                    topology.dead_letter_queue,
                    format!("{}.replies", names.queue),
                ];
                for queue in queues {
                    channel
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await
                        .ok();
                }
                for exchange in [topology.exchange, topology.dead_letter_exchange] {
                    channel
                        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                        .await
                        .ok();
                }
                connection.close(200, "test done".into()).await.ok();
            }
            if let Ok(mut admin) =
                PgConnection::connect(&format!("{}/postgres", names.postgres)).await
            {
                let drop = format!(
                    "drop database if exists \"{}\" with (force)",
                    names.database
                );
                sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut admin)
                    .await
                    .ok();
            }
        });
    }
}

/// Runs `cleanup` to its end on a runtime of its own, on a thread of its own:
/// for clean-up from `Drop`, which may run inside a test's runtime.
pub fn run_apart(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a clean-up runtime")
            .block_on(cleanup);
    });
    thread.join().ok();
}

/// Removes its names when dropped (see [`Names::removed_on_drop`]).
pub struct RemovedOnDrop(Names);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        self.0.remove_all();
    }
}
