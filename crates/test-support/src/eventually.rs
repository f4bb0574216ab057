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

/// The blocking twin of [`eventually`], for set-up code outside a runtime: polls
/// `ready` for up to two minutes.
pub fn wait_blocking(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within two minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
