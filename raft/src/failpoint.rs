//! Failpoints, for tests of how a node survives its own failures (supervision, recovery).
//!
//! `MAILGRID_FAILPOINTS="apply@5:1,apply@7:2"` makes the named point fail for group 5 once and
//! for group 7 twice, then never again. Unset, as in production, every check is one read of
//! an initialised `OnceLock` (no lock is taken). Points: `apply` (the state machine refuses
//! the next command entry: the group's raft core stops with a storage error); `transfer-lost`
//! (a leadership transfer request this node sends is dropped, as when its target dies).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

pub const ENV: &str = "MAILGRID_FAILPOINTS";

type Points = Mutex<BTreeMap<(String, u64), u32>>;

/// The armed failpoints; `None` when the variable is unset or arms nothing.
fn points() -> Option<&'static Points> {
    static POINTS: OnceLock<Option<Points>> = OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var(ENV).unwrap_or_default();
            let parsed = parse(&spec).unwrap_or_else(|e| {
                tracing::error!("{ENV} ignored: {e}");
                BTreeMap::new()
            });
            (!parsed.is_empty()).then(|| Mutex::new(parsed))
        })
        .as_ref()
}

/// Parses `name@group:count,...`.
pub fn parse(spec: &str) -> Result<BTreeMap<(String, u64), u32>, String> {
    let mut out = BTreeMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("{item:?} is not name@group:count");
        let (name, rest) = item.split_once('@').ok_or_else(bad)?;
        let (group, count) = rest.split_once(':').ok_or_else(bad)?;
        let group = group.parse().map_err(|_| bad())?;
        let count = count.parse().map_err(|_| bad())?;
        out.insert((name.to_string(), group), count);
    }
    Ok(out)
}

/// The failpoints armed for this process, as `name@group:count` (for a startup warning).
pub fn armed() -> Vec<String> {
    let Some(points) = points() else {
        return Vec::new();
    };
    let points = points.lock().expect("failpoints lock");
    points
        .iter()
        .map(|((name, group), count)| format!("{name}@{group}:{count}"))
        .collect()
}

/// Whether the point `name` fails now for `group` (consuming one of its failures).
pub fn fire(name: &str, group: u64) -> bool {
    let Some(points) = points() else {
        return false;
    };
    let mut points = points.lock().expect("failpoints lock");
    match points.get_mut(&(name.to_string(), group)) {
        Some(left) if *left > 0 => {
            *left -= 1;
            tracing::warn!(name, group, "failpoint fired");
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let p = parse("apply@5:1, apply@7:2").unwrap();
        assert_eq!(p.get(&("apply".into(), 5)), Some(&1));
        assert_eq!(p.get(&("apply".into(), 7)), Some(&2));
        assert!(parse("").unwrap().is_empty());
        let e = parse("apply5:1").unwrap_err();
        assert!(e.contains("apply5:1"), "{e}");
        assert!(parse("apply@x:1").is_err());
    }
}
