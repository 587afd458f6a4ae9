#!/usr/bin/env bash
# Validates the manifests offline; exits non-zero on any problem.
#
# 1. Every resource in every manifest against the Kubernetes $K8S_VERSION OpenAPI schemas, strict
#    (unknown fields are errors), with kubernetes-validate, which bundles the schemas (no network).
#    A kind it has no schema for (a typo in `kind:`) is an error here, not the tool's warning.
# 2. What the schemas cannot see: duplicate YAML keys; kustomization.yaml lists exactly the
#    manifests of this directory; namespaced objects sit in istio-system; every ServiceAccount,
#    ConfigMap (and key), Secret (and key) and ClusterRole referred to exists; DaemonSet selectors
#    match their pod labels; every image is the kustomization's image; both binaries run in
#    Kubernetes mode with --node-name from the downward API; the agent's --ztunnel-namespace and
#    --ztunnel-label select exactly the ztunnel DaemonSet's pods; the excluded namespaces agree
#    (agent, ztunnel, CNI entry); the CNI entry is well-formed and names the agent's socket;
#    ztunnel's config file is the mounted ConfigMap's and holds policies only; --proc-netns
#    agrees with hostPID; each ServiceAccount is granted exactly what its binary uses.
# 3. The waypoint template and examples (waypoint/): see that section below.
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

# The two binaries' flags agree with each other, with the DaemonSets and with the CNI entry.
def container(ds_name, command):
    d = get("DaemonSet", ds_name)
    if not d:
        err(f"DaemonSet {ds_name} must exist")
        return None, None
    for c in d["spec"]["template"]["spec"]["containers"]:
        if c.get("command") == [command]:
            return d, c
    err(f"DaemonSet {ds_name}: no container runs {command}")
    return d, None

def flags(c):
    """--name=value flags (and bare --name switches) of a container."""
    out = {}
    for a in (c or {}).get("args") or []:
        if a.startswith("--"):
            k, _, v = a[2:].partition("=")
            out[k] = v
    return out

