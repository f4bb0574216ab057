//! One way to wait in a test: poll until a probe answers, or fail with a message
//! that says what was awaited and what the probe saw last.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// Polls `probe` every 50 ms until it returns `Ok`, and returns that value. Past
/// `timeout` the test fails, naming `what` and the last `Err` the probe gave.
pub async fn eventually<T, E, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: not within {timeout:?} (last seen: {last:?})"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub use qty_servers::wait_blocking;
