//! SMTP on every node, checked with real clients (Python's smtplib and raw sockets, in
//! tests/smtp_client.py) against a multi-process cluster, and the stored result read back
//! through the cluster.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 8;

/// Limits the scenarios rely on (small, so the cold paths run quickly).
const SMTP_CONFIG: &str = "[smtp]\nrecipients_max = 20\nconnections_per_ip_max = 12\nerrors_max = 10\ntls_handshake_timeout_s = 2\n[auth]\nfailures_per_ip_max = 100\nfailures_per_account_max = 3\ndelay_step_ms = 50\n";

/// Runs a scenario of tests/smtp_client.py; panics with its output when it fails.
fn python(scenario: &str, args: serde_json::Value) -> String {
    python_scenario("smtp_client.py", scenario, &args)
}

fn bodies(c: &Cluster, user: &str) -> Vec<String> {
    c.fetch(c.any(), user).into_iter().map(|(_, b)| b).collect()
}

fn count_containing(c: &Cluster, user: &str, tag: &str) -> usize {
    bodies(c, user).iter().filter(|b| b.contains(tag)).count()
}

#[test]
fn mx_submission_and_submissions_deliver_and_refuse_per_the_rfcs() {
    // Goal: every node accepts mail for every user on 25, submission needs TLS then AUTH and
    // an owned sender, aliases expand, unknown users and unauthenticated relaying are refused
    // (authenticated users relay through the queue), and what was
    // acknowledged is stored (with trace headers) in the right mailboxes.
    let _g = serial();
    let c = Cluster::start_with(3, PARTITIONS, 5000, 4, SMTP_CONFIG);
    c.admin(&[
        "alias",
        "add",
        "team@example.test",
        "user2@example.test",
        "user3@example.test",
    ]);
    c.admin(&["alias", "add", "sales@example.test", "user0@example.test"]);
    python(
        "basics",
        json!({
            "mx": c.listener(2, "smtp"),
            "submission": c.listener(3, "submission"),
            "submissions": c.listener(1, "submissions"),
            "to": ["user0@example.test", "user1@example.test"],
            "alias_rcpt": "team@example.test",
            "alias_sender": "sales@example.test",
            "message": "Subject: inbound\r\n\r\ninbound-tag\r\n",
            "submitted": "Subject: submitted\r\n\r\nsubmitted-tag\r\n",
        }),
    );
    for user in ["user0", "user1", "user2", "user3"] {
        let user = format!("{user}@example.test");
        let got = bodies(&c, &user);
        let inbound: Vec<&String> = got.iter().filter(|b| b.contains("inbound-tag")).collect();
        assert_eq!(inbound.len(), 1, "{user}: {got:?}");
        assert!(inbound[0].starts_with("Return-Path: <sender@remote.test>\r\nReceived: from client.test ([127.0.0.1])\r\n\tby mx.example.test (mailgrid) with ESMTP id "), "{}", inbound[0]);
    }
    let user1 = bodies(&c, "user1@example.test");
    let submitted: Vec<&String> = user1
        .iter()
        .filter(|b| b.contains("submitted-tag"))
        .collect();
    assert_eq!(submitted.len(), 1, "{user1:?}");
    assert!(submitted[0].contains("with ESMTPSA id"), "{}", submitted[0]);
    assert!(submitted[0].contains("\tfor <user1@example.test>;"));
    assert_eq!(count_containing(&c, "user1@example.test", "from alias"), 1);
}

#[test]
fn bad_input_gets_the_rfc_replies_and_stores_nothing_unacknowledged() {
    // Goal: garbage, long lines, NUL, bare LF, oversize data, too many recipients or
    // connections and too many errors get their RFC replies; pipelining and CHUNKING work;
    // STARTTLS discards plaintext pipelined after it; only acknowledged mail is stored.
    let _g = serial();
    let c = Cluster::start_with(2, PARTITIONS, 5000, 1, SMTP_CONFIG);
    c.admin(&["limits", "--message-bytes-max", "200000"]);
    python(
        "bad_input",
        json!({
            "mx": c.listener(1, "smtp"),
            "submissions": c.listener(2, "submissions"),
            "mx_node_submissions": c.listener(1, "submissions"),
            "limit": 200000,
            "recipients_max": 20,
            "errors_max": 10,
            "per_ip_max": 12,
            "pipelined_tag": "pipelined-tag",
            "bare_tag": "bare-tag",
            "big_tag": "big-tag",
            "chunk_tag": "chunk-tag",
        }),
    );
    let user = "user0@example.test";
    assert_eq!(count_containing(&c, user, "pipelined-tag"), 1);
    assert_eq!(count_containing(&c, user, "chunk-tag"), 1);
    assert!(bodies(&c, user)
        .iter()
        .any(|b| b.ends_with("chunk-tag\r\n.not stuffed\r\n")));
    assert_eq!(count_containing(&c, user, "bare-tag"), 0);
    assert_eq!(count_containing(&c, user, "big-tag"), 0);
    assert_eq!(bodies(&c, user).len(), 2);
}

