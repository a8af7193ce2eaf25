"""SMTP checks run by tests/smtp.rs against a live cluster, with Python's own smtplib and raw
sockets as the clients. Usage: smtp_client.py SCENARIO JSON-ARGS. Exits non-zero (with the
failed assertion) when the server did not answer as the RFCs say."""

import base64
import json
import smtplib
import socket
import ssl
import sys
import time


from mailtest import hostport, insecure


def expect_refused(fn, code, status):
    try:
        fn()
    except smtplib.SMTPRecipientsRefused as e:
        got = list(e.recipients.values())[0]
    except smtplib.SMTPResponseException as e:
        got = (e.smtp_code, e.smtp_error)
    else:
        raise AssertionError(f"expected {code} {status}, got success")
    assert got[0] == code and got[1].startswith(status.encode()), f"expected {code} {status}, got {got}"


class Raw:
    """A raw SMTP connection for transcripts smtplib would not send."""

    def __init__(self, addr, tls=False):
        self.sock = socket.create_connection(hostport(addr), timeout=20)
        if tls:
            self.sock = insecure().wrap_socket(self.sock)
        self.buf = b""
        self.expect(220)

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; buffer {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def expect(self, code, status=None):
        got, text = self.reply()
        assert got == code, f"expected {code}, got {text!r}"
        if status:
            assert text[4:].startswith(status.encode()), f"expected {status}, got {text!r}"
        return text

    def closed(self):
        try:
            self.sock.settimeout(10)
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


def basics(a):
    # Mail from anywhere to local users through the MX of one node; an alias expands.
    s = smtplib.SMTP(*hostport(a["mx"]), timeout=30)
    code, features = s.ehlo("client.test")
    assert code == 250
    for ext in [b"PIPELINING", b"SIZE", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"STARTTLS", b"SMTPUTF8", b"CHUNKING"]:
        assert ext in features, f"EHLO lacks {ext}: {features}"
    assert b"AUTH" not in features, "AUTH offered before TLS"
    assert s.sendmail("sender@remote.test", a["to"] + [a["alias_rcpt"]], a["message"].encode()) == {}
    expect_refused(lambda: s.sendmail("x@remote.test", ["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n"), 550, "5.1.1")
    expect_refused(lambda: s.sendmail("x@remote.test", ["someone@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n"), 554, "5.7.1")
    assert s.vrfy("user0@example.test")[0] == 252
    assert s.noop()[0] == 250
    s.quit()

    # Submission: AUTH only after STARTTLS; the sender must be the user or one of its aliases.
    s = smtplib.SMTP(*hostport(a["submission"]), timeout=30)
    s.ehlo("client.test")
    expect_refused(lambda: s.sendmail("user0@example.test", ["user1@example.test"], b"x\r\n"), 530, "5.7.0")
    code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0user0@example.test\0pw").decode())
    assert code == 538, (code, text)
    s.starttls(context=insecure())
    s.ehlo("client.test")
    assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
    assert s.login("user0@example.test", "pw")[0] == 235
    expect_refused(lambda: s.sendmail("user1@example.test", ["user1@example.test"], b"x\r\n"), 553, "5.7.1")
    assert s.sendmail(a["alias_sender"], ["user1@example.test"], b"Subject: from alias\r\n\r\nx\r\n") == {}
    assert s.sendmail("user0@example.test", ["user1@example.test"], a["submitted"].encode()) == {}
    # Other domains are relayed for authenticated users: queued (tests/outbound.rs delivers).
    assert s.sendmail("user0@example.test", ["friend@elsewhere.test"], b"Subject: out\r\n\r\nx\r\n") == {}
    s.quit()

    # Submissions: implicit TLS, AUTH LOGIN; a wrong password is refused.
    s = smtplib.SMTP_SSL(*hostport(a["submissions"]), timeout=30, context=insecure())
    s.ehlo("client.test")
    try:
        s.login("user1@example.test", "wrong")
        raise AssertionError("wrong password accepted")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535, e
    s.user, s.password = "user1@example.test", "pw"
    code, _ = s.auth("LOGIN", s.auth_login)
    assert code == 235
    s.quit()


def bad_input(a):
    r = Raw(a["mx"])
    r.send(b"GARBAGE \x01\x02\r\n")
    r.expect(500, "5.5.2")
    r.send(b"MAIL FROM:<x@remote.test>\r\n")
    r.expect(503, "5.5.1")
    r.send(b"EHLO " + b"a" * 994 + b"\r\n")  # 1001 octets
    r.expect(500, "5.5.2")
    r.send(b"NOOP " + b"a" * 993 + b"\r\n")  # 1000 octets: allowed
    r.expect(250)
    r.send(b"NOOP \x00\r\n")
    r.expect(500, "5.5.2")
    # Pipelined transaction in one write (RFC 2920), answered in order.
    r.send(b"EHLO client.test\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<user0@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n")
    r.expect(250)
    r.expect(250, "2.1.0")
    r.expect(250, "2.1.5")
    r.expect(550, "5.1.1")
    r.expect(354)
    r.send(b"Subject: pipelined\r\n\r\n" + a["pipelined_tag"].encode() + b"\r\n.\r\n")
    r.expect(250, "2.0.0")
    # A bare LF is refused (SMTP smuggling) and nothing is stored.
    r.send(b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<user0@example.test>\r\nDATA\r\n")
    r.expect(250); r.expect(250); r.expect(354)
    r.send(b"Subject: bare\r\n\r\n" + a["bare_tag"].encode() + b"\n.\nMAIL FROM:<evil@remote.test>\r\n.\r\n")
    r.expect(550, "5.6.11")
    # Over the size limit: the whole message is read, refused, and nothing is stored.
    r.send(b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<user0@example.test>\r\nDATA\r\n")
    r.expect(250); r.expect(250); r.expect(354)
    big = (b"x" * 998 + b"\r\n") * (a["limit"] // 1000 + 10)
    r.send(b"Subject: big\r\n\r\n" + a["big_tag"].encode() + b"\r\n" + big + b".\r\n")
    r.expect(552, "5.3.4")
    # SIZE= over the limit is refused at MAIL.
    r.send(f"MAIL FROM:<p@remote.test> SIZE={a['limit'] + 1}\r\n".encode())
    r.expect(552, "5.3.4")
    # Recipient limit.
    r.send(b"MAIL FROM:<p@remote.test>\r\n")
    r.expect(250)
    cmds = b"".join(b"RCPT TO:<user0@example.test>\r\n" for _ in range(a["recipients_max"] + 1))
    r.send(cmds)
    for _ in range(a["recipients_max"]):
        r.expect(250)
    r.expect(452, "4.5.3")
    r.send(b"RSET\r\n")
    r.expect(250)
    # CHUNKING: two BDAT chunks, then a DATA in the same transaction is refused.
    r.send(b"MAIL FROM:<c@remote.test>\r\nRCPT TO:<user0@example.test>\r\n")
    r.expect(250); r.expect(250)
    part1 = b"Subject: chunked\r\n\r\n"
    part2 = a["chunk_tag"].encode() + b"\r\n.not stuffed\r\n"
    r.send(b"BDAT %d\r\n" % len(part1) + part1)
    r.expect(250, "2.0.0")
    r.send(b"DATA\r\n")
    r.expect(503, "5.5.1")
    r.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
    r.expect(250, "2.0.0")
    r.send(b"QUIT\r\n")
    r.expect(221)
    assert r.closed()

    # Commands pipelined after STARTTLS in the clear are discarded, not run after TLS.
    tls_session = r = Raw(a["mx"])
    r.send(b"EHLO client.test\r\n")
    r.expect(250)
    r.send(b"STARTTLS\r\nRSET\r\n")
    r.expect(220, "2.0.0")
    r.sock = insecure().wrap_socket(r.sock)
    r.buf = b""
    r.send(b"NOOP\r\n")
    r.expect(250, "2.0.0")
    r.send(b"MAIL FROM:<x@remote.test>\r\n")
    r.expect(503, "5.5.1")  # EHLO again first: state is reset by TLS

    # Too many errors end the session.
    r = Raw(a["mx"])
    tls_session.send(b"QUIT\r\n")
    tls_session.expect(221)
    for _ in range(a["errors_max"] - 1):
        r.send(b"BOGUS\r\n")
        r.expect(500)
    r.send(b"BOGUS\r\n")
    r.expect(500)
    r.expect(421, "4.7.0")
    assert r.closed()

    # A TLS handshake that never comes is dropped, and others are still served meanwhile.
    stalled = socket.create_connection(hostport(a["submissions"]), timeout=30)
    s = smtplib.SMTP_SSL(*hostport(a["submissions"]), timeout=30, context=insecure())
    assert s.noop()[0] == 250
    s.quit()
    stalled.settimeout(30)
    assert stalled.recv(1) == b"", "stalled handshake not closed"

    # Connections over the per-address limit are told to come back later. (Earlier
    # connections may take a moment to be released: retry a greeting of 421 briefly.)
    conns = []
    deadline = time.time() + 20
    while len(conns) < a["per_ip_max"]:
        try:
            conns.append(Raw(a["mx"]))
        except AssertionError:
            assert time.time() < deadline, "connection slots not released"
            time.sleep(0.2)
    extra = socket.create_connection(hostport(a["mx"]), timeout=20)
    extra.settimeout(20)
    data = extra.recv(200)
    assert data.startswith(b"421 4.7.0"), data
    # On the same node's implicit-TLS port (the limit covers all its SMTP listeners) the
    # refusal is a plain close: no plaintext line that a TLS client would read as a corrupt
    # record. A TLS client is told by its handshake failing on a closed connection.
    extra = socket.create_connection(hostport(a["mx_node_submissions"]), timeout=20)
    extra.settimeout(20)
    try:
        data = extra.recv(200)
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    try:
        smtplib.SMTP_SSL(*hostport(a["mx_node_submissions"]), timeout=20, context=insecure())
        raise AssertionError("a connection over the limit was admitted on the TLS port")
    except (ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected, OSError) as e:
        assert "WRONG_VERSION_NUMBER" not in str(e) and "record" not in str(e).lower(), e
    for c in conns:
        c.send(b"QUIT\r\n")
        c.expect(221)


def brute_force(a):
    # Failures slow down and then lock out the address, even for a right password.
    for i in range(a["failures_max"]):
        r = Raw(a["submissions"], tls=True)
        r.send(b"EHLO c\r\n")
        r.expect(250)
        r.send(b"AUTH PLAIN " + base64.b64encode(b"\0user0@example.test\0wrong%d" % i) + b"\r\n")
        r.expect(535, "5.7.8")
    r = Raw(a["submissions"], tls=True)
    r.send(b"EHLO c\r\n")
    r.expect(250)
    r.send(b"AUTH PLAIN " + base64.b64encode(b"\0user0@example.test\0pw") + b"\r\n")
    r.expect(454, "4.7.0")


def login(a):
    # AUTH succeeds (for an over-quota user too: quota limits storing, not logging in).
    s = smtplib.SMTP_SSL(*hostport(a["submissions"]), timeout=30, context=insecure())
    s.ehlo("client.test")
    assert s.login(a["user"], a["password"])[0] == 235
    s.quit()


def send(a):
    # One message; prints the reply code so the test can compare it.
    s = smtplib.SMTP(*hostport(a["mx"]), timeout=60)
    s.ehlo("client.test")
    try:
        refused = s.sendmail(a["from"], a["to"], a["message"].encode())
        print(json.dumps({"code": 250, "refused": {k: list(map(str, v)) for k, v in refused.items()}}))
    except smtplib.SMTPRecipientsRefused as e:
        print(json.dumps({"code": list(e.recipients.values())[0][0], "text": str(e)}))
    except smtplib.SMTPResponseException as e:
        print(json.dumps({"code": e.smtp_code, "text": e.smtp_error.decode()}))
    try:
        s.quit()
    except Exception:
        pass


if __name__ == "__main__":
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    {"basics": basics, "bad_input": bad_input, "brute_force": brute_force, "login": login, "send": send}[scenario](args)
