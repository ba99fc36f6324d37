#!/usr/bin/env python3
"""A real SMTP server for tollgate's e-mail tests: aiosmtpd storing every
message in a maildir (with the envelope in X-MailFrom and X-RcptTo), with
optional STARTTLS, implicit TLS and AUTH against one user:password.
Runs until killed."""
import argparse
import ssl
import signal

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--maildir", required=True)
p.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
p.add_argument("--smtps", nargs=2, metavar=("CERT", "KEY"))
p.add_argument("--auth", metavar="USER:PASSWORD")
a = p.parse_args()


def context(pair):
    c = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    c.load_cert_chain(*pair)
    return c


class Authenticator:
    def __init__(self, user, password):
        self.user, self.password = user.encode(), password.encode()

    def __call__(self, server, session, envelope, mechanism, data):
        ok = (
            isinstance(data, LoginPassword)
            and data.login == self.user
            and data.password == self.password
        )
        # handled=False: aiosmtpd answers 535 itself on failure.
        return AuthResult(success=ok, handled=False)


kw = {}
if a.starttls:
    kw["tls_context"] = context(a.starttls)
    kw["require_starttls"] = True
if a.smtps:
    kw["ssl_context"] = context(a.smtps)
if a.auth:
    user, password = a.auth.split(":", 1)
    kw["authenticator"] = Authenticator(user, password)
    kw["auth_required"] = True
    kw["auth_require_tls"] = bool(a.starttls or a.smtps)

controller = Controller(Mailbox(a.maildir), hostname="127.0.0.1", port=a.port, **kw)
controller.start()
print("ready", flush=True)
# Wait for the test to kill us. signal.pause() takes no time argument, so
# it also works under libfaketime (scripts/hostile-clock), where a long
# time.sleep() fails with EINVAL.
while True:
    signal.pause()
