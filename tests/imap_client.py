"""IMAP checks run by tests/imap.rs against a live cluster with Python's imaplib (and a raw
socket where imaplib has no call, e.g. IDLE and malformed input). Usage:
imap_client.py SCENARIO JSON-ARGS; exits non-zero with the failed assertion; the last line
printed is a JSON result."""

import json
import re
import socket
import ssl
import sys
import time
import imaplib

from mailtest import hostport, insecure

imaplib._MAXLINE = 10_000_000
for name, states in [("MOVE", ("SELECTED",)), ("ID", ("NONAUTH", "AUTH", "SELECTED")),
                     ("UNSELECT", ("SELECTED",))]:
    imaplib.Commands.setdefault(name, states)


def imaps(addr):
    return imaplib.IMAP4_SSL(*hostport(addr), ssl_context=insecure(), timeout=30)


def ok(result):
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


def expect_no(result, code=None):
    typ, data = result
    assert typ == "NO", (typ, data)
    if code:
        assert code.encode() in data[0], (code, data)
    return data


def untagged(m, name):
    """Takes (and forgets) the untagged responses of that name collected so far."""
    return m.untagged_responses.pop(name, [])


class Raw:
    """A line-level IMAP connection for what imaplib cannot send."""

    def __init__(self, addr):
        s = socket.create_connection(hostport(addr), timeout=30)
        self.s = insecure().wrap_socket(s)
        self.f = self.s.makefile("rb")
        self.greeting = self.line()
        self.n = 0

    def line(self):
        line = self.f.readline()
        assert line, "connection closed"
        return line.decode(errors="replace").rstrip("\r\n")

    def send(self, data):
        self.s.sendall(data if isinstance(data, bytes) else data.encode())

    def cmd(self, text):
        """Sends a tagged command; returns (untagged lines, tagged line)."""
        self.n += 1
        tag = f"r{self.n}"
        self.send(f"{tag} {text}\r\n")
        return self.until(tag)

    def until(self, tag):
        lines = []
        while True:
            line = self.line()
            if line.startswith(tag + " "):
                return lines, line
            lines.append(line)

    def login(self, user, password):
        _, done = self.cmd(f'LOGIN "{user}" "{password}"')
        assert " OK " in done, done


