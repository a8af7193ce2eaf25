"""A receiving MTA for tests/outbound.rs, built on aiosmtpd (Debian's python3-aiosmtpd).

Usage: smtp_sink.py OUT.jsonl [--defer-times N] [--slow-seconds S] [--tls CERT KEY]
                   [--auth USER:PASSWORD]

With --auth it is a smarthost: mail only after AUTH (over TLS) with those credentials.

Listens on 127.0.0.1 with a port the system picks and prints "port N" once ready. What it
answers depends on the recipient's local part:
  bounce*  RCPT gets 550 5.1.1
  defer*   RCPT gets 451 4.7.1 for the first N attempts of that address, then is accepted
  slow*    the reply to the end of DATA comes after S seconds
  other    accepted
Every event is appended to OUT.jsonl as one JSON object: {"event": "rcpt"|"begin"|"message",
...}; "message" carries the envelope and the data as received, and is written before the
250 is sent (so a sender that dies waiting may still have delivered: at least once).
"""

import asyncio
import json
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult


class Sink:
    def __init__(self, out, defer_times, slow_seconds):
        self.out = out
        self.defer_times = defer_times
        self.slow_seconds = slow_seconds
        self.deferred = {}

    def record(self, **event):
        with open(self.out, "a") as f:
            f.write(json.dumps(event) + "\n")

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        self.record(event="rcpt", address=address, tls=session.ssl is not None)
        if local.startswith("bounce"):
            return "550 5.1.1 <%s>: no such user here" % address
        if local.startswith("defer"):
            n = self.deferred.get(address, 0)
            if n < self.defer_times:
                self.deferred[address] = n + 1
                return "451 4.7.1 <%s>: greylisted, try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        slow = any(r.split("@")[0].lower().startswith("slow") for r in envelope.rcpt_tos)
        if slow:
            self.record(event="begin", rcpt_tos=envelope.rcpt_tos)
        login = getattr(session.auth_data, "login", None)
        self.record(
            event="message",
            mail_from=envelope.mail_from,
            rcpt_tos=envelope.rcpt_tos,
            tls=session.ssl is not None,
            auth=login.decode() if login else None,
            peer=list(session.peer),
            data=envelope.original_content.decode("utf-8", "replace"),
        )
        if slow:
            await asyncio.sleep(self.slow_seconds)
        return "250 2.0.0 Message accepted for delivery"


async def main():
    args = sys.argv[1:]
    out = args.pop(0)
    defer_times, slow_seconds, tls, credentials = 0, 0.0, None, None
    while args:
        flag = args.pop(0)
        if flag == "--defer-times":
            defer_times = int(args.pop(0))
        elif flag == "--slow-seconds":
            slow_seconds = float(args.pop(0))
        elif flag == "--auth":
            user, password = args.pop(0).split(":", 1)
            credentials = (user.encode(), password.encode())
        elif flag == "--tls":
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.pop(0), args.pop(0))
        else:
            raise SystemExit(f"unknown flag {flag}")
    handler = Sink(out, defer_times, slow_seconds)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (getattr(auth_data, "login", None), getattr(auth_data, "password", None)) == credentials
        handler.record(event="auth", ok=ok)
        # handled=False: aiosmtpd itself answers 535 to a failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def smtp():
        if credentials is None:
            return SMTP(handler, hostname="mx.far.test", tls_context=tls, require_starttls=False)
        return SMTP(
            handler,
            hostname="relay.far.test",
            tls_context=tls,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=True,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        smtp,
        "127.0.0.1",
        0,
    )
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