def node_name_from_downward_api(where, c, f):
    if f.get("node-name") != "$(NODE_NAME)":
        err(f"{where}: needs --node-name=$(NODE_NAME)")
    env = {e["name"]: e for e in c.get("env") or []}
    ref = ((env.get("NODE_NAME") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    if ref.get("fieldPath") != "spec.nodeName":
        err(f"{where}: env NODE_NAME must come from the downward API's spec.nodeName")

def namespace_list(v):
    return sorted(n for n in v.split(",") if n)

agent_ds, agent = container("ambient-agent", "ambient-agent")
zt_ds, zt = container("ztunnel", "ztunnel")
af, zf = flags(agent), flags(zt)
excluded = {}
if agent:
    if (agent.get("args") or [None])[0] != "run" or "kube" not in af:
        err("ambient-agent: must run `ambient-agent run --kube` (Kubernetes mode)")
    node_name_from_downward_api("ambient-agent", agent, af)
    # The ztunnel pod is found by namespace AND label AND node: in that namespace, exactly the
    # ztunnel DaemonSet's pods may carry that label.
    zns = af.get("ztunnel-namespace", "istio-system")
    key, _, value = af.get("ztunnel-label", "app=ztunnel").partition("=")
    matching = [n for (k, ns, n), d in objs.items() if k == "DaemonSet" and ns == zns
                and (d["spec"]["template"]["metadata"].get("labels") or {}).get(key) == value]
    if matching != ["ztunnel"] or not zt_ds or zt_ds["metadata"]["namespace"] != zns:
        err(f"ambient-agent: --ztunnel-namespace={zns} --ztunnel-label={key}={value} must select "
            f"exactly the ztunnel DaemonSet's pods, not {matching}")
    # Without hostPID, /proc shows only the agent's own processes.
    if af.get("proc-netns", "true") != "false" and not agent_ds["spec"]["template"]["spec"].get("hostPID"):
        err("ambient-agent: --proc-netns (default true) needs hostPID: true; set --proc-netns=false")
    excluded["the agent's --excluded-namespaces"] = namespace_list(af.get("excluded-namespaces", "kube-system"))
if zt:
    if "kube" not in zf:
        err("ztunnel: must run with --kube (Kubernetes mode)")
    node_name_from_downward_api("ztunnel", zt, zf)
    excluded["ztunnel's --excluded-namespaces"] = namespace_list(zf.get("excluded-namespaces", "kube-system"))

cm = get("ConfigMap", "ambient-agent-config")
try:
    if "config.json" in cm["data"]:
        err("ambient-agent-config: config.json is standalone mode's; with --kube the agent takes flags")
    plugin = json.loads(cm["data"]["cni-plugin.json"])
    if not isinstance(plugin, dict) or plugin.get("type") != "ambient-cni":
        err('cni-plugin.json: must be an object with "type": "ambient-cni"')
    else:
        unknown = set(plugin) - PLUGIN_KEYS
        if unknown:
            err(f"cni-plugin.json: unknown keys {sorted(unknown)}")
        excluded["cni-plugin.json's excludedNamespaces"] = sorted(plugin.get("excludedNamespaces") or [])
        sock = af.get("socket")
        if plugin.get("agentSocket") != sock:
            err(f"cni-plugin.json: agentSocket {plugin.get('agentSocket')!r} is not the agent's --socket {sock!r}")
except (KeyError, TypeError, ValueError) as e:
    err(f"cni-plugin.json: {e!r}")
# Never captured = never in the mesh = never blocked: one list everywhere.
if len({tuple(v) for v in excluded.values()}) > 1:
    err("excluded namespaces differ: " + "; ".join(f"{k} {v}" for k, v in excluded.items()))
for k, v in excluded.items():
    if NS in v:
        err(f"{k}: {NS} must not be excluded (the ztunnel pod registers through the CNI plugin)")

# Least privilege: what each binary's ServiceAccount is granted, exactly.
EXPECTED_RBAC = {
    "ambient-agent": {("", "namespaces", "list"), ("", "namespaces", "watch"),
                      ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "patch")},
    "ztunnel": {(g, r, v) for g, r in (("", "pods"), ("", "namespaces"), ("", "services"),
                                      ("discovery.k8s.io", "endpointslices"))
                for v in ("list", "watch")},
}
for ds_name, want in EXPECTED_RBAC.items():
    d = get("DaemonSet", ds_name)
    if not d:
        continue
    sa = d["spec"]["template"]["spec"].get("serviceAccountName")
    granted = set()
    for (kind, ns, name), b in objs.items():
        if kind not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa
                   and s.get("namespace", ns) == NS for s in b.get("subjects") or []):
            continue
        role = get(b["roleRef"]["kind"], b["roleRef"]["name"], ns)
        for rule in (role or {}).get("rules") or []:
            if rule.get("resourceNames") or rule.get("nonResourceURLs"):
                err(f"{b['roleRef']['name']}: resourceNames/nonResourceURLs are not expected")
            granted |= {(g, r, v) for g in rule.get("apiGroups") or []
                        for r in rule.get("resources") or [] for v in rule.get("verbs") or []}
    if granted != want:
        err(f"{ds_name}: ServiceAccount {sa} is granted {sorted(granted - want)} too much and "
            f"{sorted(want - granted)} too little")

zcm = get("ConfigMap", "ztunnel-config")
try:
    zconf = yaml.load(zcm["data"]["config.yaml"], Loader=NoDuplicates) or {}
    unknown = set(zconf) - ZTUNNEL_KEYS
    if unknown:
        err(f"ztunnel config.yaml: unknown keys {sorted(unknown)} (ztunnel refuses them)")
    if "kube" in zf and set(zconf) - {"policies"}:
        err(f"ztunnel config.yaml: {sorted(set(zconf) - {'policies'})} with --kube (policies only; ztunnel refuses them)")
    mounted = [m["mountPath"] for m in (zt or {}).get("volumeMounts") or [] if m["name"] == "config"]
    if [f"{m}/config.yaml" for m in mounted] != [zf.get("config")]:
        err(f"ztunnel: --config={zf.get('config')} is not config.yaml of the mounted ConfigMap {mounted}")
