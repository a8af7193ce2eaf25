//! Outbound mail end to end with real parts: mail submitted for other domains is queued in the
//! cluster and delivered by the partition leaders to a real receiving MTA (aiosmtpd, in
//! tests/smtp_sink.py), found through a real DNS server (dnsmasq) answering MX and A records.
//! Postfix (a private instance) receives our mail too. Bounces arrive in the sender's INBOX;
//! the queue survives the death of its leader; DKIM signatures verify with dkimpy
//! (tests/dkim_verify.py).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: u32 = 4;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process killed when the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The system's Python, where Debian's python3-aiosmtpd is installed (a `python3` earlier on
/// the PATH, pyenv's say, does not see Debian's modules).
fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// What the test needs that may be missing on this machine, or `None` when all is there.
fn missing_tools() -> Option<String> {
    let dnsmasq = Path::new("/usr/sbin/dnsmasq").exists();
    let aiosmtpd = Command::new(system_python())
        .args(["-c", "import aiosmtpd"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let swaks = Command::new("swaks").arg("--version").output().is_ok();
    let dkimpy = Command::new(system_python())
        .args(["-c", "import dkim"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let missing: Vec<&str> = [
        (!dnsmasq).then_some("dnsmasq (dnsmasq-base)"),
        (!aiosmtpd).then_some("python3-aiosmtpd"),
        (!swaks).then_some("swaks"),
        (!dkimpy).then_some("python3-dkim"),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The receiving MTA: returns it and the port it listens on.
fn sink(out: &Path, args: &[&str]) -> (Reaped, u16) {
    let script = format!("{}/tests/smtp_sink.py", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(system_python())
        .arg(&script)
        .arg(out)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("sink did not start: {line:?}"));
    (Reaped(child), port)
}

/// dnsmasq answering for the test domains only:
/// far.test MX mx.far.test (127.0.0.1); nomx.test has an A record and no MX;
/// dead.test MX a host whose address refuses connections; stall.test MX 127.0.0.4 (where a
/// test may listen and never answer); pf.test MX 127.0.0.5 (Postfix); every other *.test
/// name is NXDOMAIN.
fn dns() -> (Reaped, u16) {
    for _ in 0..20 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("/usr/sbin/dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--pid-file=",
                "--user=root",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                &format!("--port={port}"),
                "--local=/test/",
                "--mx-host=far.test,mx.far.test,10",
                "--host-record=mx.far.test,127.0.0.1",
                "--host-record=nomx.test,127.0.0.1",
                "--mx-host=dead.test,mx.dead.test,10",
                "--host-record=mx.dead.test,127.0.0.3",
                "--mx-host=stall.test,mx.stall.test,10",
                "--host-record=mx.stall.test,127.0.0.4",
                "--mx-host=pf.test,mx.pf.test,10",
                "--host-record=mx.pf.test,127.0.0.5",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq runs");
        std::thread::sleep(Duration::from_millis(300));
        match child.try_wait().unwrap() {
            None => return (Reaped(child), port),
            // The port was taken between our probe and dnsmasq's bind: try another.
            Some(_) => continue,
        }
    }
    panic!("dnsmasq would not start");
}

fn events(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Messages the sink accepted for `rcpt`.
fn received(out: &Path, rcpt: &str) -> Vec<serde_json::Value> {
    events(out)
        .into_iter()
        .filter(|e| {
            e["event"] == "message" && e["rcpt_tos"].as_array().unwrap().iter().any(|r| r == rcpt)
        })
        .collect()
}

fn config(resolver: u16, port: u16, extra: &str) -> String {
    format!(
        "[outbound]\nresolver = \"127.0.0.1:{resolver}\"\nport = {port}\nretry_min_s = 1\nretry_max_s = 2\npoll_ms = 200\nconnect_timeout_s = 2\nreply_timeout_s = 60\n{extra}"
    )
}

/// Submits over 587 with STARTTLS and AUTH, as a mail client does.
fn submit(c: &Cluster, node: u64, from: &str, to: &[&str], subject: &str) -> String {
    let server = c.listener(node, "submission");
    let to = to.join(",");
    let subject = format!("Subject: {subject}");
    swaks(&[
        "--server",
        &server,
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        from,
        "--auth-password",
        "pw",
        "--from",
        from,
        "--to",
        &to,
        "--header",
        &subject,
        "--body",
        "outbound test body",
    ])
}

fn queue(c: &Cluster) -> Vec<serde_json::Value> {
    c.admin(&["queue", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn dsns(c: &Cluster, user: &str) -> Vec<String> {
    c.fetch(c.any(), user)
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| b.contains("multipart/report"))
        .collect()
}

/// What every test here starts with: the tools (or `None` after saying why it skips), the
/// lock that runs these tests one at a time, a directory, and the sink's event file in it.
fn setup() -> Option<(
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    PathBuf,
)> {
    if let Some(missing) = missing_tools() {
        eprintln!("SKIPPED: {missing} not installed (scripts/test installs them with apt-get)");
        return None;
    }
    let guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sink.jsonl");
    Some((guard, dir, out))
}

#[test]
fn remote_mail_is_delivered_retried_and_bounced_once() {
    // Goal: one submission to five remote recipients: the MX-routed, the A-routed (no MX) and
    // the greylisted (two 451s, then accepted) recipients receive it once each; the refused
    // (550), the nonexistent domain and the unreachable one (given up on at expiry) come back
    // to the sender as exactly one DSN naming those three; the queue ends empty.
    let Some((_g, dir, out)) = setup() else {
        return;
    };
    let (cert, key) = (dir.path().join("sink.crt"), dir.path().join("sink.key"));
    let pair = rcgen::generate_simple_self_signed(vec!["mx.far.test".to_string()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    let (_sink, port) = sink(
        &out,
        &["--defer-times", "2", "--tls", path(&cert), path(&key)],
    );
    let (_dns, resolver) = dns();
    let c = Cluster::start_with(
        3,
        PARTITIONS,
        5000,
        1,
        &config(resolver, port, "lifetime_s = 12\n"),
    );
    let record = c.admin(&["dkim", "generate", "example.test", "--selector", "mg1"]);
    assert!(
        record.starts_with("mg1._domainkey.example.test. IN TXT"),
        "{record}"
    );
    assert_eq!(c.admin(&["dkim", "show", "example.test"]), record);
    let transcript = submit(
        &c,
        2,
        "user0@example.test",
        &[
            "a@far.test",
            "x@nomx.test",
            "defer@far.test",
            "bounce@far.test",
            "y@nowhere.test",
            "z@dead.test",
        ],
        "outbound-1",
    );
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as"),
        "{transcript}"
    );
    for rcpt in ["a@far.test", "x@nomx.test", "defer@far.test"] {
        eventually(Duration::from_secs(60), &format!("{rcpt} receives"), || {
            (!received(&out, rcpt).is_empty()).then_some(())
        });
    }
    eventually(Duration::from_secs(90), "the queue drains", || {
        queue(&c).is_empty().then_some(())
    });
    for rcpt in ["a@far.test", "x@nomx.test", "defer@far.test"] {
        let got = received(&out, rcpt);
        assert_eq!(got.len(), 1, "{rcpt}: {got:?}");
        let data = got[0]["data"].as_str().unwrap();
        assert!(data.contains("Subject: outbound-1"), "{data}");
        assert!(
            data.contains("by mx.example.test"),
            "our Received: header: {data}"
        );
        assert!(
            !data.contains("Return-Path"),
            "Return-Path is the final MTA's: {data}"
        );
        assert_eq!(got[0]["mail_from"], "user0@example.test");
        assert_eq!(got[0]["tls"], true, "opportunistic STARTTLS was not used");
    }
    // The signature made at submission verifies with an independent implementation.
    let signed = received(&out, "a@far.test")[0]["data"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(signed.starts_with("DKIM-Signature:"), "{signed}");
    let file = dir.path().join("signed.eml");
    std::fs::write(&file, &signed).unwrap();
    let script = format!("{}/tests/dkim_verify.py", env!("CARGO_MANIFEST_DIR"));
    let verified = Command::new(system_python())
        .args([&script, path(&file), record.trim()])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "dkimpy: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // A changed body no longer verifies (the check can fail).
    std::fs::write(&file, signed.replace("outbound test body", "forged body")).unwrap();
    let forged = Command::new(system_python())
        .args([&script, path(&file), record.trim()])
        .output()
        .unwrap();
    assert!(!forged.status.success(), "a forged body verified");
    let defers = events(&out)
        .iter()
        .filter(|e| e["event"] == "rcpt" && e["address"] == "defer@far.test")
        .count();
    assert_eq!(defers, 3, "two deferrals then the accepted attempt");
    let bounces = dsns(&c, "user0@example.test");
    assert_eq!(bounces.len(), 1, "{bounces:?}");
    // The nodes' metrics tell the same story.
    assert_eq!(metric_sum(&c, "mailgrid_queue_entries"), 0);
    assert!(
        metric_sum(
            &c,
            "mailgrid_outbound_recipients_total{result=\"delivered\"}"
        ) >= 3
    );
    assert!(
        metric_sum(
            &c,
            "mailgrid_outbound_recipients_total{result=\"deferred\"}"
        ) >= 2
    );
    assert_eq!(metric_sum(&c, "mailgrid_outbound_bounces_total"), 1);
    let dsn = &bounces[0];
    for failed in ["bounce@far.test", "y@nowhere.test", "z@dead.test"] {
        assert!(
            dsn.contains(&format!("Final-Recipient: rfc822; {failed}")),
            "{dsn}"
        );
    }
    assert!(dsn.contains("Status: 5.1.1"), "{dsn}");
    assert!(dsn.contains("Return-Path: <>"), "{dsn}");
    assert!(
        !dsn.contains("Final-Recipient: rfc822; a@far.test"),
        "{dsn}"
    );
    assert!(dsn.contains("Subject: outbound-1"), "{dsn}");
}

#[test]
fn a_queue_entry_outlives_its_leader_and_obeys_the_operator() {
    // Goal: (1) killing the node delivering a queue entry (its partition's leader when the
    // attempt began) while the remote server has not answered yet loses nothing: the next
    // leader delivers it (at least once) and the queue drains with no bounce; (2) `admin
    // queue` lists, holds, retries and deletes entries, and a deleted entry is neither
    // delivered nor bounced.
    let Some((_g, _dir, out)) = setup() else {
        return;
    };
    // Slow enough that the kill below lands while the first attempt waits for its reply.
    let (_sink, port) = sink(&out, &["--slow-seconds", "10"]);
    let (_dns, resolver) = dns();
    let mut c = Cluster::start_with(3, PARTITIONS, 5000, 1, &config(resolver, port, ""));
    submit(
        &c,
        1,
        "user0@example.test",
        &["slow@far.test"],
        "outbound-2",
    );
    eventually(Duration::from_secs(30), "delivery starts", || {
        events(&out)
            .iter()
            .any(|e| e["event"] == "begin")
            .then_some(())
    });
    assert!(!queue(&c).is_empty(), "the entry is queued while in flight");
    // The node delivering it holds the connection to the sink (leadership may have moved
    // since the attempt began, so the current leader is not necessarily the one).
    let pid = delivering_pid(port).expect("a node is connected to the sink");
    let leader = c
        .nodes
        .iter()
        .find(|n| n.child.is_some() && n.pid() as u32 == pid)
        .expect("the connection belongs to a node")
        .id;
    c.node(leader).kill9();
    eventually(Duration::from_secs(60), "another node delivers", || {
        (received(&out, "slow@far.test").len() >= 2).then_some(())
    });
    eventually(Duration::from_secs(30), "the queue drains", || {
        queue(&c).is_empty().then_some(())
    });
    assert!(dsns(&c, "user0@example.test").is_empty());
    c.restart(leader);
    // Through a node that was not restarted (a restarted one listens on new ports).
    let via = if leader == 2 { 3 } else { 2 };

    // A destination that accepts connections and never answers holds only its own mail:
    // other destinations' mail keeps flowing meanwhile.
    let stall = std::net::TcpListener::bind(("127.0.0.4", port)).unwrap();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in stall.incoming().flatten() {
            held.push(conn);
            let _ = accepted_tx.send(());
        }
    });
    submit(&c, via, "user0@example.test", &["w@stall.test"], "stalled");
    accepted
        .recv_timeout(Duration::from_secs(30))
        .expect("the stalled destination is tried");
    submit(&c, via, "user0@example.test", &["quick@far.test"], "flows");
    eventually(
        Duration::from_secs(15),
        "other mail flows past the stall",
        || (!received(&out, "quick@far.test").is_empty()).then_some(()),
    );
    let stalled = queue(&c);
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert_eq!(stalled[0]["recipients"][0]["address"], "w@stall.test");
    assert_eq!(
        stalled[0]["attempts"], 0,
        "the stalled attempt is still waiting"
    );
    c.admin(&["queue", "delete", stalled[0]["id"].as_str().unwrap()]);

    // The operator's commands, on an entry that cannot be delivered (its MX refuses
    // connections, so it is retried until it expires).
    submit(
        &c,
        via,
        "user0@example.test",
        &["held@dead.test"],
        "outbound-3",
    );
    let entry = eventually(Duration::from_secs(30), "an attempt is made", || {
        queue(&c)
            .into_iter()
            .find(|e| e["attempts"].as_u64() >= Some(1))
    });
    let id = entry["id"].as_str().unwrap().to_string();
    assert_eq!(entry["recipients"][0]["state"], "pending");
    assert_eq!(
        metric_sum(&c, "mailgrid_queue_entries"),
        1,
        "queue size in metrics"
    );
    eventually(Duration::from_secs(10), "queue age in metrics", || {
        (metric_sum(&c, "mailgrid_queue_oldest_age_seconds") >= 1).then_some(())
    });
    assert!(
        entry["last_error"]
            .as_str()
            .unwrap()
            .contains("mx.dead.test"),
        "{entry}"
    );
    c.admin(&["queue", "hold", &id]);
    let held = queue(&c).pop().unwrap();
    assert_eq!(held["held"], true);
    let attempts = held["attempts"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        queue(&c).pop().unwrap()["attempts"].as_u64().unwrap(),
        attempts,
        "a held entry was attempted"
    );
    c.admin(&["queue", "retry", &id]);
    eventually(
        Duration::from_secs(30),
        "retry releases and attempts",
        || {
            let e = queue(&c).pop()?;
            (e["held"] == false && e["attempts"].as_u64()? > attempts).then_some(())
        },
    );
    let shown = c.admin(&["queue", "show", &id]);
    assert!(shown.contains("held@dead.test"), "{shown}");
    c.admin(&["queue", "delete", &id]);
    assert!(queue(&c).is_empty());
    let gone = run(&["admin", "--data", c.any(), "queue", "delete", &id], None);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no queue entry"));
    let bad = run(&["admin", "--data", c.any(), "queue", "hold", "xyz"], None);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a queue id"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        dsns(&c, "user0@example.test").is_empty(),
        "a deleted entry bounced"
    );
}

/// The process with an established connection to 127.0.0.1:`port` (from `ss`, iproute2).
fn delivering_pid(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established", "dst"])
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .expect("ss runs (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("pid=")? + 4;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`: (ca, cert, key).
fn signed_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} relay"));
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn a_smarthost_gets_the_mail_over_verified_tls_with_auth() {
    // Goal: with [outbound.relay], mail for any domain (even one DNS does not know) goes to
    // the smarthost over STARTTLS, with its certificate checked against the configured CA,
    // after AUTH; a second message moments later reuses the connection. A per-domain relay with a wrong password, and one whose certificate does
    // not chain to its CA, get nothing: the entries wait with the reason as their last error.
    let Some((_g, dir, out)) = setup() else {
        return;
    };
    let (ca, cert, key) = signed_certificate(dir.path(), "relay");
    let (other_ca, _, _) = signed_certificate(dir.path(), "other");
    let (_sink, port) = sink(
        &out,
        &[
            "--tls",
            path(&cert),
            path(&key),
            "--auth",
            "relayuser:relaypw",
        ],
    );
    let (_dns, resolver) = dns();
    let relay = |user: &str, password: &str, ca: &Path| {
        format!("host = \"127.0.0.1\"\nport = {port}\ntls = \"starttls\"\nuser = \"{user}\"\npassword = \"{password}\"\nca_file = \"{}\"\n", path(ca))
    };
    let extra = format!(
        "[outbound.relay]\n{}[outbound.domain_relays.\"badauth.test\"]\n{}[outbound.domain_relays.\"wrongca.test\"]\n{}",
        relay("relayuser", "relaypw", &ca),
        relay("relayuser", "wrong", &ca),
        relay("relayuser", "relaypw", &other_ca),
    );
    let c = Cluster::start_with(1, PARTITIONS, 5000, 1, &config(resolver, 1, &extra));
    submit(
        &c,
        1,
        "user0@example.test",
        &["someone@anywhere.test", "a@badauth.test", "b@wrongca.test"],
        "relayed",
    );
    let got = eventually(Duration::from_secs(30), "the smarthost receives", || {
        received(&out, "someone@anywhere.test").pop()
    });
    assert_eq!(got["tls"], true);
    assert_eq!(got["auth"], "relayuser");
    assert!(got["data"].as_str().unwrap().contains("Subject: relayed"));
    // The next message to the same relay, moments later, rides the same connection.
    submit(
        &c,
        1,
        "user0@example.test",
        &["other@anywhere.test"],
        "again",
    );
    let again = eventually(
        Duration::from_secs(30),
        "the second message arrives",
        || received(&out, "other@anywhere.test").pop(),
    );
    assert_eq!(
        again["peer"], got["peer"],
        "a new connection for the second message"
    );
    let pending = eventually(Duration::from_secs(30), "both refusals recorded", || {
        let entry = queue(&c).pop()?;
        let error = entry["last_error"].as_str()?.to_string();
        (error.contains("authentication failed") && error.contains("TLS failed")).then_some(entry)
    });
    let states: Vec<&str> = pending["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "pending", "delivered"], "{pending}");
    assert!(received(&out, "a@badauth.test").is_empty());
    assert!(received(&out, "b@wrongca.test").is_empty());
}

/// A private Postfix instance (Debian's package) receiving mail for pf.test on
/// 127.0.0.5:`port` with STARTTLS, delivering into a maildir under `dir`; stopped on drop.
struct Postfix {
    config: PathBuf,
    maildir: PathBuf,
}

impl Postfix {
    /// Why Postfix cannot run here, if it cannot.
    fn unavailable() -> Option<String> {
        if !Path::new("/usr/sbin/postfix").exists() {
            return Some("postfix is not installed (scripts/test installs it)".into());
        }
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Some("a Postfix instance needs root".into());
        }
        None
    }

    fn start(dir: &Path, port: u16) -> Postfix {
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, "postfix"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let root = dir.join("postfix");
        let config = root.join("etc");
        for d in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for d in ["data", "mail"] {
            let status = Command::new("chown")
                .args([&uid, path(&root.join(d))])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let pair = rcgen::generate_simple_self_signed(vec!["mx.pf.test".to_string()]).unwrap();
        std::fs::write(config.join("cert.pem"), pair.cert.pem()).unwrap();
        std::fs::write(config.join("key.pem"), pair.signing_key.serialize_pem()).unwrap();
        let r = path(&root);
        std::fs::write(
            config.join("main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {r}/spool\ndata_directory = {r}/data\n\
                 mail_owner = postfix\nmyhostname = mx.pf.test\nmydestination =\n\
                 inet_protocols = ipv4\nmynetworks = 127.0.0.0/8\n\
                 virtual_mailbox_domains = pf.test\nvirtual_mailbox_base = {r}/mail\n\
                 virtual_mailbox_maps = static:box/\nvirtual_uid_maps = static:{uid}\n\
                 virtual_gid_maps = static:{gid}\nvirtual_minimum_uid = 1\n\
                 smtpd_tls_cert_file = {r}/etc/cert.pem\nsmtpd_tls_key_file = {r}/etc/key.pem\n\
                 smtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\n\
                 maillog_file = {r}/maillog\nmaillog_file_prefixes = {r}\n"
            ),
        )
        .unwrap();
        let services = [
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "flush unix n - n 1000? 0 flush",
        ];
        std::fs::write(
            config.join("master.cf"),
            format!(
                "127.0.0.5:{port} inet n - n - - smtpd\n{}\n",
                services.join("\n")
            ),
        )
        .unwrap();
        let postfix = Postfix {
            maildir: root.join("mail/box/new"),
            config,
        };
        let out = postfix.control("start");
        assert!(
            out.status.success(),
            "postfix start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eventually(Duration::from_secs(30), "postfix listens", || {
            std::net::TcpStream::connect(("127.0.0.5", port)).ok()
        });
        postfix
    }

    fn control(&self, what: &str) -> std::process::Output {
        Command::new("/usr/sbin/postfix")
            .args(["-c", path(&self.config), what])
            .output()
            .unwrap()
    }

    /// Every message delivered so far.
    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(&self.maildir)
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_to_string(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.control("stop");
    }
}

#[test]
fn postfix_receives_our_mail_over_starttls() {
    // Goal: the most common receiving MTA takes our delivery: MX lookup, STARTTLS (Postfix
    // records the TLS session in its Received: header), the DKIM-signed bytes intact.
    if let Some(why) = Postfix::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let Some((_g, dir, _out)) = setup() else {
        return;
    };
    let port = std::net::TcpListener::bind(("127.0.0.5", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let postfix = Postfix::start(dir.path(), port);
    let (_dns, resolver) = dns();
    let c = Cluster::start_with(1, PARTITIONS, 5000, 1, &config(resolver, port, ""));
    c.admin(&["dkim", "generate", "example.test"]);
    submit(
        &c,
        1,
        "user0@example.test",
        &["someone@pf.test"],
        "to-postfix",
    );
    let got = eventually(
        Duration::from_secs(60),
        "postfix delivers to its maildir",
        || postfix.messages().pop(),
    );
    assert!(got.contains("Subject: to-postfix"), "{got}");
    assert!(got.contains("DKIM-Signature:"), "{got}");
    assert!(got.contains("by mx.pf.test (Postfix)"), "{got}");
    assert!(got.contains("(using TLS"), "Postfix saw no TLS: {got}");
    eventually(Duration::from_secs(30), "the queue drains", || {
        queue(&c).is_empty().then_some(())
    });
}
