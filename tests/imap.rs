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
    assert!(before.windows(2).all(|w| w[0] == w[1]), "{before:?}");
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
fn mbsync(config: &std::path::Path) -> Result<String, String> {
    let out = Command::new("mbsync")
        .args(["-c"])
        .arg(config)
        .args(["-a"])
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

/// The messages in a maildir folder: (file name, content).
fn maildir(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            out.push((name, std::fs::read_to_string(e.path()).unwrap_or_default()));
        }
    }
    out
}

#[test]
fn mbsync_syncs_a_mailbox_both_ways() {
    // Goal: a real IMAP client (mbsync from isync) pulls every folder, then pushes back a
    // new message, a flag change and a deletion, which the cluster then holds.
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
    let (host, port) = c
        .listener(2, "imap")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
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
    mbsync(&config).unwrap_or_else(|e| panic!("first sync failed:\n{e}"));
    let inbox = maildir(&local.join("INBOX"));
    assert_eq!(inbox.len(), 3, "{inbox:?}");
    for folder in ["Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(
            local.join(folder).join("cur").is_dir(),
            "{folder} not synced"
        );
    }
    // Locally: a new message in Drafts, INBOX's "sync-one" flagged, "sync-two" deleted.
    std::fs::write(
        local.join("Drafts/new/1700000000.1_1.local"),
        "Subject: drafted locally\r\nFrom: user0@example.test\r\n\r\nlocal body\r\n",
    )
    .unwrap();
    for (name, content) in &inbox {
        let sub = if local.join("INBOX/cur").join(name).exists() {
            "cur"
        } else {
            "new"
        };
        let from = local.join("INBOX").join(sub).join(name);
        let base = name.split(":2,").next().unwrap();
        let flags = if content.contains("sync-one") {
            "F"
        } else if content.contains("sync-two") {
            "T"
        } else {
            continue;
        };
        std::fs::rename(
            &from,
            local.join("INBOX/cur").join(format!("{base}:2,{flags}")),
        )
        .unwrap();
    }
    mbsync(&config).unwrap_or_else(|e| panic!("second sync failed:\n{e}"));
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