except (KeyError, TypeError, yaml.YAMLError) as e:
    err(f"ztunnel config.yaml: {e!r}")

for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# 3. The waypoint template (waypoint/) and its examples. Core kinds against the Kubernetes schemas
#    as above; Gateway, HTTPRoute and AuthorizationPolicy, which kubernetes-validate does not
#    know, against the openAPIV3Schema subsets in schemas/ (JSON Schema, strict where the field
#    list is complete); then: waypoint/kustomization.yaml lists every template file (not the
#    examples); the Gateway is of class istio-waypoint with the mesh/15008/HBONE listener; its
#    Service (label gateway.networking.k8s.io/gateway-name, what ztunnel's use-waypoint binding
#    resolves) selects the Deployment's pods on 15008; the waypoint runs --kube with the Gateway's
#    name and the downward API's pod name and namespace; the CA Secret it mounts is the
#    ztunnels'; the excluded namespaces are ztunnel's; its ServiceAccount is granted exactly what
#    `waypoint --kube` uses; the examples attach to a Service.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" - "$here" "$tmp" <<'PY'
import os, sys
import yaml
import jsonschema

here, tmp = sys.argv[1], sys.argv[2]
wdir = os.path.join(here, "waypoint")
NS = "istio-system"
errors = []
err = errors.append

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

schemas = {}
for f in sorted(os.listdir(os.path.join(here, "schemas"))):
    if f.endswith(".yaml"):
        s = load(os.path.join(here, "schemas", f))[0]
        jsonschema.Draft7Validator.check_schema(s["openAPIV3Schema"])
        schemas[(s["apiVersion"], s["kind"])] = s["openAPIV3Schema"]
