//! Golden files of every type that crosses the wire between nodes or reaches the disk.
//!
//! For each release there is a directory `tests/golden/VERSION/` holding
//! - `formats.json`: the serde format of every such type (field names and order, variant
//!   names and order, element types), traced with `serde-reflection`;
//! - `samples.json`: for each type, encoded samples (the bytes `storage::codec::encode`
//!   writes, in hex, with the value they hold as JSON): one per variant of an enum, one value
//!   otherwise.
//!
//! The tests fail when a type changes while the workspace version stays the same (the traced
//! formats differ from the current version's files), and when any sample of any earlier
//! release no longer decodes: a change to a stored record or a wire message needs a new
//! version and, if old bytes no longer read, a migration.
//!
//! Recording: `MAILGRID_BLESS_GOLDEN=1 cargo test --test golden` writes the current version's
//! files. It refuses to overwrite a version CHANGELOG.md lists as released.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_reflection::{Registry, Samples, Tracer, TracerConfig};
use storage::codec;

/// One recorded sample: the encoded bytes (hex) and the value they hold, as JSON (so a
/// sample that still decodes but means something else — reordered variants or fields of one
/// type — is noticed too).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Sample {
    hex: String,
    value: serde_json::Value,
}

impl Sample {
    fn of<T: Serialize>(value: &T) -> Sample {
        Sample {
            hex: hex::encode(codec::encode(value)),
            value: serde_json::to_value(value).expect("a sample renders as JSON"),
        }
    }
}

/// Decodes a sample as the named type; the value encoded again, and as JSON.
type Recode = fn(&[u8]) -> Result<(Vec<u8>, serde_json::Value), String>;

fn recode<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
) -> Result<(Vec<u8>, serde_json::Value), String> {
    let value: T = codec::decode(bytes).map_err(|e| e.to_string())?;
    let json = serde_json::to_value(&value).map_err(|e| e.to_string())?;
    Ok((codec::encode(&value), json))
}

/// What one run of the tracer found: the formats, and per type its samples and decoder.
struct Traced {
    registry: Registry,
    samples: BTreeMap<String, Vec<Sample>>,
    decoders: BTreeMap<String, Recode>,
}

struct Run {
    tracer: Tracer,
    samples: BTreeMap<String, Vec<Sample>>,
    decoders: BTreeMap<String, Recode>,
}

impl Run {
    fn trace<T: Serialize + DeserializeOwned>(&mut self, name: &str) {
        let (_, values) = self
            .tracer
            .trace_type::<T>(&Samples::new())
            .unwrap_or_else(|e| panic!("tracing {name}: {e}"));
        let encoded = values.iter().map(Sample::of).collect();
        self.samples.insert(name.to_string(), encoded);
        self.decoders.insert(name.to_string(), recode::<T>);
    }
}

