//! A worker running in-process, on a runtime thread of its own, stopped on drop.

use crate::WAIT;
use crate::eventually;
use crate::http::http_get;
use qty_worker::settings::Settings;
use std::net::SocketAddr;

/// Worker logs go to the test output when `RUST_LOG` is set, and nowhere otherwise.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init()
            .ok();
    }
}

/// A worker running in-process on its own runtime thread.
pub struct RunningWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    pub http_addr: SocketAddr,
}

impl RunningWorker {
    pub fn start(settings: Settings) -> RunningWorker {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("worker runtime");
            runtime.block_on(async move {
                let worker = qty_worker::Worker::build(settings).await?;
                ready_tx.send(worker.http_addr()).ok();
                worker
                    .run_until_stopped(async {
                        stopped.await.ok();
                    })
                    .await
            })
        });
        let http_addr = ready_rx
            .recv_timeout(WAIT)
            .expect("the worker did not build within the wait (database reachable?)");
        RunningWorker {
            stop: Some(stop),
            thread: Some(thread),
            http_addr,
        }
    }

    /// Waits until `/readyz` says the worker is consuming, so requests published
    /// from now on find the topology declared.
    pub async fn wait_until_ready(&self) {
        eventually("the worker to be ready", WAIT, || async {
            match http_get(self.http_addr, "/readyz").await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status}: {body}")),
            }
        })
        .await;
    }

    /// Asks the worker to stop and waits for it; returns what `run_until_stopped` returned.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        match self.thread.take() {
            Some(thread) => thread.join().expect("worker thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.stop().ok();
    }
}
