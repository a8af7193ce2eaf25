//! Brute-force protection for password logins, shared by every protocol of a node: failures
//! are counted per client address and per account; each failure slows the next answer, and
//! too many within a window lock the address or account out for a while.
//!
//! Counts are per node (a guesser spreading over nodes gets the limit once per node); they are
//! kept in memory with a bound on the number of tracked keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses and accounts tracked at once (each map); beyond it new keys are not
/// tracked until old entries expire.
const TRACKED_KEYS_MAX: usize = 100_000;

/// Brute-force protection for every protocol that takes passwords.
#[derive(Clone, Debug)]
pub struct AuthLimits {
    /// Failures from one client address within `window` before it is locked out.
    pub failures_per_ip_max: u32,
    /// Failures for one account within `window` before it is locked out.
    pub failures_per_account_max: u32,
    pub window: Duration,
    pub lockout: Duration,
    /// Each earlier failure delays the next answer by this much (up to `delay_max`).
    pub delay_step: Duration,
    pub delay_max: Duration,
}

impl Default for AuthLimits {
    fn default() -> AuthLimits {
        AuthLimits {
            failures_per_ip_max: 10,
            failures_per_account_max: 5,
            window: Duration::from_secs(600),
            lockout: Duration::from_secs(900),
            delay_step: Duration::from_millis(500),
            delay_max: Duration::from_secs(4),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead, after waiting this long (zero when there were no recent failures).
    Allow(Duration),
    /// Locked out: answer "try again later" without checking the password.
    Refuse,
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

#[derive(Debug)]
pub struct AuthThrottle {
    limits: AuthLimits,
    by_ip: Mutex<HashMap<IpAddr, Entry>>,
    by_account: Mutex<HashMap<String, Entry>>,
}

impl AuthThrottle {
    pub fn new(limits: AuthLimits) -> AuthThrottle {
        AuthThrottle {
            limits,
            by_ip: Mutex::new(HashMap::new()),
            by_account: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a login attempt from `ip` for `account` may be checked, and after what delay.
    pub fn check(&self, ip: IpAddr, account: &str, now: Instant) -> Verdict {
        let ip_failures = Self::current(&self.by_ip, &ip, now);
        let account_failures = Self::current(&self.by_account, &account.to_lowercase(), now);
        match (ip_failures, account_failures) {
            (None, _) | (_, None) => Verdict::Refuse,
            (Some(a), Some(b)) => {
                let delay = self.limits.delay_step.saturating_mul(a.max(b));
                Verdict::Allow(delay.min(self.limits.delay_max))
            }
        }
    }

    pub fn failure(&self, ip: IpAddr, account: &str, now: Instant) {
        let limits = &self.limits;
        Self::record(&self.by_ip, ip, limits.failures_per_ip_max, limits, now);
        let account = account.to_lowercase();
        let max = limits.failures_per_account_max;
        Self::record(&self.by_account, account, max, limits, now);
    }

    /// A successful login forgets the account's failures (not the address's: one valid
    /// password must not reset a guesser trying many accounts).
    pub fn success(&self, account: &str) {
        lock(&self.by_account).remove(&account.to_lowercase());
    }

    /// Recent failures of `key`, or `None` when it is locked out.
    fn current<K: std::hash::Hash + Eq>(
        map: &Mutex<HashMap<K, Entry>>,
        key: &K,
        now: Instant,
    ) -> Option<u32> {
        match lock(map).get(key) {
            None => Some(0),
            Some(e) if e.locked_until.is_some_and(|t| now < t) => None,
            Some(e) if e.locked_until.is_some() => Some(0),
            Some(e) => Some(e.failures),
        }
    }

    fn record<K: std::hash::Hash + Eq>(
        map: &Mutex<HashMap<K, Entry>>,
        key: K,
        max: u32,
        limits: &AuthLimits,
        now: Instant,
    ) {
        let mut map = lock(map);
        if map.len() >= TRACKED_KEYS_MAX && !map.contains_key(&key) {
            map.retain(|_, e| match e.locked_until {
                Some(t) => now < t,
                None => now.duration_since(e.window_start) < limits.window,
            });
            if map.len() >= TRACKED_KEYS_MAX {
                return;
            }
        }
        let entry = map.entry(key).or_insert(Entry {
            failures: 0,
            window_start: now,
            locked_until: None,
        });
        let expired_lock = entry.locked_until.is_some_and(|t| now >= t);
        if expired_lock || now.duration_since(entry.window_start) >= limits.window {
            *entry = Entry {
                failures: 0,
                window_start: now,
                locked_until: None,
            };
        }
        entry.failures += 1;
        if entry.failures >= max {
            entry.locked_until = Some(now + limits.lockout);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AuthLimits {
        AuthLimits {
            failures_per_ip_max: 4,
            failures_per_account_max: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(120),
            delay_step: Duration::from_millis(100),
            delay_max: Duration::from_millis(250),
        }
    }

    // Goal: failures slow the next attempt, then lock the account out until the lockout ends.
    #[test]
    fn account_slowed_then_locked_then_released() {
        let t = AuthThrottle::new(limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        assert_eq!(t.check(ip, "a@x", now), Verdict::Allow(Duration::ZERO));
        t.failure(ip, "a@x", now);
        assert_eq!(
            t.check(ip, "A@x", now),
            Verdict::Allow(Duration::from_millis(100))
        );
        t.failure(ip, "a@x", now);
        assert_eq!(
            t.check(ip, "a@x", now),
            Verdict::Allow(Duration::from_millis(200))
        );
        t.failure(ip, "a@x", now);
        assert_eq!(t.check(ip, "a@x", now), Verdict::Refuse);
        // Another account from another address is not affected.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(t.check(other, "b@x", now), Verdict::Allow(Duration::ZERO));
        let later = now + Duration::from_secs(121);
        assert_eq!(t.check(other, "a@x", later), Verdict::Allow(Duration::ZERO));
    }

    // Goal: one address guessing many accounts is locked out by its own count.
    #[test]
    fn address_locked_across_accounts() {
        let t = AuthThrottle::new(limits());
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let now = Instant::now();
        for i in 0..4 {
            t.failure(ip, &format!("user{i}@x"), now);
        }
        assert_eq!(t.check(ip, "fresh@x", now), Verdict::Refuse);
        t.success("fresh@x");
        assert_eq!(t.check(ip, "fresh@x", now), Verdict::Refuse);
    }
}
