//! The retry schedule for recoverable errors, after Azure Site Recovery: wait 1, 2, 4,
//! 8 and 10 units, then every 30 units. The unit is a minute in production and can be
//! set to milliseconds so tests run the real schedule quickly.

use std::time::Duration;

const STEPS: [u32; 5] = [1, 2, 4, 8, 10];
const STEADY: u32 = 30;

#[derive(Clone, Copy, Debug)]
pub struct RetrySchedule {
    pub unit: Duration,
}

impl RetrySchedule {
    /// The wait before retry number `attempt` (1 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let units = STEPS
            .get(attempt.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(STEADY);
        self.unit * units
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_asr_schedule() {
        let s = RetrySchedule {
            unit: Duration::from_millis(1),
        };
        let waits: Vec<u128> = (1..=8).map(|a| s.delay(a).as_millis()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 30, 30, 30]);
    }
}
