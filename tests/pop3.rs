//! POP3 on every node, checked with Python's poplib and curl against a multi-process cluster.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use common::*;
use serde_json::json;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const PARTITIONS: u32 = 8;
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pop3_client.py");

fn python(scenario: &str, args: serde_json::Value) -> serde_json::Value {
    last_json(&python_scenario("pop3_client.py", scenario, &args))
}

fn deliver_tags(c: &Cluster, user: &str, tags: &[&str]) {
    for tag in tags {
        let body = format!("Subject: {tag}\r\n\r\nbody of {tag}\r\n.leading dot line\r\n");
        c.deliver(c.any(), &[user], body.as_bytes(), tag)
            .expect("delivered");
    }
}

#[test]
fn pop3_lists_retrieves_and_deletes_at_quit_and_one_session_holds_the_maildrop() {
    // Goal: RFC 1939 over STLS and implicit TLS on any node; deletions take effect only at
    // QUIT, as one committed write; a second session on another node gets -ERR [IN-USE];
    // curl retrieves over POP3S.
    let _g = serial();
    let c = Cluster::start(3, PARTITIONS, 5000, 2);
    let user = "user0@example.test";
    let tags = ["pop-one", "pop-two", "pop-three"];
    deliver_tags(&c, user, &tags);
    let used = |c: &Cluster| -> u64 {
        let shown = c.admin(&["quota", "show", user]);
        shown
            .split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = used(&c);
    let first_size = c.fetch(c.any(), user)[0].1.len() as u64;
    python(
        "basics",
        json!({
            "pop3": c.listener(2, "pop3"),
            "pop3s": c.listener(3, "pop3s"),
            "user": user, "password": "pw", "tags": tags,
        }),
    );
    let left = c.fetch(c.any(), user);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|(_, b)| !b.contains("pop-one")));
    // The deletion freed its bytes at once.
    assert_eq!(used(&c), before - first_size);
    python(
        "in_use",
        json!({ "first": c.listener(1, "pop3s"), "second": c.listener(2, "pop3s"), "user": user, "password": "pw" }),
    );
    match Command::new("curl").arg("--version").output() {
        Err(_) => eprintln!("SKIPPED curl check: curl is not installed"),
        Ok(_) => {
            let url = format!("pop3s://{}/1", c.listener(1, "pop3s"));
            let out = Command::new("curl")
                .args([
                    "-sSk",
                    "--max-time",
                    "30",
                    &url,
                    "-u",
                    "user0@example.test:pw",
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("body of pop-two"), "{text}");
        }
    }
}

