//! IMAP on every node, checked with Python's imaplib (and raw sockets), curl and mbsync
//! against a multi-process cluster.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::*;
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 8;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/imap_client.py");

fn python(scenario: &str, args: serde_json::Value) -> serde_json::Value {
    last_json(&python_scenario("imap_client.py", scenario, &args))
}

/// A Python scenario running in the background, talked to line by line.
struct Background {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Background {
    fn start(scenario: &str, args: serde_json::Value) -> Background {
        let mut child = Command::new("python3")
            .args([SCRIPT, scenario, &args.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        Background { child, stdout }
    }

    /// The next line the scenario prints (empty when it ended).
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn say(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the scenario to end; its last JSON line.
    fn finish(mut self) -> serde_json::Value {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "scenario failed:\n{rest}");
        last_json(&rest)
    }
}

fn deliver_tags(c: &Cluster, user: &str, tags: &[&str]) {
    for tag in tags {
        let body = format!(
            "Subject: {tag}\r\nFrom: Sender <sender@example.test>\r\nTo: {user}\r\n\r\nbody of {tag}\r\n"
        );
        c.deliver(c.any(), &[user], body.as_bytes(), tag)
            .expect("delivered");
    }
}

#[test]
fn imap_commands_bad_input_and_curl() {
    // Goal: the RFC 3501 command set and the extensions behave as specified when driven by
    // imaplib through STARTTLS on one node; malformed input gets BAD/NO and changes
    // nothing; curl reads a message over IMAPS on another node.
    let _g = serial();
    let c = Cluster::start(3, PARTITIONS, 5000, 1);
    let user = "user0@example.test";
    deliver_tags(&c, user, &["alpha-tag", "bravo-tag", "charlie-tag"]);
    let result = python(
        "basics",
        json!({ "imap": c.listener(2, "imap"), "user": user, "password": "pw",
                "tags": ["alpha-tag", "bravo-tag", "charlie-tag"] }),
    );
    let mut count = result["count"].as_u64().unwrap();
    // A malformed, deeply nested MIME message.
    let mut evil =
        String::from("Subject: nested\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n");
    for i in 1..2000 {
        evil.push_str(&format!(
            "--b{}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n",
            i - 1
        ));
    }
    evil.push_str("unterminated (((\r\n");
    c.deliver(c.any(), &[user], evil.as_bytes(), "evil")
        .expect("delivered");
    count += 1;
    python(
        "bad_input",
        json!({ "imaps": c.listener(3, "imaps"), "user": user, "password": "pw", "count": count }),
    );
    // A header of three stored pieces (each piece is at most 60 KiB): headers-only reads
    // must go on past the first piece, and stop at the empty line.
    let mut header = String::from("Subject: big header\r\nFrom: a@example.test\r\n");
    for i in 0..1800 {
        header.push_str(&format!("X-Filler-{i:04}: {}\r\n", "f".repeat(80)));
    }
    header.push_str("X-Last: at-the-end\r\n\r\n");
    assert!(header.len() > 2 * storage::chunk::CHUNK_BYTES_MAX);
    let whole = format!("{header}the body\r\n\r\nwith an empty line\r\n");
    c.deliver(c.any(), &[user], whole.as_bytes(), "big-header")
        .expect("delivered");
    let nodes: Vec<String> = (1..=3).map(|n| c.listener(n, "imaps")).collect();
    // Too long for an argument: the scenario reads the message from a file.
    let file = c.root.path().join("big-header.eml");
    std::fs::write(&file, &whole).unwrap();
    let hits = |c: &Cluster| {
        metric_sum(
            c,
            "mailgrid_imap_header_cache_lookups_total{result=\"hit\"}",
        )
    };
    let hits_before = hits(&c);
    python(
        "big_header",
        json!({ "nodes": nodes, "user": user, "password": "pw", "message": file,
                "header_len": header.len(), "last": "at-the-end" }),
    );
    // Each node's second look at the header (FETCH after SEARCH, and the second round) is
    // answered by its cache: at least 4 lookups per node.
    assert!(
        hits(&c) >= hits_before + 12,
        "{hits_before} -> {}",
        hits(&c)
    );
    assert!(metric_sum(&c, "mailgrid_imap_header_cache_bytes") > 3 * header.len() as u64);
    match Command::new("curl").arg("--version").output() {
        Err(_) => eprintln!("SKIPPED curl check: curl is not installed"),
        Ok(_) => {
            // curl 7.x reads ";UID=" as a sequence number; a custom command is unambiguous.
            let url = format!("imaps://{}/INBOX", c.listener(1, "imaps"));
            let fetch = format!("UID FETCH {} BODY.PEEK[TEXT]", result["appended_uid"]);
            let out = Command::new("curl")
                .args(["-sSk", "--max-time", "30", &url, "-X", &fetch])
                .args(["-u", "user0@example.test:pw"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // curl shows the untagged answer's first line: the literal holds "appended body\r\n".
            let expected = format!("UID {} BODY[TEXT] {{15}}", result["appended_uid"]);
            assert!(text.contains(&expected), "{text}");
        }
    }
}

#[test]
fn sessions_on_different_nodes_see_each_others_changes_and_idle_sees_deliveries() {
    // Goal: a flag change and an expunge made through node 2 reach a session on node 1 at
    // its next command; a session in IDLE on node 1 gets EXISTS for a delivery through
    // node 3.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 1);
    let user = "user0@example.test";
    deliver_tags(&c, user, &["one", "two"]);
    let mut watcher = Background::start(
        "watch",
        json!({ "first": c.listener(1, "imaps"), "second": c.listener(2, "imaps"),
                "user": user, "password": "pw" }),
    );
    assert_eq!(watcher.line(), "idling");
    let node3 = c.node(3).data().to_string();
    c.deliver(
        &node3,
        &[user],
        b"Subject: during idle\r\n\r\nhello\r\n",
        "idle",
    )
    .expect("delivered");
    let result = watcher.finish();
    eprintln!("IDLE saw the delivery after {}s", result["exists_after"]);
}

#[test]
fn over_quota_refuses_append_and_copy_but_reading_and_deleting_work() {
    // Goal: RFC 9208 QUOTA: APPEND and COPY over quota are refused with [OVERQUOTA]; the
    // user still logs in, reads, deletes and expunges, after which APPEND works again.
    let _g = serial();
    let c = Cluster::start(3, PARTITIONS, 5000, 1);
    let user = "user0@example.test";
    for tag in ["q1", "q2"] {
        let body = format!("Subject: {tag}\r\n\r\n{}\r\n", "x".repeat(1000));
        c.deliver(c.any(), &[user], body.as_bytes(), tag)
            .expect("delivered");
    }
    // Room for one more copy of one message, not of both.
    c.admin(&["quota", "set", user, "--bytes", "3500"]);
    python(
        "quota",
        json!({ "imaps": c.listener(1, "imaps"), "user": user, "password": "pw", "bytes": 8000 }),
    );
}

#[test]
fn a_select_with_nothing_new_to_claim_as_recent_writes_nothing() {
    // Goal: SELECT claims \Recent with a replicated write only when some message is
    // unclaimed; clients that re-select a mailbox every few minutes cost no commit.
    let _g = serial();
    let c = Cluster::start(3, PARTITIONS, 5000, 1);
    let user = "user0@example.test";
    deliver_tags(&c, user, &["r1", "r2"]);
    let group = service::router::partition_of(user, PARTITIONS) as u64 + 1;
    // Once leadership settled on the preferred replica (the placement's first): a transfer
    // appends an entry too.
    let leader = c.wait_healthy(3)["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == group)
        .unwrap()["placement"][0]
        .as_u64()
        .unwrap();
    eventually(
        std::time::Duration::from_secs(60),
        "leadership settled",
        || (c.leader_of_user(user, PARTITIONS) == leader).then_some(()),
    );
    let applied = || -> u64 {
        let s = c.status_via(c.any()).expect("status");
        s["views"][leader.to_string()]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group)
            .unwrap()["last_applied"]
            .as_u64()
            .unwrap()
    };
    let select = |node: u64| {
        python(
            "uids",
            json!({ "imaps": c.listener(node, "imaps"), "user": user, "password": "pw" }),
        )
    };
    assert_eq!(select(1)["recent"], 2);
    let before = applied();
    assert_eq!(select(2)["recent"], 0);
    assert_eq!(select(3)["recent"], 0);
    assert_eq!(applied(), before, "a SELECT with nothing to claim wrote");
    deliver_tags(&c, user, &["r3"]);
    assert_eq!(select(3)["recent"], 1);
    assert_eq!(applied(), before + 2, "the delivery and the claim");
}

#[test]
fn a_session_survives_its_partition_leader_dying_with_the_same_uids() {
    // Goal: a session on a surviving node keeps working after the leader of its user's
    // partition is killed (after a short wait, never a wrong answer); UIDVALIDITY and UIDs
    // are the same through every node before and after.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 2);
    let user = "user1@example.test";
    deliver_tags(&c, user, &["f1", "f2", "f3"]);
    c.wait_healthy(3);
    let leader = c.leader_of_user(user, PARTITIONS);
    let survivors: Vec<u64> = [1u64, 2, 3].into_iter().filter(|n| *n != leader).collect();
    let before: Vec<serde_json::Value> = [1u64, 2, 3]
        .iter()
        .map(|n| {
            python(
                "uids",
                json!({ "imaps": c.listener(*n, "imaps"), "user": user, "password": "pw" }),
            )
        })
        .collect();
    let same = |a: &serde_json::Value, b: &serde_json::Value| {
        a["validity"] == b["validity"] && a["uids"] == b["uids"]
    };
    assert!(before.windows(2).all(|w| same(&w[0], &w[1])), "{before:?}");
    let mut held = Background::start(
        "hold",
        json!({ "imaps": c.listener(survivors[0], "imaps"), "user": user, "password": "pw",
                "seconds": 30 }),
    );
    assert_eq!(held.line(), "selected");
    c.node(leader).kill9();
    held.say("go");
    let result = held.finish();
    assert_eq!(result["before"], result["after"]);
    let after = python(
        "uids",
        json!({ "imaps": c.listener(survivors[1], "imaps"), "user": user, "password": "pw" }),
    );
    assert_eq!(after["validity"], before[0]["validity"]);
    let mut expected: Vec<u64> = before[0]["uids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_u64().unwrap())
        .collect();
    // The session appended one message after the failover; it got the next UID.
    expected.push(expected.last().unwrap() + 1);
    let got: Vec<u64> = after["uids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_u64().unwrap())
        .collect();
    assert_eq!(got, expected);
}

/// Runs mbsync with `config`; its output on failure.
/// Runs a client program; its output, as an error when it failed.
fn client(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The messages in a maildir folder: (path, content).
fn maildir(dir: &std::path::Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            out.push((
                e.path(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            ));
        }
    }
    out
}

/// How a maildir client is told to delete a message.
enum LocalDelete {
    /// Mark it trashed (maildir flag `T`).
    Flag,
    /// Remove its file.
    Remove,
}

/// A real maildir-syncing client (`sync` runs one synchronisation into `local`) pulls every
/// folder of a user holding "sync-one/two/three"; then a message drafted locally, a flag set
/// locally on "sync-one" and the local deletion of "sync-two" are pushed back, and the
/// cluster holds exactly that afterwards, through other nodes.
fn check_two_way_sync(
    c: &Cluster,
    user: &str,
    local: &std::path::Path,
    delete: LocalDelete,
    sync: impl Fn() -> Result<String, String>,
) {
    sync().unwrap_or_else(|e| panic!("first sync failed:\n{e}"));
    let inbox = maildir(&local.join("INBOX"));
    assert_eq!(inbox.len(), 3, "{inbox:?}");
    for folder in ["Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(
            local.join(folder).join("cur").is_dir(),
            "{folder} not synced"
        );
    }
    std::fs::write(
        local.join("Drafts/new/1700000000.1_1.local"),
        "Subject: drafted locally\r\nFrom: user0@example.test\r\n\r\nlocal body\r\n",
    )
    .unwrap();
    for (path, content) in &inbox {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let base = name.split(":2,").next().unwrap();
        let cur = local.join("INBOX/cur");
        if content.contains("sync-one") {
            std::fs::rename(path, cur.join(format!("{base}:2,F"))).unwrap();
        } else if content.contains("sync-two") {
            match delete {
                LocalDelete::Flag => {
                    std::fs::rename(path, cur.join(format!("{base}:2,T"))).unwrap()
                }
                LocalDelete::Remove => std::fs::remove_file(path).unwrap(),
            }
        }
    }
    sync().unwrap_or_else(|e| panic!("second sync failed:\n{e}"));
    let left = c.fetch(c.any(), user);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|(_, b)| !b.contains("sync-two")),
        "{left:?}"
    );
    let result = python(
        "folder",
        json!({ "imaps": c.listener(1, "imaps"), "user": user, "password": "pw", "folder": "Drafts" }),
    );
    assert!(
        result["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "drafted locally"),
        "{result}"
    );
    let flagged = python(
        "flagged",
        json!({ "imaps": c.listener(3, "imaps"), "user": user, "password": "pw" }),
    );
    assert_eq!(flagged["subjects"], json!(["sync-one"]));
}

fn host_port(addr: &str) -> (String, String) {
    addr.rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap()
}

#[test]
fn mbsync_syncs_a_mailbox_both_ways() {
    // Goal: mbsync (isync) over port 143 pulls every folder and pushes back a new message,
    // a flag and a deletion (flagged T locally).
    let _g = serial();
    if Command::new("mbsync").arg("--version").output().is_err() {
        eprintln!("SKIPPED: mbsync (isync) is not installed");
        return;
    }
    let c = Cluster::start_with(3, PARTITIONS, 5000, 1, "[imap]\nauth_without_tls = true\n");
    let user = "user0@example.test";
    deliver_tags(&c, user, &["sync-one", "sync-two", "sync-three"]);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("mail");
    std::fs::create_dir_all(&local).unwrap();
    let (host, port) = host_port(&c.listener(2, "imap"));
    let config = dir.path().join("mbsyncrc");
    std::fs::write(
        &config,
        format!(
            "IMAPAccount mg\nHost {host}\nPort {port}\nUser {user}\nPass pw\nSSLType None\nAuthMechs LOGIN\n\n\
             IMAPStore remote\nAccount mg\n\n\
             MaildirStore local\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\nExpunge Both\nSyncState *\n",
            local = local.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    check_two_way_sync(&c, user, &local, LocalDelete::Flag, || {
        client("mbsync", &["-c", config, "-a"])
    });
}

#[test]
fn offlineimap_syncs_a_mailbox_both_ways() {
    // Goal: offlineimap over implicit TLS (993, checking the node's certificate) pulls every
    // folder and pushes back a new message (found again by its APPENDUID), a flag and a
    // deletion (the local file removed).
    let _g = serial();
    if Command::new("offlineimap")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: offlineimap is not installed");
        return;
    }
    let mut c = Cluster::start(3, PARTITIONS, 5000, 1);
    let user = "user0@example.test";
    deliver_tags(&c, user, &["sync-one", "sync-two", "sync-three"]);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("mail");
    std::fs::create_dir_all(&local).unwrap();
    let (_, port) = host_port(&c.listener(2, "imaps"));
    let cert = std::path::Path::new(c.node(2).data()).join("tls/server.pem");
    let config = dir.path().join("offlineimaprc");
    std::fs::write(
        &config,
        format!(
            "[general]\naccounts = mg\nmetadata = {meta}\n\n\
             [Account mg]\nlocalrepository = local\nremoterepository = remote\n\n\
             [Repository local]\ntype = Maildir\nlocalfolders = {local}\n\n\
             [Repository remote]\ntype = IMAP\nremotehost = localhost\nremoteport = {port}\n\
             ssl = yes\nsslcacertfile = {cert}\nremoteuser = {user}\nremotepass = pw\n",
            meta = dir.path().join("meta").display(),
            local = local.display(),
            cert = cert.display(),
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    check_two_way_sync(&c, user, &local, LocalDelete::Remove, || {
        client("offlineimap", &["-c", config, "-o", "-u", "basic"])
    });
}

/// A line-level IMAP client over TLS that trusts the node's own (self-signed) certificate:
/// the transcript tests see every byte the server sends.
struct Transcript {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    tag: u32,
}

impl Transcript {
    fn connect(addr: &str, node_dir: &str) -> Transcript {
        use rustls::pki_types::pem::PemObject;
        let pem = std::path::Path::new(node_dir).join("tls/server.pem");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&pem).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let mut t = Transcript {
            tls: rustls::StreamOwned::new(conn, tcp),
            tag: 0,
        };
        let greeting = t.line();
        assert!(greeting.starts_with("* OK"), "{greeting}");
        t
    }

    fn line(&mut self) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8];
        while !line.ends_with(b"\r\n") {
            std::io::Read::read_exact(&mut self.tls, &mut byte).unwrap();
            line.push(byte[0]);
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).unwrap()
    }

    /// Sends `command` (with a fresh tag; `{n+}` literals go inline) and returns every line
    /// up to and including the tagged one, with the tag replaced by `T`.
    fn run(&mut self, command: &str) -> Vec<String> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        let wire = format!("{tag} {command}\r\n");
        std::io::Write::write_all(&mut self.tls, wire.as_bytes()).unwrap();
        std::io::Write::flush(&mut self.tls).unwrap();
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                lines.push(format!("T {rest}"));
                return lines;
            }
            lines.push(line);
        }
    }

    /// Runs `command` and checks its answer line by line against `expected`.
    fn expect(&mut self, command: &str, expected: &[&str]) {
        let got = self.run(command);
        assert_eq!(got, expected, "answer to {command:?}");
    }

    /// Appends `body` to `mailbox` with a LITERAL+ literal; the APPENDUID UID.
    fn append(&mut self, mailbox: &str, body: &str) -> u32 {
        let got = self.run(&format!("APPEND {mailbox} {{{}+}}\r\n{body}", body.len()));
        let last = got.last().unwrap();
        assert!(last.starts_with("T OK [APPENDUID "), "{got:?}");
        last.split_whitespace()
            .nth(4)
            .unwrap()
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }
}

#[test]
fn condstore_and_qresync_transcript() {
    // Goal: exact server output for RFC 7162: MODSEQ in FETCH and STORE, UNCHANGEDSINCE with
    // [MODIFIED], CHANGEDSINCE, VANISHED on expunge, VANISHED (EARLIER) from the expunge
    // history, and from the listing once the history no longer reaches back (an expunge of
    // more messages than the history keeps); SELECT (QRESYNC ...) with and without known
    // UIDs. Driven through node 2, which is not necessarily the partition leader.
    let _g = serial();
    let mut c = Cluster::start(3, PARTITIONS, 5000, 1);
    let addr = c.listener(2, "imaps");
    let dir = c.node(2).data().to_string();
    let mut s = Transcript::connect(&addr, &dir);
    let login = s.run("LOGIN user0@example.test pw");
    assert!(login.last().unwrap().starts_with("T OK"), "{login:?}");
    s.expect(
        "ENABLE QRESYNC",
        &["* ENABLED QRESYNC", "T OK ENABLE completed"],
    );
    for i in 1..=3 {
        let uid = s.append("INBOX", &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"));
        assert_eq!(uid, i);
    }
    // A new mailbox starts at MODSEQ 1; each APPEND adds one.
    let select = s.run("SELECT INBOX");
    let validity: u32 = select
        .iter()
        .find_map(|l| l.strip_prefix("* OK [UIDVALIDITY "))
        .and_then(|rest| rest.split(']').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(select.contains(&"* 3 EXISTS".to_string()), "{select:?}");
    assert!(
        select.contains(&"* OK [HIGHESTMODSEQ 4] highest".to_string()),
        "{select:?}"
    );
    assert_eq!(select.last().unwrap(), "T OK [READ-WRITE] SELECT completed");
    s.expect(
        "STORE 1 (UNCHANGEDSINCE 4) +FLAGS (\\Flagged)",
        &[
            "* 1 FETCH (FLAGS (\\Flagged \\Recent) MODSEQ (5))",
            "T OK STORE completed",
        ],
    );
    s.expect(
        "UID STORE 1:2 (UNCHANGEDSINCE 4) +FLAGS.SILENT (\\Seen)",
        &[
            "* 2 FETCH (UID 2 MODSEQ (6))",
            "T OK [MODIFIED 1] conditional STORE failed for some messages",
        ],
    );
    s.expect(
        "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 4)",
        &[
            "* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) MODSEQ (5))",
            "* 2 FETCH (UID 2 FLAGS (\\Seen \\Recent) MODSEQ (6))",
            "T OK UID FETCH completed",
        ],
    );
    // UID EXPUNGE (RFC 4315) removes only named messages that are \Deleted.
    s.expect("UID EXPUNGE 2", &["T OK EXPUNGE completed"]);
    // With CONDSTORE enabled, even .SILENT reports the new MODSEQ (RFC 7162 §3.1.3).
    s.expect(
        "UID STORE 2 +FLAGS.SILENT (\\Deleted)",
        &["* 2 FETCH (UID 2 MODSEQ (7))", "T OK STORE completed"],
    );
    s.expect(
        "UID EXPUNGE 2:3",
        &["* VANISHED 2", "T OK EXPUNGE completed"],
    );
    s.expect(
        "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)",
        &[
            "* VANISHED (EARLIER) 2",
            "* 1 FETCH (UID 1 FLAGS (\\Flagged \\Recent) MODSEQ (5))",
            "* 2 FETCH (UID 3 FLAGS (\\Recent) MODSEQ (4))",
            "T OK UID FETCH completed",
        ],
    );
    // Reopening with what the client knew before the expunge.
    s.expect(
        &format!("SELECT INBOX (QRESYNC ({validity} 4 1:3))"),
        &[
            "* OK [CLOSED] previous mailbox closed",
            "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
            "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags",
            "* 2 EXISTS",
            "* 0 RECENT",
            "* OK [UNSEEN 1] first unseen",
            &format!("* OK [UIDVALIDITY {validity}] UIDs valid"),
            "* OK [UIDNEXT 4] predicted next UID",
            "* OK [HIGHESTMODSEQ 8] highest",
            "* VANISHED (EARLIER) 2",
            "* 1 FETCH (UID 1 FLAGS (\\Flagged) MODSEQ (5))",
            "T OK [READ-WRITE] SELECT completed",
        ],
    );
    // 1024 messages by doubling with COPY, then one expunge of all of them: more than the
    // expunge history keeps, so the store forgets them individually.
    s.expect("CREATE Bulk", &["T OK CREATE completed"]);
    s.append("Bulk", "Subject: bulk\r\n\r\nbulk\r\n");
    let bulk = s.run("SELECT Bulk");
    let bulk_validity: u32 = bulk
        .iter()
        .find_map(|l| l.strip_prefix("* OK [UIDVALIDITY "))
        .and_then(|rest| rest.split(']').next())
        .unwrap()
        .parse()
        .unwrap();
    for round in 1..=10 {
        let got = s.run("COPY 1:* Bulk");
        assert!(got.last().unwrap().starts_with("T OK [COPYUID "), "{got:?}");
        let exists = format!("* {} EXISTS", 1 << round);
        assert!(got.contains(&exists), "{got:?}");
    }
    let stored = s.run("STORE 1:* +FLAGS.SILENT (\\Deleted)");
    assert_eq!(stored.len(), 1025, "{:?}", stored.last());
    s.expect(
        "UID EXPUNGE 1:*",
        &["* VANISHED 1:1024", "T OK EXPUNGE completed"],
    );
    s.append("Bulk", "Subject: after\r\n\r\nafter\r\n");
    // A client that knew the mailbox at MODSEQ 2 (just the first message) learns that every
    // UID it could know is gone, computed from the listing.
    let reopened = s.run(&format!("SELECT Bulk (QRESYNC ({bulk_validity} 2))"));
    assert!(
        reopened.contains(&"* VANISHED (EARLIER) 1:1024".to_string()),
        "{reopened:?}"
    );
    assert!(reopened.contains(&"* 1 EXISTS".to_string()), "{reopened:?}");
    // Limited to the UIDs the client names.
    let reopened = s.run(&format!(
        "SELECT Bulk (QRESYNC ({bulk_validity} 2 5,7:9,2000))"
    ));
    assert!(
        reopened.contains(&"* VANISHED (EARLIER) 5,7:9".to_string()),
        "{reopened:?}"
    );
    s.expect("LOGOUT", &["* BYE logging out", "T OK LOGOUT completed"]);
}
