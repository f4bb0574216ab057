//! Removes a throwaway server even when the test process dies without running
//! destructors: a detached shell in its own session waits for the test process
//! to end, then runs the clean-up. After a normal drop it finds nothing left.

use std::process::{Command, Stdio};

/// Runs `cleanup`, a shell script that must be safe to run twice, once the test
/// process has ended, however it ended.
pub fn guard(cleanup: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    // setsid: Ctrl-C on the terminal signals the test's process group, not this.
    // --fork: setsid itself returns at once, leaving the watchdog to run alone.
    let started = Command::new("setsid")
        .args(["--fork", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start the clean-up watchdog");
    assert!(started.success(), "setsid failed: {started}");
}
