//! The delivery window (contract §5): requests set aside for an item locked
//! elsewhere must not hold the delivery slots everything else needs.
//!
//! RabbitMQ gives each consumer at most `prefetch` unacked deliveries, and a
//! changed `basic.qos` applies only to consumers started after it (quorum queues
//! have no channel-wide prefetch to raise instead). So when the requests set
//! aside have grown by a quarter of the prefetch, the worker cancels its
//! consumer and starts a fresh one on the same channel: the set-aside
//! deliveries stay unacked on the channel, in memory and in their order, but no
//! longer count against the new consumer's window. The old consumer's last
//! deliveries are handled before any of the new one's, so deliveries are still
//! registered (and acked) in tag order. Nothing is nacked or redelivered, so
//! per-item order, exactly-once and the delivery limit are untouched.
//!
//! Bounded: past `ceiling` set-aside requests the window is not widened again,
//! and set-aside requests hold slots as they used to (a warning says so), so
//! memory stays within about `ceiling` small requests plus the prefetch.

/// When to widen the window; pure, so its rule is tested without a broker.
#[derive(Debug)]
pub struct Window {
    step: usize,
    ceiling: usize,
    /// Set-aside requests when the window was last widened (or fewest since).
    baseline: usize,
    at_ceiling: bool,
}

/// What to do about the window now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Widen {
    No,
    /// Start a fresh consumer.
    Now,
    /// The ceiling was just reached: say so once.
    AtCeiling,
}

impl Window {
    pub fn new(prefetch: u16, ceiling: u32) -> Window {
        Window {
            step: (usize::from(prefetch) / 4).max(1),
            ceiling: ceiling as usize,
            baseline: 0,
            at_ceiling: false,
        }
    }

    /// Given how many requests are set aside now.
    pub fn check(&mut self, set_aside: usize) -> Widen {
        self.baseline = self.baseline.min(set_aside);
        if set_aside > self.ceiling {
            let first = !self.at_ceiling;
            self.at_ceiling = true;
            return if first { Widen::AtCeiling } else { Widen::No };
        }
        self.at_ceiling = false;
        if set_aside - self.baseline >= self.step {
            self.baseline = set_aside;
            Widen::Now
        } else {
            Widen::No
        }
    }

    /// A new session starts with a fresh consumer and nothing set aside on it.
    pub fn reset(&mut self) {
        self.baseline = 0;
        self.at_ceiling = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widens_each_time_a_quarter_of_the_prefetch_more_is_set_aside() {
        let mut window = Window::new(1000, 10_000);
        assert_eq!(window.check(0), Widen::No);
        assert_eq!(window.check(249), Widen::No);
        assert_eq!(window.check(250), Widen::Now);
        assert_eq!(window.check(400), Widen::No);
        assert_eq!(window.check(500), Widen::Now);
        // Drained to 100: growth is measured from there.
        assert_eq!(window.check(100), Widen::No);
        assert_eq!(window.check(349), Widen::No);
        assert_eq!(window.check(350), Widen::Now);
    }

    #[test]
    fn stops_widening_past_the_ceiling_and_says_so_once() {
        let mut window = Window::new(100, 60);
        assert_eq!(window.check(25), Widen::Now);
        assert_eq!(window.check(50), Widen::Now);
        assert_eq!(window.check(61), Widen::AtCeiling);
        assert_eq!(window.check(90), Widen::No);
        // Back under the ceiling, it widens again as before.
        assert_eq!(window.check(55), Widen::No);
        assert_eq!(window.check(10), Widen::No);
        assert_eq!(window.check(35), Widen::Now);
    }

    #[test]
    fn a_ceiling_of_zero_never_widens() {
        let mut window = Window::new(4, 0);
        assert_eq!(window.check(0), Widen::No);
        assert_eq!(window.check(1), Widen::AtCeiling);
        assert_eq!(window.check(5), Widen::No);
    }
}