#[test]
fn repeated_auth_failures_lock_the_account_out() {
    // Goal: after the configured number of failures an account is refused with 454 4.7.0,
    // even with the right password, while the lockout lasts.
    let _g = serial();
    let c = Cluster::start_with(1, PARTITIONS, 5000, 1, SMTP_CONFIG);
    python(
        "brute_force",
        json!({ "submissions": c.listener(1, "submissions"), "failures_max": 3 }),
    );
}

/// A minimal SMTP client for steps that must interleave with faults.
struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    fn connect(addr: &str) -> Smtp {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Smtp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        assert_eq!(c.reply().0, 220);
        c
    }

    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(line.len() >= 4, "short reply {line:?}");
            all.push_str(&line);
            if line.as_bytes()[3] == b' ' {
                return (line[..3].parse().unwrap(), all);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        self.reply()
    }

    /// EHLO, MAIL, RCPT; returns once the server is ready for DATA.
    fn envelope(&mut self, from: &str, to: &str) {
        assert_eq!(self.cmd("EHLO client.test").0, 250);
        assert_eq!(self.cmd(&format!("MAIL FROM:<{from}>")).0, 250);
        let rcpt = self.cmd(&format!("RCPT TO:<{to}>"));
        assert_eq!(rcpt.0, 250, "{rcpt:?}");
    }

    fn data(&mut self, message: &str) -> (u16, String) {
        assert_eq!(self.cmd("DATA").0, 354);
        self.writer.write_all(message.as_bytes()).unwrap();
        self.cmd(".")
    }
}

