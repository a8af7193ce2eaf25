//! Which formats this build speaks, and the cluster's active format.
//!
//! A *cluster format* is a number raised by a release that adds something an older binary
//! cannot read: a wire message or variant, a command variant in a raft log, a stored record
//! layout. Every node speaks a range of formats (`FORMAT_MIN..=FORMAT_MAX`). The meta state
//! holds the cluster's active format (absent: 1, the format of release 0.1.0); a node uses
//! what a format introduced only once the active format has reached it, so during a rolling
//! upgrade old and new binaries never send each other anything the other cannot decode. The
//! operator raises it with `mailgrid admin cluster upgrade-finish` once every node runs a
//! binary that speaks it; it never goes down.
//!
//! What each format introduced:
//! - 1 (0.1.0): everything in `tests/golden/0.1.0`.
//! - 2 (0.2.0): `MetaCommand::SetClusterFormat` and its record; `ServiceRequest::LocalVersion`
//!   (asked of peers whatever the format: an older node's refusal reads as "unknown").

/// The oldest cluster format this build reads and joins.
pub const FORMAT_MIN: u32 = 1;
/// The newest cluster format this build speaks.
pub const FORMAT_MAX: u32 = 2;
/// The active format of a cluster whose meta state has no format record.
pub const FORMAT_INITIAL: u32 = 1;

/// This binary's release (the workspace version).
pub const BINARY: &str = env!("CARGO_PKG_VERSION");

/// Why this build cannot serve a cluster whose active format is `active`, if it cannot.
pub fn unsupported(active: u32) -> Option<String> {
    (!(FORMAT_MIN..=FORMAT_MAX).contains(&active)).then(|| {
        format!(
            "the cluster's active format is {active}, and this binary (mailgrid {BINARY}) \
             speaks formats {FORMAT_MIN} to {FORMAT_MAX}: install a release that speaks format \
             {active}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_outside_the_range_is_refused_with_both_versions() {
        // Goal: the refusal names the cluster's format, this binary and the range it speaks.
        assert_eq!(unsupported(FORMAT_MAX), None);
        assert_eq!(unsupported(FORMAT_MIN), None);
        let why = unsupported(FORMAT_MAX + 1).expect("refused");
        assert!(
            why.contains(&format!("active format is {}", FORMAT_MAX + 1)),
            "{why}"
        );
        assert!(why.contains(BINARY), "{why}");
        assert!(
            why.contains(&format!("{FORMAT_MIN} to {FORMAT_MAX}")),
            "{why}"
        );
        assert!(unsupported(0).is_some());
    }
}
