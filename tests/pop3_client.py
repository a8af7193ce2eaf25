"""POP3 checks run by tests/pop3.rs against a live cluster with Python's poplib. Usage:
pop3_client.py SCENARIO JSON-ARGS; exits non-zero with the failed assertion."""

import json
import poplib
import sys
import time


from mailtest import hostport, insecure


def expect_error(fn, prefix):
    try:
        fn()
    except poplib.error_proto as e:
        assert str(e.args[0]).find(prefix) >= 0, f"expected {prefix}, got {e}"
        return
    raise AssertionError(f"expected {prefix}, got success")


def pop3s(addr):
    return poplib.POP3_SSL(*hostport(addr), context=insecure(), timeout=30)


def basics(a):
    p = poplib.POP3(*hostport(a["pop3"]), timeout=30)
    caps = p.capa()
    assert "STLS" in caps and "USER" not in caps, caps
    expect_error(lambda: p.user(a["user"]), "[AUTH]")
    p.stls(context=insecure())
    caps = p.capa()
    assert "USER" in caps and "UIDL" in caps and "TOP" in caps and "SASL" in caps, caps
    expect_error(lambda: (p.user(a["user"]), p.pass_("wrong")), "[AUTH]")
    p.user(a["user"])
    p.pass_(a["password"])
    count, size = p.stat()
    assert count == len(a["tags"]), (count, a["tags"])
    listing = p.list()[1]
    assert len(listing) == count
    assert sum(int(l.split()[1]) for l in listing) == size
    uidls = [l.decode().split()[1] for l in p.uidl()[1]]
    assert len(set(uidls)) == count
    for i, tag in enumerate(a["tags"]):
        lines = p.retr(i + 1)[1]
        text = b"\r\n".join(lines).decode()
        assert tag in text, (tag, text)
        assert int(listing[i].split()[1]) == sum(len(l) + 2 for l in lines), "size mismatch"
    head = p.top(1, 0)[1]
    assert any(l.startswith(b"Subject:") for l in head) and not any(b"body of" in l for l in head), head
    p.dele(1)
    expect_error(lambda: p.retr(1), "deleted")
    p.rset()
    p.retr(1)
    p.dele(1)
    assert p.stat()[0] == count - 1
    assert p.quit().startswith(b"+OK")
    # A new session sees the deletion (committed at QUIT), over implicit TLS with AUTH PLAIN.
    p = pop3s(a["pop3s"])
    import base64
    creds = base64.b64encode(b"\0" + a["user"].encode() + b"\0" + a["password"].encode()).decode()
    assert p._shortcmd("AUTH PLAIN " + creds).startswith(b"+OK")
    assert p.stat()[0] == count - 1
    rest = [l.decode().split()[1] for l in p.uidl()[1]]
    assert rest == uidls[1:], (rest, uidls)
    print(json.dumps({"uidl": rest}))
    p.quit()


def in_use(a):
    # One session holds the maildrop; another on another node is refused until it quits.
    first = pop3s(a["first"])
    first.user(a["user"])
    first.pass_(a["password"])
    second = pop3s(a["second"])
    second.user(a["user"])
    expect_error(lambda: second.pass_(a["password"]), "[IN-USE]")
    first.quit()
    second = pop3s(a["second"])
    second.user(a["user"])
    second.pass_(a["password"])
    second.quit()


def hold(a):
    # Log in and keep the maildrop until killed.
    p = pop3s(a["pop3s"])
    p.user(a["user"])
    p.pass_(a["password"])
    print("locked", flush=True)
    time.sleep(3600)


def refused_now(a):
    # The maildrop is held by a live session elsewhere.
    p = pop3s(a["pop3s"])
    p.user(a["user"])
    expect_error(lambda: p.pass_(a["password"]), "[IN-USE]")


def login_eventually(a):
    # Refused while a dead session's lease runs, then admitted; prints the UIDL listing.
    deadline = time.time() + a["seconds"]
    refused = 0
    while True:
        try:
            p = pop3s(a["pop3s"])
            p.user(a["user"])
            p.pass_(a["password"])
            break
        except (poplib.error_proto, OSError) as e:
            assert time.time() < deadline, f"still refused: {e}"
            refused += 1
            time.sleep(0.5)
    uidl = [l.decode().split()[1] for l in p.uidl()[1]]
    p.quit()
    print(json.dumps({"refused": refused, "uidl": uidl}))


def uidl(a):
    p = pop3s(a["pop3s"])
    p.user(a["user"])
    p.pass_(a["password"])
    print(json.dumps({"uidl": [l.decode().split()[1] for l in p.uidl()[1]]}))
    p.quit()


if __name__ == "__main__":
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    {"basics": basics, "in_use": in_use, "hold": hold, "login_eventually": login_eventually, "refused_now": refused_now,
     "uidl": uidl}[scenario](args)
