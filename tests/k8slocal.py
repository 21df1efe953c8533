"""Rendered Kubernetes manifests -> local process specs (argv, env, mounted files).

Used by tests/test_deploy.py (what each container would see) and tests/test_deploy_smoke.py
(which starts those processes locally and completes a round).

Two kinds of container run locally: the fedprompt image's (its ENTRYPOINT stood in for by
this interpreter's `python -m fedprompt`) and nginx's (any image whose name is nginx or
nginx-something: the local `nginx` binary with the container's config file, its paths and
ports rewritten for this machine).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: What the images run before the manifests' args: ENTRYPOINT ["/usr/bin/tini", "--", "fedprompt"].
#: Locally, `python -m fedprompt` of this interpreter stands in for it (tini only reaps and
#: forwards signals).
LOCAL_ENTRYPOINT = (sys.executable, "-m", "fedprompt")

#: Debian's nginx is in /usr/sbin, which is not on every user's PATH.
NGINX_PLACES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def nginx_binary() -> str | None:
    """The local nginx executable, or None when nginx is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_PLACES if os.access(p, os.X_OK)), None)


def is_nginx_image(image: str) -> bool:
    """`nginx:1.27`, `nginxinc/nginx-unprivileged:1.27-alpine`, `registry/x/nginx@sha256:...`."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return name == "nginx" or name.startswith("nginx-")


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion in command, args and env values: a defined VAR is
    replaced, an undefined one is left as written, `$$` is a literal `$`."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def local_specs(
    objects: Sequence[dict], root: Path, *, entrypoint: Sequence[str] = LOCAL_ENTRYPOINT, ports: Mapping[int, int] | None = None
) -> dict[str, list[dict]]:
    """Local process specs of every container of every Deployment and StatefulSet in
    `objects` (the rendered manifests of one overlay), with the pods' volumes under `root`.

    Returns {workload name: [one spec per pod and container]}; a spec is a dict:

    - ``pod``, ``container``: names. StatefulSet pods are <name>-0 .. <name>-(replicas-1)
      with the labels Kubernetes adds (``apps.kubernetes.io/pod-index``, ...); Deployment
      pods are <name>-0, ... (a real pod name has a random suffix).
    - ``init``: True for an init container (run it to completion first).
    - ``argv``: the container's command (else `entrypoint`, standing in for the image's
      ENTRYPOINT) + args, `$(VAR)`-expanded with its env, container paths rewritten.
    - ``env``: the variables the manifest sets (envFrom, then env in order: values,
      configMapKeyRef, secretKeyRef, fieldRef on the pod's metadata), expanded, paths
      rewritten. Not the image's ENV nor os.environ: merge those in to run it.
    - ``mounts``: {mountPath: local folder}; ``rewrites``: [(container path, local path)],
      longest first, as applied to argv and env (a whole path or a prefix ending at "/").
    - ``files``: every file written for its Secret, ConfigMap and projected volumes, laid
      out as the kubelet does (``items`` paths, file modes).
    - ``ports``: {port name (or number as text): containerPort}.
    - ``nginx``: True for an nginx container (`is_nginx_image`). Its ``argv`` is the local
      nginx binary (`nginx_binary()`, or plain "nginx" when absent) with the container's own
      options (its command is required: the image's default config is not in the
      manifests), `-c` pointing to ``conf``: a copy of the container's config file with its
      mounted paths rewritten like argv (so pid and temporary files land in the pod's local
      volumes), its `listen` ports on 127.0.0.1 and its loopback upstreams
      (127.0.0.1:PORT, localhost:PORT) mapped through `ports`; plus `-p` (a prefix folder of
      its own) and `-e stderr` unless given, and, run by root, `user root;` (in the pod,
      master and workers share one unprivileged uid; as root nginx would otherwise hand its
      workers to `nobody`). The config must not set `user` itself.

    `ports` ({container port: local port}) moves what listens in a pod to free local ports:
    pods share this machine's loopback here, unlike in a cluster. It applies to nginx
    configs only; the caller maps fedprompt's own arguments.

    Volumes: Secret/ConfigMap/projected contents are rewritten on every call; an emptyDir is
    root/<pod>/volumes/<name> and kept; a persistentVolumeClaim is root/volumes/<claim> and a
    StatefulSet's volumeClaimTemplate root/volumes/<template>-<pod>, kept across calls, so a
    process started again finds its data like a restarted pod. A reference to a missing
    ConfigMap/Secret or key (not optional) raises ValueError, as the pod would not start.
    """
    root = Path(root)
    by_kind: dict[tuple[str, str], dict] = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    out: dict[str, list[dict]] = {}
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind not in ("Deployment", "StatefulSet"):
            continue
        spec = obj["spec"]
        replicas = spec.get("replicas", 1)
        template = spec["template"]
        claim_templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        out[name] = []
        for i in range(replicas):
            pod = f"{name}-{i}"
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if kind == "StatefulSet":
                labels.update({"apps.kubernetes.io/pod-index": str(i), "statefulset.kubernetes.io/pod-name": pod})
            meta = {
                "name": pod,
                "namespace": obj["metadata"].get("namespace", "default"),
                "labels": labels,
                "annotations": dict(template.get("metadata", {}).get("annotations", {})),
            }
            volumes = _materialize_volumes(template["spec"], pod, meta, root, by_kind, claim_templates)
            pod_spec = template["spec"]
            containers = [(c, True) for c in pod_spec.get("initContainers", [])]
            containers += [(c, False) for c in pod_spec["containers"]]
            for c, init in containers:
                out[name].append(_container_spec(c, init, pod, meta, pod_spec, volumes, by_kind, entrypoint, root=root, ports=dict(ports or {})))
    return out


def _lookup(by_kind: dict, kind: str, name: str, key: str | None, optional: bool, what: str):
    obj = by_kind.get((kind, name))
    if obj is None:
        if optional:
            return None
        raise ValueError(f"{what}: {kind} {name!r} is not in the rendered manifests")
    data = _decoded(obj)
    if key is None:
        return data
    if key not in data:
        if optional:
            return None
        raise ValueError(f"{what}: {kind} {name!r} has no key {key!r} (it has {sorted(data)})")
    return data[key]


def _decoded(obj: dict) -> dict[str, bytes]:
    """A ConfigMap's or Secret's contents as bytes per key."""
    data = {k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
    if obj["kind"] == "Secret":
        data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
    else:
        data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _field(path: str, meta: dict) -> str:
    m = _FIELD.fullmatch(path)
    if m:
        return meta[m.group(1)].get(m.group(2), "")
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "spec.nodeName": "localhost",
        "spec.serviceAccountName": "default",
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path not in simple:
        raise ValueError(f"fieldRef {path!r} is not supported locally")
    return simple[path]


def _write_files(folder: Path, entries: list[tuple[str, bytes, int]], files: list[Path]) -> None:
    for rel, content, mode in entries:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
        files.append(target)


def _source_entries(source: dict, kind: str, default_mode: int, by_kind: dict, what: str) -> list[tuple[str, bytes, int]]:
    """(relative path, content, mode) of one configMap/secret volume or projected source."""
    name = source.get("name") or source.get("secretName")
    optional = bool(source.get("optional", False))
    data = _lookup(by_kind, kind, name, None, optional, what)
    if data is None:
        return []
    if "items" not in source:
        return [(k, v, default_mode) for k, v in sorted(data.items())]
    entries = []
    for item in source["items"]:
        if item["key"] not in data:
            if optional:
                continue
            raise ValueError(f"{what}: {kind} {name!r} has no key {item['key']!r} (it has {sorted(data)})")
        entries.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
    return entries


def _materialize_volumes(pod_spec: dict, pod: str, meta: dict, root: Path, by_kind: dict, claim_templates: set[str]) -> dict[str, tuple[Path, list[Path]]]:
    """volume name -> (local folder, files written)."""
    volumes: dict[str, tuple[Path, list[Path]]] = {}
    for claim in claim_templates:
        folder = root / "volumes" / f"{claim}-{pod}"
        folder.mkdir(parents=True, exist_ok=True)
        volumes[claim] = (folder, [])
    for vol in pod_spec.get("volumes", []):
        vname, files = vol["name"], []
        what = f"pod {pod}, volume {vname}"
        if "persistentVolumeClaim" in vol:
            folder = root / "volumes" / vol["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
        elif "emptyDir" in vol:
            folder = root / pod / "volumes" / vname
            folder.mkdir(parents=True, exist_ok=True)
        else:
            folder = root / pod / "volumes" / vname
            if folder.exists():  # contents come from the manifests alone, as in a new pod
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            if "secret" in vol:
                src = vol["secret"]
                entries = _source_entries(src, "Secret", src.get("defaultMode", 0o644), by_kind, what)
            elif "configMap" in vol:
                src = vol["configMap"]
                entries = _source_entries(src, "ConfigMap", src.get("defaultMode", 0o644), by_kind, what)
            elif "projected" in vol:
                mode = vol["projected"].get("defaultMode", 0o644)
                entries = []
                for s in vol["projected"]["sources"]:
                    if "secret" in s:
                        entries += _source_entries(s["secret"], "Secret", mode, by_kind, what)
                    elif "configMap" in s:
                        entries += _source_entries(s["configMap"], "ConfigMap", mode, by_kind, what)
                    elif "downwardAPI" in s:
                        entries += [(it["path"], _field(it["fieldRef"]["fieldPath"], meta).encode(), it.get("mode", mode)) for it in s["downwardAPI"]["items"]]
                    else:
                        raise ValueError(f"{what}: projected source {sorted(s)} is not supported locally")
            else:
                raise ValueError(f"{what}: volume type {sorted(set(vol) - {'name'})} is not supported locally")
            _write_files(folder, entries, files)
        volumes[vname] = (folder, files)
    return volumes


def _container_spec(
    c: dict, init: bool, pod: str, meta: dict, pod_spec: dict, volumes: dict, by_kind: dict, entrypoint: Sequence[str], *, root: Path, ports: dict[int, int]
) -> dict:
    what = f"pod {pod}, container {c['name']}"
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        for kind, ref in (("ConfigMap", src.get("configMapRef")), ("Secret", src.get("secretRef"))):
            if ref:
                data = _lookup(by_kind, kind, ref["name"], None, bool(ref.get("optional")), what) or {}
                env.update({prefix + k: v.decode() for k, v in data.items()})
    for var in c.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = _field(source["fieldRef"]["fieldPath"], meta)
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source else ("Secret", source["secretKeyRef"])
            value = _lookup(by_kind, kind, ref["name"], ref["key"], bool(ref.get("optional")), what)
            if value is not None:
                env[var["name"]] = value.decode()
        else:
            raise ValueError(f"{what}: env {var['name']}: {sorted(source)} is not supported locally")

    mounts: dict[str, Path] = {}
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            raise ValueError(f"{what}: volumeMount of an undefined volume {m['name']!r}")
        folder, _ = volumes[m["name"]]
        sub = m.get("subPath") or expand(m.get("subPathExpr", ""), env)
        mounts[m["mountPath"].rstrip("/") or "/"] = folder / sub if sub else folder
    rewrites = sorted(((k, str(v)) for k, v in mounts.items()), key=lambda kv: -len(kv[0]))
    rewrite = _rewriter(rewrites)

    # The local entrypoint is a path on this machine, not in the container: never rewritten
    # (a checkout under /tmp would otherwise land in the pod's /tmp volume).
    nginx = is_nginx_image(c.get("image", ""))
    if nginx and not c.get("command"):
        raise ValueError(
            f"{what}: an nginx container needs its command (nginx -c <config> ...) to run locally: the image's default config is not in the manifests"
        )
    command = [rewrite(expand(a, env)) for a in c["command"]] if c.get("command") else list(entrypoint)
    argv = command + [rewrite(expand(a, env)) for a in c.get("args", [])]
    conf = None
    if nginx:
        argv, conf = _nginx_local(argv, rewrite, root / pod / "containers" / c["name"], ports, what)
    files = [f for name in {m["name"] for m in c.get("volumeMounts", [])} for f in volumes[name][1]]
    return {
        "pod": pod,
        "container": c["name"],
        "init": init,
        "nginx": nginx,
        "conf": conf,
        "argv": argv,
        "env": {k: rewrite(v) for k, v in env.items()},
        "mounts": mounts,
        "rewrites": rewrites,
        "files": sorted(files),
        "ports": {str(p.get("name", p["containerPort"])): p["containerPort"] for p in c.get("ports", [])},
    }


def _rewriter(rewrites: list[tuple[str, str]]):
    """Replace container paths by local ones in one pass (a local path is never rewritten
    again, even if it happens to contain a mount path such as /tmp)."""
    if not rewrites:
        return lambda s: s
    table = dict(rewrites)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(k) for k, _ in rewrites) + r")(?=/|$|[^\w.-])")
    return lambda s: pattern.sub(lambda m: table[m.group(1)], s)


_LISTEN = re.compile(r"(?m)^(\s*listen\s+)(?:\S*:)?(\d+)(?=[\s;])")
_LOOPBACK = re.compile(r"(?<![\w.-])(127\.0\.0\.1|localhost):(\d+)\b")
_USER = re.compile(r"(?m)^\s*user\s")


def _nginx_local(argv: list[str], rewrite, folder: Path, ports: dict[int, int], what: str) -> tuple[list[str], Path]:
    """The container's nginx command line -> the local one, with its config rewritten into
    `folder` (see `local_specs`)."""
    args = list(argv[1:])
    if "-c" not in args or args.index("-c") + 1 >= len(args):
        raise ValueError(f"{what}: nginx without `-c <config>`: the image's default config is not in the manifests")
    i = args.index("-c") + 1
    source = Path(args[i])  # already the local file of the mounted ConfigMap
    if not source.is_file():
        raise ValueError(f"{what}: nginx config {args[i]} is not in a mounted volume")
    text = rewrite(source.read_text())
    if _USER.search(text):
        raise ValueError(f"{what}: {source.name} sets `user`: an unprivileged container cannot switch users")
    port = lambda m: ports.get(int(m.group(2)), int(m.group(2)))  # noqa: E731
    text = "".join(
        _LISTEN.sub(lambda m: f"{m.group(1)}127.0.0.1:{port(m)}", line) if _LISTEN.match(line) else _LOOPBACK.sub(lambda m: f"{m.group(1)}:{port(m)}", line)
        for line in text.splitlines(keepends=True)
    )
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / source.name
    conf.write_text(text)
    args[i] = str(conf)
    if "-p" not in args:
        args = ["-p", f"{folder}/", *args]
    if "-e" not in args:
        args = ["-e", "stderr", *args]
    if os.geteuid() == 0:
        if "-g" in args and args.index("-g") + 1 < len(args):
            j = args.index("-g") + 1
            args[j] = args[j].rstrip() + " user root;"
        else:
            args += ["-g", "user root;"]
    return [nginx_binary() or "nginx", *args], conf


# ---- rendering ------------------------------------------------------------------------------------
