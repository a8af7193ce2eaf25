"""Helpers the mail client scripts of tests/ share."""

import ssl


def hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def insecure():
    """TLS without certificate checks: test nodes present self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