/// Every wire message and stored record, by the path a reader finds it at.
fn trace_all() -> Traced {
    let mut run = Run {
        tracer: Tracer::new(TracerConfig::default()),
        samples: BTreeMap::new(),
        decoders: BTreeMap::new(),
    };
    macro_rules! trace {
        ($($t:ty),* $(,)?) => {
            $(run.trace::<$t>(stringify!($t));)*
        };
    }
    // Stored records of a partition, and the commands and answers of its log.
    trace!(
        storage::types::Uid,
        storage::types::UidValidity,
        storage::types::ModSeq,
        storage::types::BodyHash,
        storage::partition::Quota,
        storage::partition::Usage,
        storage::partition::Account,
        storage::partition::Alias,
        storage::partition::Mailbox,
        storage::partition::MessageRecord,
        storage::partition::BodyMeta,
        storage::partition::OnceRecord,
        storage::partition::DeliveryKeyRecord,
        storage::partition::MaildropLock,
        storage::partition::FlagOp,
        storage::partition::PartitionCommand,
        storage::partition::PartitionResponse,
        storage::partition::MailError,
        storage::partition::RecipientOutcome,
        storage::partition::QueueEntry,
        storage::partition::QueueRecipient,
        storage::partition::RecipientState,
        storage::partition::AttemptOutcome,
        storage::partition::QueueAction,
    );
    // The meta state's records, commands and answers.
    trace!(
        storage::meta::ClusterInfo,
        storage::meta::NodeRecord,
        storage::meta::PartitionRecord,
        storage::meta::NodeSettings,
        storage::meta::NodeRole,
        storage::meta::DomainLimits,
        storage::meta::ClusterLimits,
        storage::meta::Domain,
        storage::meta::DkimKey,
        storage::meta::MetaCommand,
        storage::meta::MetaResponse,
        storage::meta::MetaError,
        storage::Command,
        storage::Response,
    );
    // The raft log and its marks, and what nodes say to each other about groups.
    trace!(
        raft::types::NodeAddr,
        raft::types::LogId,
        raft::types::Vote,
        raft::types::EntryPayload,
        raft::types::Entry,
        raft::types::StoredMembership,
        raft::types::SnapshotMeta,
        raft::network::Request,
        raft::network::DataProgress,
        raft::liveness::Beat,
        raft::host::GroupError,
        raft::host::GroupStatus,
        raft::host::MoveStats,
    );
    // Requests between nodes and from commands, and their answers.
    trace!(
        service::api::ServiceRequest,
        service::api::JoinRequest,
        service::api::JoinAccepted,
        service::api::Query,
        service::api::Lookup,
        service::api::Vanished,
        service::api::QueryResult,
        service::api::ClientRequest,
        service::api::ClientReply,
        service::api::QueueOp,
        service::node::JoinToken,
    );
    Traced {
        registry: run.tracer.registry().expect("every enum variant traced"),
        samples: run.samples,
        decoders: run.decoders,
    }
}

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn current_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Whether CHANGELOG.md lists `version` as released (a `## VERSION — DATE` heading).
fn released(version: &str) -> bool {
    let changelog =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("CHANGELOG.md"))
            .expect("CHANGELOG.md is readable");
    changelog.lines().any(|line| {
        line.strip_prefix("## ")
            .and_then(|rest| rest.strip_prefix(version))
            .is_some_and(|rest| {
                let date = rest.trim_start_matches([' ', '—', '-']).trim();
                date.len() == 10 && date.chars().all(|c| c.is_ascii_digit() || c == '-')
            })
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (record it with MAILGRID_BLESS_GOLDEN=1)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes the current version's files when asked to, and never over a released version.
fn bless_if_asked(traced: &Traced) {
    if std::env::var_os("MAILGRID_BLESS_GOLDEN").is_none() {
        return;
    }
    let version = current_version();
    let dir = golden_root().join(version);
    assert!(
        !(dir.exists() && released(version)),
        "{version} is released (CHANGELOG.md): its golden files are frozen; raise the \
         workspace version and add its CHANGELOG section first"
    );
    std::fs::create_dir_all(&dir).expect("golden directory");
    let formats = serde_json::to_string_pretty(&traced.registry).expect("formats as JSON");
    std::fs::write(dir.join("formats.json"), formats + "\n").expect("formats.json written");
    let samples = serde_json::to_string_pretty(&traced.samples).expect("samples as JSON");
    std::fs::write(dir.join("samples.json"), samples + "\n").expect("samples.json written");
}

#[test]
fn formats_are_those_recorded_for_this_version() {
    // Goal: a wire or disk type cannot change while the version stays the same; the message
    // names the types whose format moved.
    let traced = trace_all();
    bless_if_asked(&traced);
    let dir = golden_root().join(current_version());
    let recorded: Registry = read_json(&dir.join("formats.json"));
    let mut changed = Vec::new();
    for (name, format) in &traced.registry {
        match recorded.get(name) {
            Some(old) if old == format => {}
            Some(_) => changed.push(format!("{name} changed")),
            None => changed.push(format!("{name} is new")),
        }
    }
    for name in recorded.keys() {
        if !traced.registry.contains_key(name) {
            changed.push(format!("{name} is gone"));
        }
    }
    assert!(
        changed.is_empty(),
        "formats differ from tests/golden/{}/formats.json: {changed:#?}\nA changed wire or \
         disk type needs the next version (Cargo.toml, CHANGELOG.md) and its golden files \
         (MAILGRID_BLESS_GOLDEN=1), and old samples must still decode.",
        current_version()
    );
    let samples: BTreeMap<String, Vec<Sample>> = read_json(&dir.join("samples.json"));
    assert_eq!(
        samples,
        traced.samples,
        "this version's samples encode differently from tests/golden/{}/samples.json",
        current_version()
    );
}

#[test]
fn every_release_s_samples_still_decode() {
    // Goal: bytes written by any release since 0.1.0 are read by this build, and for the
    // current release they read back to the very same bytes.
    let traced = trace_all();
    let mut versions: Vec<String> = std::fs::read_dir(golden_root())
        .expect("tests/golden exists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    versions.sort();
    assert!(
        versions.iter().any(|v| v == "0.1.0"),
        "the first release's samples are kept"
    );
    let mut failures = Vec::new();
    let mut decoded = 0;
    for version in &versions {
        let samples: BTreeMap<String, Vec<Sample>> =
            read_json(&golden_root().join(version).join("samples.json"));
        for (name, recorded) in &samples {
            let Some(recode) = traced.decoders.get(name) else {
                failures.push(format!("{version}: {name} has no decoder in this build"));
                continue;
            };
            for (i, sample) in recorded.iter().enumerate() {
                let bytes = hex::decode(&sample.hex).expect("hex sample");
                match recode(&bytes) {
                    Ok((again, value)) => {
                        decoded += 1;
                        if value != sample.value {
                            failures.push(format!(
                                "{version}: {name} #{i} decodes as {value} where {} was written",
                                sample.value
                            ));
                        }
                        if version == current_version() && again != bytes {
                            failures.push(format!("{version}: {name} #{i} re-encodes differently"));
                        }
                    }
                    Err(e) => failures.push(format!("{version}: {name} #{i}: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "golden samples: {failures:#?}");
    assert!(decoded >= traced.samples.len(), "decoded {decoded} samples");
}

#[test]
fn a_changed_type_is_noticed() {
    // Goal: the comparison above is not blind: a struct with one more field traces to a
    // different format, and bytes of the old layout do not decode as the new one.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Record {
        a: u64,
    }
    mod next {
        #[derive(serde::Serialize, serde::Deserialize)]
        pub struct Record {
            pub a: u64,
            pub b: u64,
        }
    }
    let mut old = Tracer::new(TracerConfig::default());
    old.trace_simple_type::<Record>().expect("trace");
    let mut new = Tracer::new(TracerConfig::default());
    new.trace_simple_type::<next::Record>().expect("trace");
    assert_ne!(
        old.registry().expect("old")["Record"],
        new.registry().expect("new")["Record"]
    );
    let bytes = codec::encode(&Record { a: 7 });
    assert!(codec::decode::<next::Record>(&bytes).is_err());
}