#[test]
fn a_dead_sessions_lock_expires_and_uidls_are_the_same_after_failover() {
    // Goal: the maildrop lock of a session on a node that dies (here the partition's leader)
    // runs out after its lease, and the new leader lists the same UIDLs.
    let _g = serial();
    let mut c = Cluster::start_with(3, PARTITIONS, 5000, 2, "[pop3]\nlock_lease_s = 3\n");
    let user = "user1@example.test";
    deliver_tags(&c, user, &["keep-a", "keep-b"]);
    let before = python(
        "uidl",
        json!({ "pop3s": c.listener(1, "pop3s"), "user": user, "password": "pw" }),
    );
    c.wait_healthy(3);
    let leader = c.leader_of_user(user, PARTITIONS);
    let mut holder = Command::new("python3")
        .args([
            SCRIPT,
            "hold",
            &json!({ "pop3s": c.listener(leader, "pop3s"), "user": user, "password": "pw" })
                .to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let other = [1u64, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let creds = json!({ "pop3s": c.listener(other, "pop3s"), "user": user, "password": "pw" });
    python("refused_now", creds);
    c.node(leader).kill9();
    let after = python(
        "login_eventually",
        json!({ "pop3s": c.listener(other, "pop3s"), "user": user, "password": "pw", "seconds": 30 }),
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(after["uidl"], before["uidl"]);
    assert_eq!(after["uidl"].as_array().unwrap().len(), 2);
}

#[test]
fn fetchmail_downloads_and_deletes_over_pop3s() {
    // Goal: a real POP3 client (fetchmail) pulls every message over implicit TLS, hands
    // each to its delivery agent, and deletes them at QUIT, after which the INBOX is empty.
    let _g = serial();
    if Command::new("fetchmail").arg("--version").output().is_err() {
        eprintln!("SKIPPED: fetchmail is not installed");
        return;
    }
    let c = Cluster::start(3, PARTITIONS, 5000, 3);
    let user = "user2@example.test";
    let tags = ["fm-one", "fm-two", "fm-three"];
    deliver_tags(&c, user, &tags);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("delivered");
    let (host, port) = c
        .listener(3, "pop3s")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let rc = dir.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\npoll {host} with proto POP3 port {port}\n  user \"{user}\" there with password \"pw\" is \"nobody\" here\n  options ssl no sslcertck fetchall mda \"cat >> {}\"\n",
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = Command::new("fetchmail")
        .args(["-f"])
        .arg(&rc)
        .args(["--nodetach", "-v"])
        .env("FETCHMAILHOME", dir.path())
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "fetchmail failed:\n{log}");
    let delivered = std::fs::read_to_string(&out).unwrap_or_default();
    for tag in tags {
        assert!(
            delivered.contains(&format!("body of {tag}")),
            "{tag} missing:\n{delivered}\n{log}"
        );
    }
    assert!(
        c.fetch(c.any(), user).is_empty(),
        "left on the server:\n{log}"
    );
}

#[test]
fn imported_and_configured_password_hashes_log_in_and_other_hashes_are_refused() {
    // Goal: `[auth] password_scheme` chooses how passwords set here are stored (SHA512-CRYPT
    // here, `user list` names each account's scheme), and `user add --password-hash` moves a
    // user over with the hash another server stored
    // — argon2 (here made by the library), and SHA512-CRYPT made by OpenSSL (`passwd -6`) in
    // Dovecot's `{SHA512-CRYPT}` form: the old password logs in over POP3S (curl), a wrong
    // one does not, and does not answer sooner for a cheap hash than for an unknown address;
    // a hash of another scheme is refused with what is expected.
    let _g = serial();
    // No throttle delay, so the refusal floor is the only wait in a refused login's timing.
    let c = Cluster::start_with(
        3,
        PARTITIONS,
        5000,
        0,
        "[auth]\ndelay_step_ms = 0\nfailures_per_ip_max = 100\nfailures_per_account_max = 100\n\
         password_scheme = \"sha512-crypt\"\n",
    );
    // Passwords set here are stored in the configured scheme; imports keep theirs.
    c.admin(&[
        "user",
        "add",
        "fresh@example.test",
        "--password",
        "fresh-pw",
    ]);
    let hash =
        service::mail::hash_password("moved-pw", service::mail::PasswordScheme::Argon2id).unwrap();
    c.admin(&[
        "user",
        "add",
        "moved@example.test",
        "--password-hash",
        &hash,
    ]);
    let sha512 = Command::new("openssl")
        .args(["passwd", "-6", "shadow-pw"])
        .output()
        .expect("openssl is installed by scripts/test");
    let sha512 = String::from_utf8(sha512.stdout).unwrap();
    assert!(
        sha512.starts_with("$6$"),
        "openssl passwd -6 printed {sha512:?}"
    );
    c.admin(&[
        "user",
        "add",
        "shadow@example.test",
        "--password-hash",
        &format!("{{SHA512-CRYPT}}{}", sha512.trim()),
    ]);
    let list = |user: &str, password: &str| {
        Command::new("curl")
            .args(["-sSk", "--max-time", "30"])
            .arg(format!("pop3s://{}/", c.listener(2, "pop3s")))
            .args(["-u", &format!("{user}:{password}")])
            .output()
            .expect("curl is installed by scripts/test")
    };
    let users = c.admin(&["user", "list", "--domain", "example.test"]);
    for (user, scheme) in [
        ("fresh@example.test", "sha512-crypt"),
        ("moved@example.test", "argon2id"),
        ("shadow@example.test", "sha512-crypt"),
    ] {
        let line = users.lines().find(|l| l.starts_with(user)).unwrap_or("");
        assert!(line.ends_with(&format!("\t{scheme}")), "{user}: {users}");
    }
    for (user, password) in [
        ("moved@example.test", "moved-pw"),
        ("shadow@example.test", "shadow-pw"),
        ("fresh@example.test", "fresh-pw"),
    ] {
        let ok = list(user, password);
        assert!(
            ok.status.success(),
            "{user}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(!list(user, "other-pw").status.success(), "{user}");
    }
    // A wrong password answers no sooner than the refusal floor (250 ms) whether the account
    // has a fast SHA-crypt hash, an argon2id one, or does not exist: its timing does not
    // tell which addresses exist. (A lower bound only: the machine may always be slower.)
    for user in [
        "shadow@example.test",
        "moved@example.test",
        "nobody@example.test",
    ] {
        let started = std::time::Instant::now();
        assert!(!list(user, "wrong-pw").status.success(), "{user}");
        let took = started.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(250),
            "{user}: refused after {took:?}"
        );
    }
    let add_with_hash = |address: &str, hash: &str| {
        let args = [
            "admin",
            "--data",
            c.any(),
            "user",
            "add",
            address,
            "--password-hash",
            hash,
        ];
        run(&args, None)
    };
    let bcrypt = "$2y$10$abcdefghijklmnopqrstuuhLUiD7aNWB3Bk6Z1HVV0ZZEoTp7v5me";
    let out = add_with_hash("b@example.test", bcrypt);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("argon2") && err.contains("$6$"), "{err}");
    assert!(!add_with_hash("c@example.test", "x").status.success());
    let too_costly = sha512.trim().replacen("$6$", "$6$rounds=900000000$", 1);
    let out = add_with_hash("d@example.test", &too_costly);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rounds"), "{err}");
}
