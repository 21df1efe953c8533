"""fedprompt.certs: the files a TLS federation with SuperNode authentication needs.

Formats are checked against what Flower 1.42 reads (see the module docstring); a real TLS
handshake on loopback checks the server certificate the way the SuperNode's HTTP client
does (CA trust + hostname/IP against the SANs).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedprompt import certs
from fedprompt.certs import CertError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    certs.issue_server_cert(d, names=["SuperLink.Example.org", "10.1.2.3", "localhost"])
    certs.new_client_key(d, name="alice")
    return d


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _raises(fn, *words, **kwargs):
    """Call fn, expect a one-line CertError that mentions every word."""
    with pytest.raises(CertError) as err:
        fn(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg
    return msg


# ---- files, modes, certificate properties ------------------------------------------------


def test_layout_and_private_key_modes(pki):
    for name in ("ca.key", "server.key", "clients/alice"):
        assert _mode(pki / name) == 0o600, name
    for name in ("ca.crt", "server.crt", "clients/alice.pub"):
        assert _mode(pki / name) == 0o644, name
    assert not list(pki.rglob(".*.tmp"))  # no leftovers of the atomic writes


def test_server_cert_verifies_against_ca(pki):
    ca, leaf = _cert(pki / "ca.crt"), _cert(pki / "server.crt")
    leaf.verify_directly_issued_by(ca)
    store = Store([ca])
    for subject in (
        x509.DNSName("localhost"),
        x509.DNSName("superlink.example.org"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example.org")).verify(leaf, [])
    other = certs.init_ca(pki / "other")
    with pytest.raises(VerificationError):  # a different CA does not vouch for it
        PolicyBuilder().store(Store([_cert(other)])).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])


def test_openssl_accepts_server_cert_for_tls_servers(pki):
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", pki / "ca.crt", "-purpose", "sslserver", pki / "server.crt"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip().endswith(": OK"), out.stdout + out.stderr


def test_sans_extensions_and_keys(pki):
    ca, leaf = _cert(pki / "ca.crt"), _cert(pki / "server.crt")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert dns == ["superlink.example.org", "localhost"]  # lower-cased, no duplicates
    assert ips == ["10.1.2.3", "127.0.0.1", "::1"]  # IPs as IPAddress, never DNSName
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    for cert in (ca, leaf):
        assert isinstance(cert.public_key().curve, ec.SECP384R1)
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def test_default_names_are_local_only(tmp_path):
    certs.init_ca(tmp_path)
    san = _cert(certs.issue_server_cert(tmp_path)).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_tls_handshake_on_loopback(pki):
    """The SuperNode's client (httpx over ssl) checks CA and hostname exactly like this."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused us: expected in the negative cases

    threading.Thread(target=serve, daemon=True).start()

    def handshake(cafile, hostname):
        ctx = ssl.create_default_context(cafile=cafile)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname=hostname) as tls:
                return tls.version()

    try:
        assert handshake(pki / "ca.crt", "localhost")
        assert handshake(pki / "ca.crt", "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            handshake(pki / "ca.crt", "other.example.org")
        other = certs.init_ca(pki / "other-tls")
        with pytest.raises(ssl.SSLCertVerificationError, match="local issuer"):
            handshake(other, "localhost")
    finally:
        listener.close()


def test_client_key_formats(pki):
    private = (pki / "clients/alice").read_bytes()
    public = (pki / "clients/alice.pub").read_bytes()
    # Flower loads these with load_ssh_private_key / load_ssh_public_key.
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert public.startswith(b"ecdsa-sha2-nistp384 ") and public.count(b"\n") == 1
    key = serialization.load_ssh_private_key(private, password=None)
    pub = serialization.load_ssh_public_key(public)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    assert pub == key.public_key()


# ---- authorized clients ------------------------------------------------------------------


def test_register_revoke_registered(tmp_path):
    assert certs.registered(tmp_path) == {}
    for name in ("bob", "alice"):
        certs.new_client_key(tmp_path, name=name)
        certs.register(tmp_path, name=name)
    assert certs.register(tmp_path, name="alice") == tmp_path / "authorized/alice.pub"
    found = certs.registered(tmp_path)
    assert list(found) == ["alice", "bob"]
    assert found["alice"].read_bytes() == (tmp_path / "clients/alice.pub").read_bytes()
    certs.revoke(tmp_path, name="bob")
    assert list(certs.registered(tmp_path)) == ["alice"]
    assert (tmp_path / "clients/bob").exists()  # revoking removes the authorization only
    _raises(certs.revoke, "'bob'", "not registered", dir=tmp_path, name="bob")


def test_register_key_made_elsewhere(tmp_path):
    certs.new_client_key(tmp_path / "client-machine", name="carol")
    pub = tmp_path / "client-machine/clients/carol.pub"
    certs.register(tmp_path, name="carol", public_key=pub)
    assert list(certs.registered(tmp_path)) == ["carol"]
    # the same key under a second name would be refused by the SuperLink ("Public key
    # already in use"): refuse it here, naming the holder
    _raises(certs.register, "already registered", "'carol'", dir=tmp_path, name="dave", public_key=pub)
    certs.new_client_key(tmp_path, name="carol")  # a different key for the same name
    _raises(certs.register, "another key", "revoke", dir=tmp_path, name="carol")


# ---- bad input -----------------------------------------------------------------------------


def test_existing_files_need_overwrite(tmp_path):
    certs.init_ca(tmp_path)
    _raises(certs.init_ca, "ca.key", "already exists", dir=tmp_path)
    certs.issue_server_cert(tmp_path, names=["a.example"])
    _raises(certs.issue_server_cert, "server.key", "already exists", dir=tmp_path)
    certs.new_client_key(tmp_path, name="x")
    _raises(certs.new_client_key, "already exists", dir=tmp_path, name="x")
    old = (tmp_path / "ca.crt").read_bytes()
    certs.init_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.crt").read_bytes() != old
    assert _mode(tmp_path / "ca.key") == 0o600
    certs.new_client_key(tmp_path, name="x", overwrite=True)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a.pub", "a b", "-x", "é", "x" * 65, None])
def test_invalid_client_names(tmp_path, name):
    for fn in (certs.new_client_key, certs.register, certs.revoke):
        _raises(fn, "invalid client name", dir=tmp_path, name=name)
    assert not (tmp_path / "clients").exists()


def test_unknown_client(tmp_path):
    _raises(certs.register, "unknown client 'ghost'", dir=tmp_path, name="ghost")
    _raises(certs.register, "does not exist", dir=tmp_path, name="ghost", public_key=tmp_path / "nope.pub")


@pytest.mark.parametrize("bad", ["https://a.example", "host:8080", "", "  ", "bad_host!", "10.0.0", "a..b", "-a.b"])
def test_invalid_server_names(tmp_path, bad):
    certs.init_ca(tmp_path)
    _raises(certs.issue_server_cert, "invalid server name", dir=tmp_path, names=[bad])
    assert not (tmp_path / "server.key").exists()


def test_names_must_be_a_list(tmp_path):
    certs.init_ca(tmp_path)
    _raises(certs.issue_server_cert, "not a string", dir=tmp_path, names="a.example")


def test_days_must_be_positive(tmp_path):
    _raises(certs.init_ca, "days", dir=tmp_path, days=0)


def test_issuing_needs_a_ca(tmp_path):
    _raises(certs.issue_server_cert, "no CA", "ca.key", dir=tmp_path)


def test_corrupt_ca(tmp_path):
    certs.init_ca(tmp_path)
    (tmp_path / "ca.key").write_text("garbage")
    _raises(certs.issue_server_cert, "ca.key", "not a readable", dir=tmp_path)
    certs.init_ca(tmp_path / "b")
    shutil.copy(tmp_path / "b/ca.key", tmp_path / "ca.key")  # a key of another CA
    _raises(certs.issue_server_cert, "does not match", dir=tmp_path)
    (tmp_path / "ca.crt").write_text("garbage")
    _raises(certs.issue_server_cert, "ca.crt", "not a PEM certificate", dir=tmp_path)


def test_corrupt_or_wrong_public_keys(tmp_path):
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients/eve.pub").write_text("not a key\n")
    _raises(certs.register, "not an OpenSSH public key", dir=tmp_path, name="eve")
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "clients/eve.pub").write_bytes(p256)
    _raises(certs.register, "not an ECDSA P-384 key", dir=tmp_path, name="eve")
    # a damaged authorized/ file stops a server at startup, not mid-registration
    (tmp_path / "authorized").mkdir()
    (tmp_path / "authorized/mallory.pub").write_text("junk")
    _raises(certs.registered, "mallory.pub", dir=tmp_path)