#[test]
fn no_quorum_is_451_and_retries_store_one_copy_that_survives_a_leader_kill() {
    // Goal: a message is acknowledged only once committed: without a quorum the end of DATA
    // gets 451 4.3.0; the sender's retries of the same message leave exactly one copy; a 250
    // survives kill -9 of the partition leader, and mail sent meanwhile is accepted.
    let _g = serial();
    let mut c = Cluster::start_with(3, PARTITIONS, 5000, 2, SMTP_CONFIG);
    let user = "user0@example.test";
    let message = "Subject: once\r\nMessage-ID: <once@remote.test>\r\n\r\nonce-tag\r\n";
    let mx1 = c.listener(1, "smtp");

    let mut s = Smtp::connect(&mx1);
    s.envelope("sender@remote.test", user);
    let paused: Vec<i32> = [2u64, 3].iter().map(|&n| c.node(n).pid()).collect();
    for pid in &paused {
        signal(*pid, "STOP");
    }
    let (code, text) = s.data(message);
    for pid in &paused {
        signal(*pid, "CONT");
    }
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.3.0"), "{text}");
    c.wait_healthy(3);

    // The sender retries through another node, twice (its first 250 was "lost").
    let mx2 = c.listener(2, "smtp");
    for _ in 0..2 {
        let mut s = Smtp::connect(&mx2);
        s.envelope("sender@remote.test", user);
        let (code, text) = s.data(message);
        assert_eq!(code, 250, "{text}");
    }
    assert_eq!(count_containing(&c, user, "once-tag"), 1);

    // Acknowledged, then the partition's leader dies: every survivor still has it.
    let leader = c.leader_of_user(user, PARTITIONS);
    let via = [1u64, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let mut s = Smtp::connect(&c.listener(via, "smtp"));
    s.envelope("other@remote.test", user);
    let (code, text) = s.data("Subject: survives\r\n\r\nsurvivor-tag\r\n");
    assert_eq!(code, 250, "{text}");
    c.node(leader).kill9();
    // While the node is down, mail through a survivor is accepted (after the election).
    let mut s = Smtp::connect(&c.listener(via, "smtp"));
    s.envelope("other@remote.test", user);
    let (code, text) = s.data("Subject: meanwhile\r\n\r\nmeanwhile-tag\r\n");
    assert_eq!(code, 250, "{text}");
    for n in [1u64, 2, 3].into_iter().filter(|n| *n != leader) {
        let data = c.node(n).data().to_string();
        let got = eventually(Duration::from_secs(30), "read after leader kill", || {
            let out = run(&["admin", "--data", &data, "fetch", user], None);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        assert_eq!(got.matches("survivor-tag").count(), 1, "node {n}: {got}");
        assert_eq!(got.matches("meanwhile-tag").count(), 1, "node {n}: {got}");
        assert_eq!(got.matches("once-tag").count(), 1, "node {n}: {got}");
    }
}

#[test]
fn swaks_delivers_through_mx_starttls_submission_and_implicit_tls() {
    // Goal: swaks, a widely used SMTP test client, works against every listener: plain MX
    // with pipelining, 587 with STARTTLS + AUTH PLAIN, 465 with implicit TLS + AUTH LOGIN.
    if Command::new("swaks").arg("--version").output().is_err() {
        eprintln!("SKIPPED: swaks is not installed (scripts/test installs it with apt-get)");
        return;
    }
    let _g = serial();
    let c = Cluster::start_with(2, PARTITIONS, 5000, 2, SMTP_CONFIG);
    let mx = c.listener(1, "smtp");
    let submission = c.listener(2, "submission");
    let submissions = c.listener(1, "submissions");
    swaks(&[
        "--server",
        &mx,
        "--from",
        "a@remote.test",
        "--to",
        "user0@example.test",
        "--pipeline",
        "--body",
        "swaks-mx-tag",
    ]);
    let auth = [
        "--auth-user",
        "user0@example.test",
        "--auth-password",
        "pw",
        "--from",
        "user0@example.test",
        "--to",
        "user1@example.test",
    ];
    let mut args = vec![
        "--server",
        &submission,
        "--tls",
        "--auth",
        "PLAIN",
        "--body",
        "swaks-587-tag",
    ];
    args.extend_from_slice(&auth);
    let transcript = swaks(&args);
    assert!(
        transcript.contains("250 2.0.0 Ok: stored as"),
        "{transcript}"
    );
    let mut args = vec![
        "--server",
        &submissions,
        "--tls-on-connect",
        "--auth",
        "LOGIN",
        "--body",
        "swaks-465-tag",
    ];
    args.extend_from_slice(&auth);
    swaks(&args);
    assert_eq!(
        count_containing(&c, "user0@example.test", "swaks-mx-tag"),
        1
    );
    assert_eq!(
        count_containing(&c, "user1@example.test", "swaks-587-tag"),
        1
    );
    assert_eq!(
        count_containing(&c, "user1@example.test", "swaks-465-tag"),
        1
    );
}

/// One whole transaction; returns the first refusal (code, reply) or the final reply.
fn transaction(
    addr: &str,
    from: &str,
    to: &str,
    size_param: Option<usize>,
    message: &str,
) -> (u16, String) {
    let mut s = Smtp::connect(addr);
    assert_eq!(s.cmd("EHLO client.test").0, 250);
    let mail = match size_param {
        Some(n) => format!("MAIL FROM:<{from}> SIZE={n}"),
        None => format!("MAIL FROM:<{from}>"),
    };
    let r = s.cmd(&mail);
    if r.0 != 250 {
        return r;
    }
    let r = s.cmd(&format!("RCPT TO:<{to}>"));
    if r.0 != 250 {
        return r;
    }
    s.data(message)
}

fn message_of(tag: &str, bytes: usize) -> String {
    let mut m = format!("Subject: {tag}\r\n\r\n{tag}\r\n");
    while m.len() < bytes {
        m.push_str(&"q".repeat(78));
        m.push_str("\r\n");
    }
    m
}

#[test]
fn quotas_refuse_at_rcpt_or_end_of_data_and_usage_stays_exact() {
    // Goal: user quotas (messages, bytes), a domain quota and per-domain message size limits
    // refuse mail with the right codes at RCPT (when SIZE tells) or at the end of DATA; an
    // over-quota user can still log in; usage equals the bytes stored.
    let _g = serial();
    let c = Cluster::start_with(3, PARTITIONS, 5000, 2, SMTP_CONFIG);
    let mx = c.listener(3, "smtp");
    let from = "sender@remote.test";

    // Per-user message count.
    c.admin(&["quota", "set", "user0@example.test", "--messages", "2"]);
    for i in 0..2 {
        let r = transaction(
            &mx,
            from,
            "user0@example.test",
            None,
            &message_of(&format!("count{i}"), 100),
        );
        assert_eq!(r.0, 250, "{r:?}");
    }
    let r = transaction(
        &mx,
        from,
        "user0@example.test",
        None,
        &message_of("count2", 100),
    );
    assert!(r.1.starts_with("452 4.2.2"), "{r:?}");
    python(
        "login",
        json!({ "submissions": c.listener(1, "submissions"), "user": "user0@example.test", "password": "pw" }),
    );

    // Per-user bytes: SIZE= over the remaining room is refused at RCPT; without SIZE the
    // message is refused when it is stored.
    c.admin(&["quota", "set", "user1@example.test", "--bytes", "3000"]);
    let r = transaction(
        &mx,
        from,
        "user1@example.test",
        None,
        &message_of("bytes1", 1500),
    );
    assert_eq!(r.0, 250, "{r:?}");
    let r = transaction(
        &mx,
        from,
        "user1@example.test",
        Some(1500),
        &message_of("bytes2", 1500),
    );
    assert!(r.1.starts_with("452 4.2.2"), "{r:?}");
    let r = transaction(
        &mx,
        from,
        "user1@example.test",
        None,
        &message_of("bytes3", 1500),
    );
    assert!(r.1.starts_with("552 5.2.2"), "{r:?}");

    // A domain quota counts every mailbox of the domain, across partitions.
    c.admin(&["domain", "add", "other.test"]);
    for u in ["a", "b", "c", "d"] {
        c.admin(&[
            "user",
            "add",
            &format!("{u}@other.test"),
            "--password",
            "pw",
        ]);
    }
    c.admin(&["domain", "limits", "other.test", "--quota-bytes", "4000"]);
    let r = transaction(&mx, from, "a@other.test", None, &message_of("dom1", 1500));
    assert_eq!(r.0, 250, "{r:?}");
    let r = transaction(&mx, from, "b@other.test", None, &message_of("dom2", 1500));
    assert_eq!(r.0, 250, "{r:?}");
    let r = transaction(&mx, from, "c@other.test", None, &message_of("dom3", 1500));
    assert!(
        r.1.starts_with("552 5.2.2") || r.1.starts_with("452 4.2.2"),
        "{r:?}"
    );
    let r = transaction(
        &mx,
        from,
        "d@other.test",
        Some(1500),
        &message_of("dom4", 1500),
    );
    assert!(r.1.starts_with("452 4.2.2"), "{r:?}");

    // The domain's own size limit, below the cluster's.
    c.admin(&[
        "domain",
        "limits",
        "other.test",
        "--quota-bytes",
        "0",
        "--message-bytes-max",
        "1000",
    ]);
    let r = transaction(
        &mx,
        from,
        "c@other.test",
        Some(1500),
        &message_of("big1", 1500),
    );
    assert!(r.1.starts_with("552 5.3.4"), "{r:?}");
    let r = transaction(&mx, from, "c@other.test", None, &message_of("big2", 1500));
    assert!(r.1.starts_with("552 5.3.4"), "{r:?}");
    let r = transaction(&mx, from, "c@other.test", None, &message_of("small", 500));
    assert_eq!(r.0, 250, "{r:?}");

    // Usage is exactly what is stored.
    for user in [
        "user0@example.test",
        "user1@example.test",
        "a@other.test",
        "c@other.test",
    ] {
        let stored: usize = bodies(&c, user).iter().map(|b| b.len()).sum();
        let shown = c.admin(&["quota", "show", user]);
        assert!(
            shown.contains(&format!(": {stored} of ")),
            "{user}: {shown} vs {stored}"
        );
    }
    assert_eq!(bodies(&c, "user0@example.test").len(), 2);
    assert_eq!(bodies(&c, "user1@example.test").len(), 1);
    assert_eq!(bodies(&c, "b@other.test").len(), 1);
    assert_eq!(bodies(&c, "d@other.test").len(), 0);
    let domains = c.admin(&["domain", "list"]);
    let other = domains
        .lines()
        .find(|l| l.starts_with("other.test"))
        .unwrap();
    let total: usize = ["a", "b", "c", "d"]
        .iter()
        .flat_map(|u| bodies(&c, &format!("{u}@other.test")))
        .map(|b| b.len())
        .sum();
    assert!(
        other.contains(&format!("used {total} of unlimited bytes")),
        "{other}"
    );
}
