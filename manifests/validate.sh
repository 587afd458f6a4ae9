#!/usr/bin/env bash
# Validates the manifests offline; exits non-zero on any problem.
#
# 1. Every resource in every manifest against the Kubernetes $K8S_VERSION OpenAPI schemas, strict
#    (unknown fields are errors), with kubernetes-validate, which bundles the schemas (no network).
#    A kind it has no schema for (a typo in `kind:`) is an error here, not the tool's warning.
# 2. What the schemas cannot see: duplicate YAML keys; kustomization.yaml lists exactly the
#    manifests of this directory; namespaced objects sit in istio-system; every ServiceAccount,
#    ConfigMap (and key), Secret (and key) and ClusterRole referred to exists; DaemonSet selectors
#    match their pod labels; every image is the kustomization's image; the agent's config.json
#    and the CNI entry are well-formed and agree with the ztunnel DaemonSet (namespace + name
#    prefix) and the agent's socket.
# (Rendering the kustomization needs kubectl or kustomize, which this machine does not have.)
#
# kubernetes-validate comes from PyPI (.ci/run installs it into target/manifest-venv):
#   /usr/bin/python3 -m venv target/manifest-venv
#   target/manifest-venv/bin/pip install kubernetes-validate==1.37.0
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
K8S_VERSION=${K8S_VERSION:-1.30.0}

kv=${KUBERNETES_VALIDATE:-}
if [ -z "$kv" ]; then
  if [ -x "$root/target/manifest-venv/bin/kubernetes-validate" ]; then
    kv=$root/target/manifest-venv/bin/kubernetes-validate
  else
    kv=$(command -v kubernetes-validate || true)
  fi
fi
if [ -z "$kv" ]; then
  echo "validate.sh: kubernetes-validate not found; install it (see the top of $0) or run .ci/run" >&2
  exit 2
fi
# The Python next to kubernetes-validate has PyYAML (a dependency of kubernetes-validate).
py=$(dirname "$kv")/python
[ -x "$py" ] || py=python3

cd "$here"
manifests=()
for f in *.yaml; do
  [ "$f" = kustomization.yaml ] || manifests+=("$f")
done

out=$("$kv" --strict -k "$K8S_VERSION" "${manifests[@]}" 2>&1) && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || grep -qvE '^INFO ' <<<"$out"; then
  echo "$out" >&2
  echo "validate.sh: schema validation against Kubernetes $K8S_VERSION failed" >&2
  exit 1
fi
resources=$(grep -c '^INFO .* passed for resource' <<<"$out")

"$py" - "${manifests[@]}" <<'PY'
import json, sys
import yaml

NS = "istio-system"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
AGENT_KEYS = {"ambientNamespaces", "excludedNamespaces", "optOutPods", "ztunnel"}
PLUGIN_KEYS = {"type", "agentSocket", "logFile", "logLevel", "failOpen",
               "excludedNamespaces", "timeoutMs"}
ZTUNNEL_KEYS = {"workloads", "services", "policies"}
errors = []

def err(msg):
    errors.append(msg)

class NoDuplicates(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", k.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)

NoDuplicates.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

def load(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=NoDuplicates) if d is not None]

objs = {}
for path in sys.argv[1:]:
    try:
        docs = load(path)
    except yaml.YAMLError as e:
        err(f"{path}: {e}")
        continue
    if not docs:
        err(f"{path}: no resources")
    for d in docs:
        kind, meta = d.get("kind"), d.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace")
        where = f"{path}: {kind}/{name}"
        if kind in CLUSTER_SCOPED:
            if ns is not None:
                err(f"{where}: cluster-scoped, must not have a namespace")
        elif ns != NS:
            err(f"{where}: namespace must be {NS}, not {ns!r}")
        if (kind, ns, name) in objs:
            err(f"{where}: defined twice")
        objs[(kind, ns, name)] = d

# kustomization.yaml: exactly the manifests, each once.
try:
    kust = load("kustomization.yaml")[0]
except (OSError, yaml.YAMLError, IndexError) as e:
    err(f"kustomization.yaml: {e}")
    kust = {}
if kust.get("kind") != "Kustomization":
    err("kustomization.yaml: kind must be Kustomization")
listed = kust.get("resources") or []
for r in sorted({r for r in listed if listed.count(r) > 1}):
    err(f"kustomization.yaml: {r} listed twice")
for r in sorted(set(sys.argv[1:]) - set(listed)):
    err(f"kustomization.yaml: does not list {r}")
for r in sorted(set(listed) - set(sys.argv[1:])):
    err(f"kustomization.yaml: lists {r}, which is not a manifest here")
images = {i.get("name") for i in kust.get("images") or []}

def get(kind, name, ns=NS):
    return objs.get((kind, None if kind in CLUSTER_SCOPED else ns, name))

