//! A budget for log lines that a publisher can cause in bulk: the first few in
//! each window are logged, the rest are counted and summed up once the window
//! ends, so a flood of bad requests cannot flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LogBudget {
    per_window: u32,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    started: Instant,
    logged: u32,
    suppressed: u32,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> LogBudget {
        LogBudget {
            per_window,
            window,
            state: Mutex::new(Window {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log one more line now, and how many lines the window before
    /// this one suppressed (to be mentioned in it), at `now`.
    pub fn take(&self, now: Instant) -> (bool, u32) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut suppressed_before = 0;
        if now.duration_since(state.started) >= self.window {
            suppressed_before = state.suppressed;
            *state = Window {
                started: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if state.logged < self.per_window {
            state.logged += 1;
            (true, suppressed_before)
        } else {
            state.suppressed += 1;
            (false, suppressed_before)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_what_was_cut_is_counted() {
        let budget = LogBudget::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let logged: Vec<bool> = (0..10).map(|_| budget.take(start).0).collect();
        assert_eq!(logged.iter().filter(|l| **l).count(), 3);
        assert_eq!(budget.take(start + Duration::from_secs(11)), (true, 7));
        assert_eq!(budget.take(start + Duration::from_secs(12)), (true, 0));
    }
}
