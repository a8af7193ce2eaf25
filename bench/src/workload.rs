//! SPECmail2001's workload model as the benches use it: the per-user rates, the message-size
//! and recipient-count tables, and a small seeded generator to draw from them. No I/O: the
//! runs that use it are `spec` and `smtp_load`.

use std::time::Duration;

/// The per-user rates.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// Messages a user sends a day.
    pub sent_per_day: f64,
    /// POP3 mailbox checks a user makes a day.
    pub checks_per_day: f64,
    /// The share of a day's sessions that falls in the busy hour.
    pub busy_hour_share: f64,
}

impl Profile {
    /// SMTP sessions (one message each) per second for `users` in the busy hour.
    pub fn smtp_per_sec(&self, users: usize) -> f64 {
        users as f64 * self.sent_per_day * self.busy_hour_share / 3600.0
    }

    pub fn checks_per_sec(&self, users: usize) -> f64 {
        users as f64 * self.checks_per_day * self.busy_hour_share / 3600.0
    }

    /// The SPECmail2001 metric for `users`: messages sent per minute in the busy hour.
    pub fn messages_per_minute(&self, users: usize) -> f64 {
        self.smtp_per_sec(users) * 60.0
    }
}

/// Message sizes in bytes with their weights: most messages are a few KB, a long tail reaches
/// a megabyte; mean about 23 KiB.
pub const SIZES: [(usize, f64); 9] = [
    (1 << 10, 0.45),
    (2 << 10, 0.13),
    (3 << 10, 0.08),
    (5 << 10, 0.095),
    (10 << 10, 0.09),
    (25 << 10, 0.07),
    (100 << 10, 0.065),
    (500 << 10, 0.015),
    (1000 << 10, 0.005),
];

/// Recipients per message with their weights; mean 2.
pub const RECIPIENTS: [(usize, f64); 7] = [
    (1, 0.70),
    (2, 0.10),
    (3, 0.06),
    (4, 0.04),
    (5, 0.03),
    (8, 0.04),
    (10, 0.03),
];

/// SplitMix64: a small seeded generator, so a level's arrivals and choices repeat with its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponential interval with `rate` events per second.
    pub fn interval(&mut self, rate: f64) -> Duration {
        Duration::from_secs_f64(-(1.0 - self.unit()).ln() / rate)
    }

    /// A Poisson-distributed count with mean `mean` (Knuth's method; small means only).
    pub fn poisson(&mut self, mean: f64) -> usize {
        let limit = (-mean).exp();
        let mut product = self.unit();
        let mut k = 0;
        while product > limit {
            k += 1;
            product *= self.unit();
        }
        k
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn weighted<T: Copy>(&mut self, table: &[(T, f64)]) -> T {
        let total: f64 = table.iter().map(|e| e.1).sum();
        let mut x = self.unit() * total;
        for (value, weight) in table {
            if x < *weight {
                return *value;
            }
            x -= weight;
        }
        table[table.len() - 1].0
    }
}

/// The mean of a weighted table.
pub fn mean(table: &[(usize, f64)]) -> f64 {
    let total: f64 = table.iter().map(|e| e.1).sum();
    table.iter().map(|(v, w)| *v as f64 * w).sum::<f64>() / total
}