# Cross-references.
for (kind, ns, name), d in objs.items():
    where = f"{kind}/{name}"
    if kind == "ClusterRoleBinding":
        ref = d["roleRef"]
        if not get(ref["kind"], ref["name"]):
            err(f"{where}: roleRef {ref['kind']}/{ref['name']} does not exist")
        for s in d.get("subjects") or []:
            if s["kind"] == "ServiceAccount" and not get("ServiceAccount", s["name"], s.get("namespace")):
                err(f"{where}: subject ServiceAccount {s.get('namespace')}/{s['name']} does not exist")
    if kind != "DaemonSet":
        continue
    sel = d["spec"]["selector"].get("matchLabels") or {}
    labels = d["spec"]["template"]["metadata"].get("labels") or {}
    if not sel or any(labels.get(k) != v for k, v in sel.items()):
        err(f"{where}: selector {sel} does not match the pod labels {labels}")
    pod = d["spec"]["template"]["spec"]
    sa = pod.get("serviceAccountName")
    if not sa or not get("ServiceAccount", sa, ns):
        err(f"{where}: serviceAccountName {sa!r} does not exist")
    for v in pod.get("volumes") or []:
        for src, kind2, key in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName")):
            if src in v:
                target = get(kind2, v[src][key], ns)
                if not target:
                    err(f"{where}: volume {v['name']}: {kind2} {v[src][key]} does not exist")
                    continue
                data = {**(target.get("data") or {}), **(target.get("stringData") or {})}
                for item in v[src].get("items") or []:
                    if item["key"] not in data:
                        err(f"{where}: volume {v['name']}: {kind2} {v[src][key]} has no key {item['key']}")
    for c in (pod.get("initContainers") or []) + pod["containers"]:
        repo = c["image"].rsplit(":", 1)[0]
        if repo not in images:
            err(f"{where}: container {c['name']}: image {repo} is not the kustomization's image")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                cm = get("ConfigMap", ref["name"], ns)
                if not cm or ref["key"] not in (cm.get("data") or {}):
                    err(f"{where}: container {c['name']}: env {e['name']}: no ConfigMap key {ref['name']}/{ref['key']}")

# The agent's settings agree with the ztunnel DaemonSet and the agent's socket.
cm = get("ConfigMap", "ambient-agent-config")
agent = get("DaemonSet", "ambient-agent")
if not cm or not agent:
    err("ConfigMap ambient-agent-config and DaemonSet ambient-agent must exist")
else:
    try:
        conf = json.loads(cm["data"]["config.json"])
        unknown = set(conf) - AGENT_KEYS
        if unknown:
            err(f"config.json: unknown keys {sorted(unknown)} (the agent refuses them)")
        zt = conf["ztunnel"]
        if set(zt) != {"namespace", "podNamePrefix"} or not all(zt.values()):
            err("config.json: ztunnel needs exactly namespace and podNamePrefix, both non-empty")
        ds = [n for (k, ns, n), d in objs.items() if k == "DaemonSet" and ns == zt["namespace"]
              and n.startswith(zt["podNamePrefix"])
              and d["spec"]["template"]["spec"]["containers"][0]["command"] == ["ztunnel"]]
        if not ds:
            err(f"config.json: no ztunnel DaemonSet in {zt['namespace']} named {zt['podNamePrefix']}*")
    except (KeyError, TypeError, ValueError) as e:
        err(f"config.json: {e!r}")
    try:
        plugin = json.loads(cm["data"]["cni-plugin.json"])
        if not isinstance(plugin, dict) or plugin.get("type") != "ambient-cni":
            err('cni-plugin.json: must be an object with "type": "ambient-cni"')
        else:
            unknown = set(plugin) - PLUGIN_KEYS
            if unknown:
                err(f"cni-plugin.json: unknown keys {sorted(unknown)}")
            if NS in (plugin.get("excludedNamespaces") or []):
                err(f"cni-plugin.json: {NS} must not be excluded (the ztunnel pod registers through the plugin)")
            args = agent["spec"]["template"]["spec"]["containers"][0]["args"]
            sock = next((a.split("=", 1)[1] for a in args if a.startswith("--socket=")), None)
            if plugin.get("agentSocket") != sock:
                err(f"cni-plugin.json: agentSocket {plugin.get('agentSocket')!r} is not the agent's --socket {sock!r}")
    except (KeyError, TypeError, ValueError) as e:
        err(f"cni-plugin.json: {e!r}")

zcm = get("ConfigMap", "ztunnel-config")
try:
    zconf = yaml.load(zcm["data"]["config.yaml"], Loader=NoDuplicates) or {}
    unknown = set(zconf) - ZTUNNEL_KEYS
    if unknown:
        err(f"ztunnel config.yaml: unknown keys {sorted(unknown)} (ztunnel refuses them)")
except (KeyError, TypeError, yaml.YAMLError) as e:
    err(f"ztunnel config.yaml: {e!r}")

for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
echo "manifests: $resources resources in ${#manifests[@]} files valid against Kubernetes $K8S_VERSION (strict); kustomization and cross-references OK"