for k in [("gateway.networking.k8s.io/v1", "Gateway"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
          ("security.istio.io/v1", "AuthorizationPolicy")]:
    if k not in schemas:
        err(f"schemas/: no schema for {k[1]} ({k[0]})")

files = sorted(f for f in os.listdir(wdir) if f.endswith(".yaml") and f != "kustomization.yaml")
objs, crs = {}, 0
for f in files:
    core = []
    for d in load(os.path.join(wdir, f)):
        kind, meta = d.get("kind"), d.get("metadata") or {}
        where = f"waypoint/{f}: {kind}/{meta.get('name')}"
        objs[(kind, meta.get("namespace"), meta.get("name"))] = (f, d)
        schema = schemas.get((d.get("apiVersion"), kind))
        if schema is None:
            core.append(d)
            continue
        crs += 1
        for e in jsonschema.Draft7Validator(schema).iter_errors(d):
            err(f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}")
    if core:
        with open(os.path.join(tmp, f), "w") as out:
            yaml.safe_dump_all(core, out)

kust = load(os.path.join(wdir, "kustomization.yaml"))[0]
listed = kust.get("resources") or []
template = [f for f in files if f != "examples.yaml"]
if sorted(listed) != template:
    err(f"waypoint/kustomization.yaml: lists {sorted(listed)}, the template files are {template}")
images = {i.get("name") for i in kust.get("images") or []}

def get(kind, name, ns=NS):
    return (objs.get((kind, ns, name)) or (None, None))[1]

for (kind, ns, name), (f, d) in objs.items():
    cluster = kind in ("ClusterRole", "ClusterRoleBinding")
    if f in template and not cluster and ns != NS:
        err(f"waypoint/{f}: {kind}/{name}: namespace must be {NS} (next to the CA Secret), not {ns!r}")

gws = [d for (k, _, _), (_, d) in objs.items() if k == "Gateway"]
deps = [d for (k, _, _), (_, d) in objs.items() if k == "Deployment"]
if len(gws) != 1 or len(deps) != 1:
    err("waypoint/: exactly one Gateway and one Deployment")
    gws, deps = gws[:1] or [{}], deps[:1] or [{}]
gw, dep = gws[0], deps[0]
gname = (gw.get("metadata") or {}).get("name")
spec = gw.get("spec") or {}
if spec.get("gatewayClassName") != "istio-waypoint":
    err(f"Gateway {gname}: gatewayClassName must be istio-waypoint")
if not any(l.get("name") == "mesh" and l.get("port") == 15008 and l.get("protocol") == "HBONE"
           for l in spec.get("listeners") or []):
    err(f"Gateway {gname}: needs the listener {{name: mesh, port: 15008, protocol: HBONE}}")
GWL = "gateway.networking.k8s.io/gateway-name"
svc = get("Service", gname)
pod_labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
if pod_labels.get(GWL) != gname:
    err(f"Deployment: pods must carry {GWL}: {gname} (waypoints are never bound to waypoints)")
sel = (dep.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
    err(f"Deployment: selector {sel} does not match the pod labels {pod_labels}")
if not svc:
    err(f"no Service {NS}/{gname}: istio.io/use-waypoint={gname} resolves to that Service")
else:
    if (svc["metadata"].get("labels") or {}).get(GWL) != gname:
        err(f"Service {gname}: must carry {GWL}: {gname}")
    ssel = svc["spec"].get("selector") or {}
    if not ssel or any(pod_labels.get(k) != v for k, v in ssel.items()):
        err(f"Service {gname}: selector {ssel} does not select the waypoint pods")
    if not any(p.get("port") == 15008 and p.get("targetPort", 15008) == 15008
               for p in svc["spec"].get("ports") or []):
        err(f"Service {gname}: needs port 15008 → 15008 (ztunnel tunnels to <pod ip>:15008)")
podspec = dep.get("spec", {}).get("template", {}).get("spec") or {}
sa = podspec.get("serviceAccountName")
if not get("ServiceAccount", sa):
    err(f"Deployment: serviceAccountName {sa!r} does not exist")
cs = [c for c in podspec.get("containers") or [] if c.get("command") == ["waypoint"]]
if len(cs) != 1:
    err("Deployment: one container must run `waypoint`")
    cs = [{}]
c = cs[0]
args = c.get("args") or []
f_ = {a[2:].partition("=")[0]: a.partition("=")[2] for a in args if a.startswith("--")}
want = {"gateway-name": "$(GATEWAY_NAME)", "gateway-namespace": "$(POD_NAMESPACE)", "pod-name": "$(POD_NAME)"}
if "kube" not in f_ or "config" in f_ or any(f_.get(k) != v for k, v in want.items()):
    err(f"waypoint: must run --kube (no --config) with {want}, not {args}")
env = {e["name"]: e for e in c.get("env") or []}
if (env.get("GATEWAY_NAME") or {}).get("value") != gname:
    err(f"waypoint: env GATEWAY_NAME must be the Gateway's name {gname!r}")
for n, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
    if (((env.get(n) or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != path:
        err(f"waypoint: env {n} must come from the downward API's {path}")
if (c.get("image") or ":").rsplit(":", 1)[0] not in images:
    err(f"waypoint: image {c.get('image')} is not waypoint/kustomization.yaml's image")
# The CA Secret and excluded namespaces are the ztunnels' (manifests/).
base = {}
for f in os.listdir(here):
    if f.endswith(".yaml") and f != "kustomization.yaml":
        for d in load(os.path.join(here, f)):
            base[(d["kind"], (d.get("metadata") or {}).get("name"))] = d
for v in podspec.get("volumes") or []:
    if "secret" in v and v["secret"].get("secretName") != "ztunnel-ca":
        err(f"waypoint: volume {v['name']}: the CA Secret is ztunnel-ca")
if not any("secret" in v for v in podspec.get("volumes") or []) or ("Secret", "ztunnel-ca") not in base:
    err("waypoint: must mount the ztunnels' CA Secret ztunnel-ca")
zt = base.get(("DaemonSet", "ztunnel"))
if zt:
    zargs = [a for c2 in zt["spec"]["template"]["spec"]["containers"] for a in c2.get("args") or []]
    zx = next((a.partition("=")[2] for a in zargs if a.startswith("--excluded-namespaces=")), "kube-system")
    if sorted(f_.get("excluded-namespaces", "kube-system").split(",")) != sorted(zx.split(",")):
        err(f"waypoint: --excluded-namespaces={f_.get('excluded-namespaces')} is not ztunnel's {zx}")

# Least privilege: exactly what `waypoint --kube` uses (cluster-wide), and its Gateway in its
# namespace only.
WANT_CLUSTER = {(g, r, v) for g, r in (("", "pods"), ("", "namespaces"), ("", "services"),
                                      ("discovery.k8s.io", "endpointslices"),
                                      ("gateway.networking.k8s.io", "httproutes"),
                                      ("security.istio.io", "authorizationpolicies"))
                for v in ("list", "watch")} | {("gateway.networking.k8s.io", "httproutes/status", "patch")}
WANT_NS = {("gateway.networking.k8s.io", "gateways", v) for v in ("list", "watch")}
got_cluster, got_ns = set(), set()
for (kind, ns, name), (f, b) in objs.items():
    if kind not in ("ClusterRoleBinding", "RoleBinding"):
        continue
    if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace", ns) == NS
               for s in b.get("subjects") or []):
        continue
    rk = b["roleRef"]["kind"]
    role = get(rk, b["roleRef"]["name"], None if rk == "ClusterRole" else ns)
    if role is None:
        err(f"{kind}/{name}: roleRef {rk}/{b['roleRef']['name']} does not exist")
        continue
    target = got_cluster if kind == "ClusterRoleBinding" else got_ns
    for rule in role.get("rules") or []:
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            err(f"{role['metadata']['name']}: resourceNames/nonResourceURLs are not expected")
        target |= {(g, r, v) for g in rule.get("apiGroups") or [] for r in rule.get("resources") or []
                   for v in rule.get("verbs") or []}
if got_cluster != WANT_CLUSTER:
    err(f"waypoint: cluster-wide it is granted {sorted(got_cluster - WANT_CLUSTER)} too much and "
        f"{sorted(WANT_CLUSTER - got_cluster)} too little")
if got_ns != WANT_NS:
    err(f"waypoint: in {NS} it is granted {sorted(got_ns - WANT_NS)} too much and {sorted(WANT_NS - got_ns)} too little")

# The examples attach to Services (GAMMA) and target Services.
for (kind, ns, name), (f, d) in objs.items():
    if kind == "HTTPRoute":
        for p in d["spec"].get("parentRefs") or []:
            if not ((p.get("kind") == "Service" and p.get("group") == "") or p.get("kind", "Gateway") == "Gateway"):
                err(f"HTTPRoute {ns}/{name}: parentRef {p} is neither a Service nor a Gateway")
    if kind == "AuthorizationPolicy" and not (d["spec"].get("targetRefs") or d["spec"].get("targetRef")):
        err(f"AuthorizationPolicy {ns}/{name}: a waypoint policy needs targetRefs")

for e in errors:
    print(f"ERROR {e}", file=sys.stderr)
with open(os.path.join(tmp, "crs"), "w") as out:
    out.write(str(crs))
sys.exit(1 if errors else 0)
PY
wout=$("$kv" --strict -k "$K8S_VERSION" "$tmp"/*.yaml 2>&1) && rc=0 || rc=$?
if [ "$rc" -ne 0 ] || grep -qvE '^INFO ' <<<"$wout"; then
  echo "$wout" >&2
  echo "validate.sh: waypoint/: schema validation against Kubernetes $K8S_VERSION failed" >&2
  exit 1
fi
wcore=$(grep -c '^INFO .* passed for resource' <<<"$wout")
wcrs=$(cat "$tmp/crs")

echo "manifests: $resources resources in ${#manifests[@]} files valid against Kubernetes $K8S_VERSION (strict); kustomization and cross-references OK"
echo "manifests/waypoint: $wcore core resources (Kubernetes $K8S_VERSION, strict) and $wcrs Gateway API / Istio resources (schemas/) valid; template, bindings and RBAC OK"
