"""TLS and SuperNode authentication around Flower's processes.

Server: the SuperLink gets the certificate folder of `fedprompt certs` (`ca.crt`,
`server.crt`, `server.key`) and `--enable-supernode-auth`; the public keys in its
`authorized/` folder are registered with the SuperLink at start and kept in sync while the
server runs (a key added with `fedprompt certs register` joins, one removed with `revoke` is
unregistered). Flower 1.42 keeps registrations in the SuperLink's memory, so a restarted
server registers them again.

Client: before each SuperNode start it checks the server itself, with the same trust roots,
so that a server the client does not trust, or a TLS/plain mismatch, is a clear error
instead of a SuperNode retrying for ever; a SuperNode that exits because the server does not
know its key is a clear error too.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fedprompt import processes
from fedprompt.errors import UserError


class SecurityError(UserError, ValueError):
    """A TLS/authentication problem the user must fix; one line naming the fix."""


INSECURE_WARNING = (
    "WARNING: --insecure: plain HTTP without client authentication. Anyone who can reach {where} "
    "can read and send model updates. Use only on a trusted network or for local tests."
)


def server_files(certs_dir: str) -> dict[str, Path]:
    """The server's TLS files from `server.certs_dir`, checked (a CertError-style message if not)."""
    if not certs_dir:
        raise SecurityError(
            "fedprompt server requires TLS and client authentication: create certificates with "
            "`fedprompt certs init --dir certs --server-name HOST` and pass --set server.certs_dir=certs, "
            "or pass --insecure for a plain, unauthenticated server (trusted networks only)"
        )
    d = Path(certs_dir).expanduser()
    files = {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SecurityError(
            f"server.certs_dir {certs_dir!r}: missing {', '.join(missing)}; create them with `fedprompt certs init --dir {certs_dir} --server-name HOST`"
        )
    return {k: p.resolve() for k, p in files.items()}


def authorized_keys(certs_dir: str) -> dict[str, Path]:
    """name -> public key file of every client the server admits."""
    from fedprompt.certs import CertError, registered

    try:
        return registered(Path(certs_dir).expanduser())
    except CertError as e:
        raise SecurityError(str(e)) from None


def _flwr_json(args: list[str], flwr_home: Path) -> dict:
    try:
        r = subprocess.run([processes.binary("flwr"), *args, "--format", "json"], capture_output=True, text=True, timeout=60, env=processes.env(flwr_home))
    except subprocess.TimeoutExpired:
        return {"success": False, "error-message": f"flwr {' '.join(args[:2])} timed out"}
    try:
        out = json.loads(r.stdout[r.stdout.find("{") :])
    except ValueError:
        out = {"success": False, "error-message": (r.stdout + r.stderr).strip()[-300:]}
    if "error-message" in out:  # Flower colours its messages; ours carry none
        out["error-message"] = processes.one_line(out["error-message"])
    return out


@dataclass
class Registry:
    """The clients registered with this server's SuperLink: name -> (key fingerprint, node id)."""

    certs_dir: str
    flwr_home: Path
    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)

    def sync(self, say=print) -> None:
        """Register keys added to authorized/ (or replaced) since the last sync; unregister
        removed ones. Never raises: a problem is logged and retried at the next sync, and the
        federation goes on."""
        try:
            keys = {name: (f.read_text(encoding="utf-8").split()[1], f) for name, f in authorized_keys(self.certs_dir).items()}
        except (SecurityError, OSError, IndexError) as e:
            say(f"authorized keys not readable, nothing changed: {e}")
            return
        for name in sorted(self.nodes):
            if keys.get(name, (None,))[0] != self.nodes[name][0]:  # removed, or another key under that name
                node = self.nodes[name][1]
                if node < 0:
                    del self.nodes[name]
                    continue
                out = _flwr_json(["supernode", "unregister", str(node), "fedprompt"], self.flwr_home)
                if out.get("success"):
                    del self.nodes[name]
                    say(f"client {name!r} revoked (node {node})")
                else:
                    say(f"client {name!r}: revoking node {node} failed, retrying: {out.get('error-message', out)}")
        for name in sorted(set(keys) - set(self.nodes)):
            fingerprint, f = keys[name]
            out = _flwr_json(["supernode", "register", str(f), "fedprompt", "--name", name], self.flwr_home)
            if out.get("success") and "node-id" in out:
                self.nodes[name] = (fingerprint, int(out["node-id"]))
                say(f"client {name!r} registered (node {out['node-id']})")
            else:  # e.g. the same key already registered under another name: said once, not retried
                self.nodes[name] = (fingerprint, -1)
                say(f"client {name!r} not registered: {out.get('error-message', out)}")