def basics(a):
    user, pw = a["user"], a["password"]
    # Port 143: no login before STARTTLS.
    m = imaplib.IMAP4(*hostport(a["imap"]), timeout=30)
    caps = m.capabilities
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps, caps
    typ, data = m._simple_command("LOGIN", user, pw)
    assert typ == "NO" and b"PRIVACYREQUIRED" in data[0], (typ, data)
    m.starttls(ssl_context=insecure())
    caps = m.capabilities
    for c in ["IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "SPECIAL-USE", "QUOTA",
              "LITERAL+", "ENABLE", "UNSELECT", "ID", "CHILDREN", "CONDSTORE", "QRESYNC",
              "AUTH=PLAIN"]:
        assert c in caps, (c, caps)
    typ, data = m._simple_command("LOGIN", user, "wrong")
    assert typ == "NO" and b"AUTHENTICATIONFAILED" in data[0], (typ, data)
    ok(m.login(user, pw))
    # Special-use mailboxes every account has.
    listing = [l.decode() for l in ok(m.list())]
    for name, attr in [("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                       ("Junk", "\\Junk"), ("Archive", "\\Archive")]:
        assert any(attr in l and l.endswith(f'"{name}"') for l in listing), (name, listing)
    assert any(l.endswith('"INBOX"') or l.endswith(" INBOX") for l in listing), listing
    ok(m.namespace())
    typ, data = m._simple_command("ID", "NIL")
    assert typ == "OK" and b"mailgrid" in untagged(m, "ID")[0], (typ, data)
    # SELECT reports the mailbox.
    data = ok(m.select("INBOX"))
    count = int(data[0])
    assert count == len(a["tags"]), (count, a["tags"])
    validity = int(untagged(m, "UIDVALIDITY")[0])
    assert validity > 0
    assert int(untagged(m, "RECENT")[0]) == count
    # FETCH: flags, sizes, envelopes, structures, header fields, without setting \Seen.
    data = ok(m.fetch("1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE "
                             "BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    fetched = [d for d in data if isinstance(d, tuple)]
    assert len(fetched) == count, data
    for i, (meta, header) in enumerate(fetched):
        meta = meta.decode()
        assert f"{i + 1} (UID" in meta and "\\Seen" not in meta, meta
        assert "ENVELOPE (" in meta and "BODYSTRUCTURE (" in meta, meta
        assert header.decode().strip() == f"Subject: {a['tags'][i]}", header
    # BODY[] sets \Seen; the FETCH says so.
    data = ok(m.fetch("1", "(BODY[])"))
    assert a["tags"][0].encode() in data[0][1], data
    flags = ok(m.fetch("1", "(FLAGS)"))[0].decode()
    assert "\\Seen" in flags, flags
    # Partial fetch.
    data = ok(m.fetch("2", "(BODY.PEEK[]<0.9>)"))
    assert data[0][1] == b"Subject: ", data
    # SEARCH by flag, header and text, with sequence numbers and UIDs.
    assert ok(m.search(None, "UNSEEN"))[0].split() == [str(i).encode() for i in range(2, count + 1)]
    assert ok(m.search(None, "SUBJECT", a["tags"][1]))[0] == b"2"
    assert ok(m.search("UTF-8", "BODY", f'"body of {a["tags"][2]}"'))[0] == b"3"
    uids = ok(m.uid("SEARCH", "ALL"))[0].split()
    assert len(uids) == count
    expect_no(m.search("KOI8-R", "ALL"), "BADCHARSET")
    # STORE and its FETCH answer.
    data = ok(m.store("2", "+FLAGS", "(\\Flagged $Work)"))
    assert b"\\Flagged" in data[0] and b"$Work" in data[0], data
    assert ok(m.search(None, "KEYWORD", "$Work"))[0] == b"2"
    # COPY and MOVE with UIDPLUS codes.
    typ, data = m._simple_command("UID", "COPY", uids[0], "Archive")
    assert typ == "OK" and data[0].startswith(b"[COPYUID "), (typ, data)
    expect_no(m.copy("1", "NoSuchBox"), "TRYCREATE")
    typ, data = m._simple_command("MOVE", "3", "Trash")
    assert typ == "OK", (typ, data)
    moved_expunge = untagged(m, "EXPUNGE")
    assert moved_expunge == [b"3"], moved_expunge
    count -= 1
    # APPEND with flags, APPENDUID, and its arrival in the selected mailbox.
    msg = b"Subject: appended\r\nFrom: a@example.test\r\n\r\nappended body\r\n"
    typ, data = m.append("INBOX", "(\\Draft)", None, msg)
    assert typ == "OK" and b"APPENDUID" in data[0], (typ, data)
    appended_uid = int(data[0].decode().split("APPENDUID ")[1].split()[1].rstrip("]"))
    ok(m.noop())
    assert int(untagged(m, "EXISTS")[-1]) == count + 1, m.untagged_responses
    count += 1
    data = ok(m.uid("FETCH", str(appended_uid), "(FLAGS BODY.PEEK[TEXT])"))
    assert b"\\Draft" in data[0][0] and data[0][1] == b"appended body\r\n", data
    # Mailboxes: hierarchy, rename with children, subscriptions, status, delete.
    ok(m.create("Projects/2026/Q1"))
    listing = [l.decode() for l in ok(m.list('""', "Projects/*"))]
    assert len(listing) == 2 and "\\HasChildren" in listing[0], listing
    assert [l.rsplit(" ", 1)[1] for l in [l.decode() for l in ok(m.list('""', "%"))]].count('"Projects"') == 1
    ok(m.rename("Projects", "Work"))
    listing = [l.decode() for l in ok(m.list("Work/", "*"))]
    assert any(l.endswith('"Work/2026/Q1"') for l in listing), listing
    expect_no(m.create("Work"), "ALREADYEXISTS")
    ok(m.subscribe("Work/2026"))
    ok(m.unsubscribe("Work/2026"))
    lsub = [l.decode() for l in ok(m.lsub('""', "Work*"))]
    assert not any(l.endswith('"Work/2026"') for l in lsub), lsub
    status = ok(m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"))[0].decode()
    assert f"MESSAGES {count}" in status and f"UIDVALIDITY {validity}" in status, status
    ok(m.delete("Work/2026/Q1"))
    expect_no(m.delete("INBOX"))
    expect_no(m.select("Nope"), "NONEXISTENT")
    ok(m.select("INBOX"))
    # Quota of the account (no limits set: no resources).
    typ, data = m._simple_command("GETQUOTAROOT", "INBOX")
    assert typ == "OK" and untagged(m, "QUOTAROOT"), (typ, m.untagged_responses)
    # EXPUNGE of \Deleted messages only; UID EXPUNGE of named ones only.
    ok(m.store("1", "+FLAGS.SILENT", "(\\Deleted)"))
    ok(m.store("2", "+FLAGS.SILENT", "(\\Deleted)"))
    typ, data = m.uid("EXPUNGE", uids[1].decode())
    assert typ == "OK" and untagged(m, "EXPUNGE") == [b"2"], (typ, m.untagged_responses)
    assert ok(m.expunge()) == [b"1"]
    count -= 2
    # EXAMINE is read-only.
    ok(m.select("INBOX", readonly=True))
    typ, data = m.store("1", "+FLAGS", "(\\Seen)")
    assert typ == "NO", (typ, data)
    ok(m._simple_command("UNSELECT"))
    m.logout()
    print(json.dumps({"count": count, "validity": validity, "appended_uid": appended_uid}))


def bad_input(a):
    r = Raw(a["imaps"])
    assert r.greeting.startswith("* OK"), r.greeting
    _, done = r.cmd("SELECT INBOX")
    assert " BAD " in done, done  # wrong state
    _, done = r.cmd('LOGIN "a')  # unbalanced quote
    assert " BAD " in done, done
    r.login(a["user"], a["password"])
    _, done = r.cmd("FETCH 1 (FLAGS")
    assert " BAD " in done, done
    _, done = r.cmd("FETCH 1 FLAGS")
    assert " BAD " in done, done  # no mailbox selected
    r.cmd("SELECT INBOX")
    _, done = r.cmd("FETCH 1 (FLAGS (BODY[]")
    assert " BAD " in done, done
    # A 2 GB literal announcement is refused before any data is sent.
    r.n += 1
    r.send(f"r{r.n} APPEND INBOX {{2000000000}}\r\n")
    _, done = r.until(f"r{r.n}")
    assert " NO [TOOBIG]" in done, done
    r.n += 1
    r.send(f"r{r.n} SEARCH TEXT {{2000000000}}\r\n")
    _, done = r.until(f"r{r.n}")
    assert " BAD " in done, done
    # A million ranges: the line is over the limit, the session goes on.
    ranges = ",".join(f"{i}:{i}" for i in range(1, 1_000_001))
    _, done = r.cmd(f"FETCH {ranges} FLAGS")
    assert " BAD " in done, done
    # Sequence numbers beyond the mailbox.
    _, done = r.cmd("FETCH 999999 FLAGS")
    assert " BAD " in done, done
    # Non-UTF-8 mailbox names.
    r.n += 1
    r.send(f"r{r.n} CREATE {{3}}\r\n")
    assert r.line().startswith("+")
    r.send(b"\xff\xfe\xfd\r\n")
    _, done = r.until(f"r{r.n}")
    assert " NO " in done or " BAD " in done, done
    # Still working, and nothing changed.
    lines, done = r.cmd("STATUS INBOX (MESSAGES)")
    assert " OK " in done and f"MESSAGES {a['count']}" in lines[0], (lines, done)
    # The malformed MIME message is served with a well-formed structure.
    lines, done = r.cmd("UID FETCH 1:* (BODYSTRUCTURE ENVELOPE)")
    assert " OK " in done, (lines, done)
    r.cmd("LOGOUT")
    print(json.dumps({}))


def big_header(a):
    """The message whose header spans several stored pieces reads the same through every
    node, header items (from the leader's headers-only read or a node's header cache) and
    whole alike, whichever of the two a node read first."""
    whole = open(a["message"], "rb").read()
    header = whole[:a["header_len"]]

    def check_header(m, n):
        data = ok(m.fetch(n, "(ENVELOPE BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (X-LAST)])"))
        assert data[0][1] == header, (len(data[0][1]), len(header))
        assert data[1][1] == f"X-Last: {a['last']}\r\n\r\n".encode(), data[1]
        assert b'"big header"' in data[0][0], data[0][0][:200]
        assert ok(m.search(None, "HEADER", "X-Last", a["last"]))[0].split() == [n.encode()]
        assert n.encode() in ok(m.search(None, "SUBJECT", '"big header"'))[0].split()

    def check_whole(m, n):
        data = ok(m.fetch(n, "(RFC822.SIZE BODY.PEEK[])"))
        assert data[0][1] == whole, (len(data[0][1]), len(whole))
        assert f"RFC822.SIZE {len(whole)} " in data[0][0].decode(), data[0][0]

    for i, addr in enumerate(a["nodes"]):
        m = imaps(addr)
        ok(m.login(a["user"], a["password"]))
        n = ok(m.select("INBOX", readonly=True))[0].decode()  # the newest message
        checks = [check_header, check_whole] if i % 2 == 0 else [check_whole, check_header]
        for check in checks + checks:
            check(m, n)
        m.logout()
    print(json.dumps({}))


def watch(a):
    """Session A (node 1) sees session B's (node 2) flag changes and expunges on its next
    command, and a delivery made elsewhere while it is in IDLE."""
    user, pw = a["user"], a["password"]
    first = Raw(a["first"])
    first.login(user, pw)
    first.cmd("SELECT INBOX")
    second = imaps(a["second"])
    ok(second.login(user, pw))
    ok(second.select("INBOX"))
    ok(second.store("1", "+FLAGS", "(\\Answered)"))
    lines, done = first.cmd("NOOP")
    assert any(re.match(r"\* 1 FETCH \(.*\\Answered", l) for l in lines), lines
    ok(second.store("1", "+FLAGS.SILENT", "(\\Deleted)"))
    ok(second.expunge())
    lines, done = first.cmd("NOOP")
    assert "* 1 EXPUNGE" in lines, lines
    # IDLE: wait for the EXISTS of a message the test delivers meanwhile.
    first.n += 1
    tag = f"r{first.n}"
    first.send(f"{tag} IDLE\r\n")
    assert first.line().startswith("+"), "no continuation for IDLE"
    print("idling", flush=True)
    start = time.monotonic()
    while True:
        line = first.line()
        if line.endswith("EXISTS"):
            break
    waited = time.monotonic() - start
    first.send("DONE\r\n")
    _, done = first.until(tag)
    assert " OK " in done, done
    second.logout()
    print(json.dumps({"exists_after": waited}))


def quota(a):
    """Over quota: APPEND and COPY refused with [OVERQUOTA]; login, read, delete still work."""
    m = imaps(a["imaps"])
    ok(m.login(a["user"], a["password"]))
    ok(m.select("INBOX"))
    typ, data = m._simple_command("GETQUOTAROOT", "INBOX")
    quota = untagged(m, "QUOTA")
    assert typ == "OK" and b"STORAGE" in quota[0], (typ, quota)
    big = b"Subject: big\r\n\r\n" + b"x" * a["bytes"] + b"\r\n"
    typ, data = m.append("INBOX", None, None, big)
    assert typ == "NO" and b"OVERQUOTA" in data[0], (typ, data)
    expect_no(m.copy("1:*", "Archive"), "OVERQUOTA")
    data = ok(m.fetch("1", "(BODY[])"))
    assert data[0][1].startswith(b"Subject"), data
    ok(m.store("1:*", "+FLAGS.SILENT", "(\\Deleted)"))
    ok(m.expunge())
    # Room again.
    typ, data = m.append("INBOX", None, None, b"Subject: small\r\n\r\nfits\r\n")
    assert typ == "OK", (typ, data)
    m.logout()
    print(json.dumps({}))


def uids(a):
    """UIDVALIDITY and the UIDs of INBOX through one node."""
    m = imaps(a["imaps"])
    ok(m.login(a["user"], a["password"]))
    ok(m.select("INBOX"))
    validity = int(untagged(m, "UIDVALIDITY")[0])
    recent = int(untagged(m, "RECENT")[0])
    found = [int(x) for x in ok(m.uid("SEARCH", "ALL"))[0].split()]
    m.logout()
    print(json.dumps({"validity": validity, "uids": found, "recent": recent}))


def hold(a):
    """Selects INBOX on one node, then waits for a line on stdin naming what to do: the test
    kills the partition leader in between; afterwards the same session must keep working
    (with the same UIDs) within the deadline."""
    m = imaps(a["imaps"])
    ok(m.login(a["user"], a["password"]))
    ok(m.select("INBOX"))
    before = [int(x) for x in ok(m.uid("SEARCH", "ALL"))[0].split()]
    print("selected", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + a["seconds"]
    while True:
        try:
            typ, data = m.uid("SEARCH", "ALL")
            if typ == "OK":
                after = [int(x) for x in data[0].split()]
                break
        except imaplib.IMAP4.abort:
            raise
        assert time.monotonic() < deadline, (typ, data)
        time.sleep(0.2)
    typ, data = m.uid("STORE", str(after[0]), "+FLAGS", "(\\Flagged)")
    assert typ == "OK", (typ, data)
    typ, data = m.append("INBOX", None, None, b"Subject: after failover\r\n\r\nstill here\r\n")
    assert typ == "OK", (typ, data)
    m.logout()
    print(json.dumps({"before": before, "after": after}))


def subjects(m, criteria):
    found = ok(m.search(None, criteria))[0].split()
    out = []
    for n in found:
        data = ok(m.fetch(n, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        out.append(data[0][1].decode().strip().removeprefix("Subject: "))
    return out


def folder(a):
    """The subjects in a folder."""
    m = imaps(a["imaps"])
    ok(m.login(a["user"], a["password"]))
    ok(m.select(a["folder"], readonly=True))
    print(json.dumps({"subjects": subjects(m, "ALL")}))


def flagged(a):
    """The subjects of the flagged messages in INBOX."""
    m = imaps(a["imaps"])
    ok(m.login(a["user"], a["password"]))
    ok(m.select("INBOX", readonly=True))
    print(json.dumps({"subjects": subjects(m, "FLAGGED")}))


if __name__ == "__main__":
    globals()[sys.argv[1]](json.loads(sys.argv[2]))
