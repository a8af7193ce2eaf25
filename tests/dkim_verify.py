"""Verifies a message's DKIM signature with dkimpy (Debian's python3-dkim), an independent
implementation, answering the key lookup with the record `mailgrid admin dkim show` printed.
Usage: dkim_verify.py MESSAGE-FILE 'SELECTOR._domainkey.DOMAIN. IN TXT ( "..." )'
Exits 0 and prints "verified" only when the signature is valid."""

import sys

import dkim

message = open(sys.argv[1], "rb").read()
record = sys.argv[2]
name = record.split()[0]
value = "".join(record.split('"')[1::2]).encode()


def dnsfunc(qname, timeout=5):
    wanted = qname.decode() if isinstance(qname, bytes) else qname
    return value if wanted.rstrip(".") == name.rstrip(".") else None


if not dkim.verify(message, dnsfunc=dnsfunc):
    raise SystemExit("signature does not verify")
print("verified")
