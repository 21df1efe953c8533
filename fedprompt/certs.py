"""Certificates and node keys for a TLS federation with SuperNode authentication.

One folder holds everything a federation needs:

    ca.key, ca.crt            self-signed CA (the file SuperNodes and `flwr` trust)
    server.key, server.crt    the SuperLink's TLS pair, signed by the CA
    clients/<name>[.pub]      a SuperNode's auth key pair (OpenSSH, ECDSA P-384)
    authorized/<name>.pub     public keys the server registers with its SuperLink

Formats are the ones Flower 1.42 reads: PEM certificates and PKCS#8 keys for TLS
(`flower-superlink --ssl-*`, `flower-supernode --root-certificates`), an OpenSSH private
key ("BEGIN OPENSSH PRIVATE KEY") for `flower-supernode --auth-supernode-private-key` and
an OpenSSH public key line ("ecdsa-sha2-nistp384 ...") for `flwr supernode register`.
Private keys are written 0600 and never encrypted: the processes read them unattended.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprompt.errors import UserError

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
CLIENTS, AUTHORIZED = "clients", "authorized"
# Always in the server certificate: the SuperLink's own SuperExec connects to 127.0.0.1
# (Flower rewrites a 0.0.0.0 bind address to it, [::] to [::1]) and local tools use them.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")

_CURVE = ec.SECP384R1()  # what Flower's docs ask for; also fine for TLS
_HASH = hashes.SHA384()
_CLOCK_SKEW = dt.timedelta(minutes=5)  # a peer whose clock is a bit behind still accepts
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CertError(UserError, ValueError):
    """Bad input for a certificate operation; the message is one line for the user."""


def init_ca(dir: str | Path, *, days: int = 3650, overwrite: bool = False) -> Path:
    """Create a self-signed CA (`ca.key` 0600, `ca.crt`) in `dir`; return the cert path.

    A new CA invalidates every server certificate issued by the old one, hence the
    explicit `overwrite`.
    """
    d = Path(dir)
    _check_days(days)
    _refuse_existing([d / CA_KEY, d / CA_CERT], overwrite)
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprompt federation CA")])
    start = _now() - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: this CA signs server certificates only, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, _HASH)
    )
    d.mkdir(parents=True, exist_ok=True)
    _write(d / CA_KEY, _pem_key(key), private=True)
    _write(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return d / CA_CERT


def issue_server_cert(dir: str | Path, *, names: Sequence[str] = (), days: int = 825, overwrite: bool = False) -> Path:
    """Create `server.key` (0600) and `server.crt` signed by the CA in `dir`.

    `names` are the host names or IP addresses clients use to reach the SuperLink; they
    become DNS/IP SubjectAlternativeNames (what TLS clients check; the CN is ignored),
    together with localhost, 127.0.0.1 and ::1. Returns the certificate path.
    """
    d = Path(dir)
    _check_days(days)
    if isinstance(names, str):  # a lone string would be split into characters
        raise CertError("names must be a list of host names or IP addresses, not a string")
    sans = _subject_alt_names([*names, *LOCAL_NAMES])
    ca_key, ca_cert = _load_ca(d)
    _refuse_existing([d / SERVER_KEY, d / SERVER_CERT], overwrite)
    key = ec.generate_private_key(_CURVE)
    start = _now() - _CLOCK_SKEW
    # A leaf outliving its CA fails verification later, far from here: cap it.
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    # TLS clients match the SANs only; a fixed CN avoids the CN's 64-character limit.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedprompt SuperLink")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, _HASH)
    )
    _write(d / SERVER_KEY, _pem_key(key), private=True)
    _write(d / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return d / SERVER_CERT


def new_client_key(dir: str | Path, *, name: str, overwrite: bool = False) -> Path:
    """Create a SuperNode auth key pair `clients/<name>` (0600) + `clients/<name>.pub`.

    Returns the private key path (for `flower-supernode --auth-supernode-private-key`).
    """
    _check_name(name)
    folder = Path(dir) / CLIENTS
    private, public = folder / name, folder / f"{name}.pub"
    _refuse_existing([private, public], overwrite)
    key = ec.generate_private_key(_CURVE)
    folder.mkdir(parents=True, exist_ok=True)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
    _write(public, _ssh_public_line(key.public_key(), name))
    return private


def register(dir: str | Path, *, name: str, public_key: str | Path | None = None) -> Path:
    """Authorize client `name`: copy its public key to `authorized/<name>.pub`.

    The key is `clients/<name>.pub` unless `public_key` points to a file (a key made on
    the client's own machine). Registering the same key again is a no-op. Returns the
    authorized file's path.
    """
    _check_name(name)
    d = Path(dir)
    source = Path(public_key) if public_key is not None else d / CLIENTS / f"{name}.pub"
    if not source.is_file():
        if public_key is None:
            raise CertError(f"unknown client {name!r}: no public key {source}")
        raise CertError(f"public key file {source} does not exist")
    line = _ssh_public_line(_load_public(source), name)
    target = d / AUTHORIZED / f"{name}.pub"
    for other, path in registered(d).items():
        if _same_key(path.read_bytes(), line):
            if other == name:
                return target
            # Flower refuses a second node with the same key; say so here, by name.
            raise CertError(f"this public key is already registered as client {other!r}")
    if target.exists():
        raise CertError(f"client {name!r} is registered with another key; revoke it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write(target, line)
    return target


def revoke(dir: str | Path, *, name: str) -> None:
    """Remove client `name` from `authorized/`.

    A running SuperLink keeps the node until `flwr supernode unregister NODE_ID`, and
    after that it never accepts the same key again: re-admitting needs a new key.
    """
    _check_name(name)
    target = Path(dir) / AUTHORIZED / f"{name}.pub"
    if not target.is_file():
        raise CertError(f"client {name!r} is not registered")
    target.unlink()


def registered(dir: str | Path) -> dict[str, Path]:
    """Authorized clients, name -> public key file, sorted by name; each key is checked
    so that a server fails at startup on a bad file rather than mid-registration."""
    folder = Path(dir) / AUTHORIZED
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.pub")):
        name = path.name[: -len(".pub")]
        if not _NAME.fullmatch(name):
            raise CertError(f"{path}: file name is not a valid client name")
        _load_public(path)
        out[name] = path
    return out


# ---- helpers -----------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise CertError(f"days must be a positive whole number, got {days!r}")


def _check_name(name: str) -> None:
    # Names become file names: no separators, no dots (so "a.pub" cannot shadow a's key).
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CertError(f"invalid client name {name!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit")


def _subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in names:
        if not isinstance(raw, str) or not raw.strip():
            raise CertError(f"invalid server name {raw!r}: expected a host name or IP")
        name = raw.strip()
        try:
            ip = ipaddress.ip_address(name.strip("[]"))
            key, general = str(ip), x509.IPAddress(ip)
        except ValueError:
            host = name.lower().rstrip(".")
            labels = host.split(".")
            # An all-digit last label is a mistyped IP ("10.0.0"), not a host name.
            valid = len(host) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in labels)
            if not valid or labels[-1].isdigit():
                raise CertError(
                    f"invalid server name {raw!r}: expected a host name or IP address without scheme or port (e.g. superlink.example.org, 10.0.0.5)"
                ) from None
            key, general = host, x509.DNSName(host)
        if key not in seen:
            seen.add(key)
            out.append(general)
    return out


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = d / CA_KEY, d / CA_CERT
    for path in (key_path, cert_path):
        if not path.is_file():
            raise CertError(f"no CA in {d}: {path.name} is missing (create the CA first)")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertError(f"{key_path} is not a readable unencrypted PEM private key") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise CertError(f"{cert_path} is not a PEM certificate") from None
    matches = isinstance(key, ec.EllipticCurvePrivateKey) and cert.public_key() == key.public_key()
    if not matches:
        raise CertError(f"{key_path} does not match {cert_path}")
    return key, cert


def _load_public(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{path} is not an OpenSSH public key") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)):
        raise CertError(f"{path} is not an ECDSA P-384 key (ecdsa-sha2-nistp384)")
    return key


def _ssh_public_line(key: ec.EllipticCurvePublicKey, name: str) -> bytes:
    # The comment only helps a human reading authorized/; Flower ignores it.
    body = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return body + f" fedprompt-{name}\n".encode()


def _same_key(a: bytes, b: bytes) -> bool:
    return a.split()[:2] == b.split()[:2]  # type and key blob, not the comment


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise CertError(f"{path} already exists (pass --overwrite to replace it)")


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    # Written to a temporary name created with the final mode, then renamed: a private
    # key is never readable by others, not even for a moment, and a crash leaves no
    # half-written file under the real name.
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # the umask can only narrow, but be exact for public files
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
