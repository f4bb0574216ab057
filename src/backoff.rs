//! The one retry policy: a delay that doubles after each failure, up to a cap,
//! and starts over after a success. Every wait-and-retry loop in the worker
//! (reconnecting, start-up, transient database errors, unconfirmed replies,
//! locked items) uses it with its own first delay and cap.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// How long the next wait would be, without counting a failure.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// The delay to wait now; the one after it is twice as long, up to the cap.
    pub fn fail(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| backoff.fail()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(backoff.peek(), ms(500));
        backoff.reset();
        assert_eq!(backoff.fail(), ms(100));
    }
}