def client_files(root_certificates: str, auth_key: str) -> tuple[str, str]:
    """The client's CA certificate and private key paths, checked."""
    if not root_certificates or not auth_key:
        raise SecurityError(
            "fedprompt client requires TLS and a client key: set client.root_certificates to the "
            "federation's ca.crt and client.auth_key to this client's private key (`fedprompt certs client "
            "--dir CERTS --name NAME`), or pass --insecure to connect to an --insecure server"
        )
    out = []
    for what, path in (("client.root_certificates", root_certificates), ("client.auth_key", auth_key)):
        f = Path(path).expanduser()
        if not f.is_file():
            raise SecurityError(f"{what}: {path!r} is not a file")
        out.append(str(f.resolve()))
    try:
        ssl.create_default_context(cafile=out[0])
    except ssl.SSLError as e:
        raise SecurityError(f"client.root_certificates: {root_certificates!r} is not a PEM certificate ({e.reason})") from None
    if "OPENSSH PRIVATE KEY" not in Path(out[1]).read_text(encoding="utf-8", errors="replace")[:100]:
        raise SecurityError(f"client.auth_key: {auth_key!r} is not an OpenSSH private key; create one with `fedprompt certs client --dir CERTS --name NAME`")
    return out[0], out[1]


# check_server's answer when the server cannot be asked yet (not listening, reset mid-handshake):
# the client waits and asks again. A SuperNode started then could meet a server of the other
# kind (TLS vs plain) and retry for ever without a word, so none is started before a real answer.
NOT_YET = "the server is not reachable yet"


def _speaks_tls(host: str, port: int) -> bool:
    """Whether host:port completes a TLS handshake (its certificate unchecked: this only asks
    which protocol it speaks)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return True
    except (OSError, ssl.SSLError):
        return False


def check_server(address: str, *, root_certificates: str | None) -> str | None:
    """Connect to the server as the SuperNode will. None when it is fine; NOT_YET when it does not
    answer yet; else why this client can never talk to it."""
    host, port = processes.split_address(address, "--server")
    try:
        raw = socket.create_connection((host, port), timeout=5)
    except OSError:
        return NOT_YET
    with raw:
        if root_certificates is None:  # --insecure: the server must speak plain HTTP
            try:
                raw.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                head = raw.recv(5)
            except OSError:
                return NOT_YET
            if not head and not _speaks_tls(host, port):
                return NOT_YET  # accepted, then closed without a word: a proxy before its backend is up
            if not head.startswith(b"HTTP/"):
                return (
                    f"the server at {address} speaks TLS (or not HTTP); drop --insecure and set client.root_certificates "
                    "to the federation's CA certificate and client.auth_key to this client's key"
                )
            return None
        ctx = ssl.create_default_context(cafile=root_certificates)
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as e:
            return (
                f"the server at {address} is not trusted: {e.verify_message} (client.root_certificates = "
                f"{root_certificates}); use the CA that signed the server's certificate, and connect by a name "
                "or address listed in it"
            )
        except ssl.SSLError as e:
            if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):  # a plain HTTP answer
                return f"the server at {address} does not speak TLS (started with --insecure?); pass --insecure here too, or give it certificates"
            return NOT_YET  # a reset or timeout mid-handshake: ask again
        except OSError:
            return NOT_YET


# What a SuperNode's log says when it can never connect, and what to tell the user.
NOT_REGISTERED = "it is not registered there"
FATAL = [
    (
        "Failed to activate SuperNode",
        "the server refused this client's key: " + NOT_REGISTERED + ". Send "
        "{pub} to the server operator (`fedprompt certs register --dir CERTS --name NAME --public-key FILE`)",
    ),
    (
        "Unable to parse the private key",
        "client.auth_key {key} is not an OpenSSH ECDSA private key; create one with `fedprompt certs client --dir CERTS --name NAME`",
    ),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not trusted by client.root_certificates"),
]


def fatal_reason(log_tail: str, *, key: str | None) -> str | None:
    for needle, why in FATAL:
        if needle in log_tail:
            return why.format(key=key, pub=f"{key}.pub" if key else "its public key")
    return None
