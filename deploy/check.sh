#!/usr/bin/env bash
# Offline validation of everything under deploy/.
#
#   bash deploy/check.sh                 (from anywhere; binaries in target/debug)
#   FEM_BIN_DIR=target/release bash deploy/check.sh
#
# Steps (each PASS, FAIL or SKIP; the script exits 1 if any step FAILs; a
# missing required tool is a FAIL, a missing optional one a SKIP):
#   yaml        yamllint (deploy/.yamllint) on every YAML file but Helm templates
#   kubernetes  kubernetes-validate --strict on deploy/kubernetes/*.yaml, and the
#               files kustomization.yaml lists exist
#   compose     docker-compose.yml against the Compose specification's JSON
#               schema (check-jsonschema; SKIP without it)
#   prometheus  promtool check config / check rules
#   shell       shellcheck on deploy/**/*.sh
#   dashboard   python3 -m json.tool on the Grafana dashboard, and every PromQL
#               expression in it parses (promtool)
#   flags       every FEM flag and FEM_* variable written in deploy/ appears in
#               the --help of fem-broker, fem-coder or fem
#   systemd     systemd-analyze verify on the units (SKIP without systemd-analyze)
#   helm        helm lint --strict + helm template (3 value sets) | yamllint,
#               kubernetes-validate, and the chart's defaults render the same
#               objects and containers as deploy/kubernetes. Uses `helm`, else
#               the helm-python-sdk pip package (Helm's Go SDK), else SKIP.
#
# Needs: yamllint shellcheck prometheus (promtool) python3 (Debian packages),
# kubernetes-validate (pip; brings PyYAML); optional: check-jsonschema (pip),
# helm (or pip helm-python-sdk), systemd (systemd-analyze).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN_DIR=${FEM_BIN_DIR:-target/debug}
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

declare -a SUMMARY=()
FAILED=0

need() { # tool package-hint
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "  $1 not found (install: $2)"
    return 1
  fi
}

SKIP=77 # a step function returns this when its tool is absent and optional

step() { # name function
  local name=$1 fn=$2 rc=0
  printf '\n=== %s\n' "$name"
  "$fn" || rc=$?
  case $rc in
    0) SUMMARY+=("PASS  $name") ;;
    "$SKIP") SUMMARY+=("SKIP  $name") ;;
    *) SUMMARY+=("FAIL  $name"); FAILED=1 ;;
  esac
}

# ------------------------------------------------------------------ yaml ---
check_yaml() {
  need yamllint "apt-get install yamllint" || return 1
  yamllint -c deploy/.yamllint deploy && echo "  yamllint: ok"
}

# ------------------------------------------------------------ kubernetes ---
k8s_manifests() {
  find deploy/kubernetes -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml | sort
}

check_kubernetes() {
  need kubernetes-validate "pip install kubernetes-validate" || return 1
  local -a files
  mapfile -t files < <(k8s_manifests)
  kubernetes-validate --strict --quiet "${files[@]}" || return 1
  echo "  kubernetes-validate --strict: ${#files[@]} files ok"
  python3 - deploy/kubernetes/kustomization.yaml <<'PY'
import os, sys, yaml
path = sys.argv[1]
k = yaml.safe_load(open(path))
base = os.path.dirname(path)
listed = set(k.get("resources", []))
missing = [r for r in listed if not os.path.exists(os.path.join(base, r))]
present = {f for f in os.listdir(base) if f.endswith(".yaml") and f != "kustomization.yaml"}
unlisted = sorted(present - listed)
for r in missing:
    print(f"  kustomization.yaml lists missing file {r}")
for r in unlisted:
    print(f"  kustomization.yaml does not list {r}")
if missing or unlisted:
    sys.exit(1)
print(f"  kustomization.yaml: {len(listed)} resources, all present")
PY
}

# --------------------------------------------------------------- compose ---
check_compose() {
  if ! command -v check-jsonschema >/dev/null 2>&1; then
    echo "  check-jsonschema not installed (pip install check-jsonschema); skipping"
    return "$SKIP"
  fi
  check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
}

# ------------------------------------------------------------ prometheus ---
check_prometheus() {
  need promtool "apt-get install prometheus" || return 1
  # prometheus.yml names files that exist only where Prometheus runs (the
  # broker CA, alerts.yml beside it). Check a copy whose ca_file paths point
  # at a scratch file and whose rule_files point at deploy/prometheus, so that
  # promtool also loads the rules. Debian's promtool is built without
  # Kubernetes service discovery; with such a promtool the copy gets
  # static_configs instead of kubernetes_sd_configs, after a structural check
  # of those blocks here.
  : >"$TMP/ca.pem"
  printf 'global: {}\nscrape_configs:\n- job_name: probe\n  kubernetes_sd_configs:\n  - role: pod\n' \
    >"$TMP/probe.yml"
  local k8s_sd=1
  if ! promtool check config --syntax-only "$TMP/probe.yml" >/dev/null 2>&1; then
    k8s_sd=0
    echo "  note: this promtool has no kubernetes_sd_configs (Debian build); checking those blocks structurally"
  fi
  python3 - deploy/prometheus/prometheus.yml "$TMP" "$k8s_sd" "$ROOT/deploy/prometheus" <<'PY' || return 1
import sys, yaml
src, tmp, k8s_sd, rules_dir = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
cfg = yaml.safe_load(open(src))
ok = True
ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
SD_KEYS = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata",
           "tls_config", "authorization", "basic_auth", "oauth2", "bearer_token_file",
           "follow_redirects", "enable_http2", "proxy_url"}
for job in cfg.get("scrape_configs", []):
    tls = job.get("tls_config")
    if tls and "ca_file" in tls:
        tls["ca_file"] = f"{tmp}/ca.pem"
    sds = job.get("kubernetes_sd_configs")
    if sds is not None and not k8s_sd:
        for sd in sds:
            bad = set(sd) - SD_KEYS
            if bad or sd.get("role") not in ROLES:
                print(f"  job {job['job_name']}: bad kubernetes_sd_configs entry {sd}")
                ok = False
            names = sd.get("namespaces", {}).get("names", [])
            if not all(isinstance(n, str) for n in names):
                print(f"  job {job['job_name']}: namespaces.names must be strings")
                ok = False
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["sd-placeholder.invalid:443"]}]
cfg["rule_files"] = [f"{rules_dir}/{r}" for r in cfg.get("rule_files", [])]
yaml.safe_dump(cfg, open(f"{tmp}/prometheus.yml", "w"), sort_keys=False)
sys.exit(0 if ok else 1)
PY
  promtool check config "$TMP/prometheus.yml" || return 1
  promtool check rules deploy/prometheus/alerts.yml
}

# ----------------------------------------------------------------- shell ---
check_shell() {
  need shellcheck "apt-get install shellcheck" || return 1
  local -a scripts
  mapfile -t scripts < <(find deploy -name '*.sh' | sort)
  shellcheck "${scripts[@]}" && echo "  shellcheck: ${scripts[*]} ok"
}

# ------------------------------------------------------------- dashboard ---
check_dashboard() {
  local dash=deploy/grafana/fem-dashboard.json
  python3 -m json.tool "$dash" >/dev/null || return 1
  echo "  json.tool: ok"
  python3 - "$dash" "$TMP/dashboard-rules.yml" <<'PY' || return 1
import json, sys, yaml
d = json.load(open(sys.argv[1]))
errors = []
if d.get("schemaVersion", 0) < 36:
    errors.append("schemaVersion below 36")
names = [v.get("name") for v in d.get("templating", {}).get("list", [])]
if not any(v.get("type") == "datasource" for v in d["templating"]["list"]):
    errors.append("no datasource variable")
rules, ids = [], set()
for p in d.get("panels", []):
    if p["id"] in ids:
        errors.append(f"duplicate panel id {p['id']}")
    ids.add(p["id"])
    for t in p.get("targets", []):
        expr = t["expr"].replace("$instance", ".*").replace("$__rate_interval", "5m")
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": expr})
for e in errors:
    print("  " + e)
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"  {len(d['panels'])} panels, {len(rules)} queries, variables: {', '.join(names)}")
sys.exit(1 if errors else 0)
PY
  need promtool "apt-get install prometheus" || return 1
  promtool check rules --lint=none "$TMP/dashboard-rules.yml" >/dev/null || {
    promtool check rules --lint=none "$TMP/dashboard-rules.yml"
    return 1
  }
  echo "  promtool: every dashboard query parses"
}

# ----------------------------------------------------------------- flags ---
check_flags() {
  local b
  for b in fem-broker fem-coder fem; do
    if [ ! -x "$BIN_DIR/$b" ]; then
      echo "  $BIN_DIR/$b not found: build first (cargo build --workspace --bins) or set FEM_BIN_DIR"
      return 1
    fi
  done
  for b in fem-broker fem-coder fem; do
    "$BIN_DIR/$b" --help >"$TMP/help-$b" || { echo "  $b --help failed"; return 1; }
  done
  # Subcommands from the "Commands:" section of `fem --help`.
  awk '/^Commands:/{on=1; next} on && /^  [a-z]/{print $1} on && /^$/{on=0}' "$TMP/help-fem" |
    grep -vx help >"$TMP/fem-subcommands" || true
  # And their own subcommands (fem trust init|grant|...), one level down.
  local sub subsub
  while read -r sub; do
    "$BIN_DIR/fem" "$sub" --help >"$TMP/help-fem-$sub" || { echo "  fem $sub --help failed"; return 1; }
    cat "$TMP/help-fem-$sub" >>"$TMP/help-fem"
    while read -r subsub; do
      "$BIN_DIR/fem" "$sub" "$subsub" --help >>"$TMP/help-fem" ||
        { echo "  fem $sub $subsub --help failed"; return 1; }
    done < <(awk '/^Commands:/{on=1; next} on && /^  [a-z]/{print $1} on && /^$/{on=0}' "$TMP/help-fem-$sub" |
      grep -vx help || true)
  done <"$TMP/fem-subcommands"
  python3 - "$TMP" <<'PY'
"""Every FEM flag and FEM_* variable written under deploy/ must exist.

A --flag counts as a FEM flag when it
  * follows fem-broker, fem-coder or `fem <subcommand>` on the same command
    line (backslash continuations joined; up to the next | && ; or binary),
    checked against that binary's --help;
  * is a YAML list item ("- --listen": container args), a quoted "--flag"
    string (Dockerfile CMD, JSON arrays) or an inline code span `--flag`.
Every FEM_[A-Z0-9_]+ word counts, comments and README included.
Those last flags and the variables are checked against the binary a file is
about when its path names one (*broker* -> fem-broker, *coder* -> fem-coder,
plus the fem CLI, which shares the client settings), else against all three.
A line that says "planned" (features not built yet, e.g. federation) is
exempt and listed.
"""
import os, re, sys
tmp = sys.argv[1]
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
ENV = re.compile(r"\bFEM_[A-Z0-9_]+\b")
help_text = {b: open(f"{tmp}/help-{b}").read() for b in ("fem-broker", "fem-coder", "fem")}
flags = {b: set(FLAG.findall(t)) for b, t in help_text.items()}
all_flags = set().union(*flags.values())
env_of = {b: set(ENV.findall(t)) for b, t in help_text.items()}
envs = set().union(*env_of.values())
subs = [s.strip() for s in open(f"{tmp}/fem-subcommands") if s.strip()]
# Variables of the deploy tooling itself, not of the binaries.
TOOLING_ENV = {"FEM_BIN_DIR"}
SKIP = {"deploy/check.sh"}

binary = re.compile(
    r"(?:(?<=^)|(?<=[\s\"'\[=(])|(?<=bin/)|(?<=debug/)|(?<=release/))"
    r"(fem-broker|fem-coder|fem)(?=[\s\"'\],]|$)")
sub_re = re.compile(r"[\s\"',]+(" + "|".join(map(re.escape, subs)) + r")(?=[\s\"']|$)") if subs else None
separator = re.compile(r"\|\||&&|[|;]")

missing, planned = [], []

def note(path, lineno, what, line):
    if re.search(r"planned", line, re.I):
        planned.append(f"{path}:{lineno}: {what}")
    else:
        missing.append(f"{path}:{lineno}: {what}")

files = []
for dirpath, _, names in os.walk("deploy"):
    for n in names:
        p = os.path.join(dirpath, n)
        if p not in SKIP:
            files.append(p)
checked_flags = checked_env = 0
def owner(path):
    base = os.path.basename(path)
    if "coder" in base:
        return "fem-coder"
    if "broker" in base:
        return "fem-broker"
    return None

for path in sorted(files):
    own = owner(path)
    file_flags = flags[own] | flags["fem"] if own else all_flags
    file_envs = (env_of[own] | env_of["fem"]) if own else envs
    try:
        lines = open(path, encoding="utf-8").read().split("\n")
    except UnicodeDecodeError:
        continue
    # Logical lines: join backslash continuations, remember the first line number.
    logical, buf, start = [], "", None
    for i, line in enumerate(lines, 1):
        if start is None:
            start = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf, start = "", None
    for lineno, line in logical:
        for e in ENV.findall(line):
            checked_env += 1
            if e not in file_envs and e not in TOOLING_ENV:
                note(path, lineno, f"variable {e}" + (f" (of {own})" if own else ""), line)
        seen = set()
        # Command lines: flags after a binary name belong to that binary.
        hits = []
        for m in binary.finditer(line):
            name = m.group(1)
            if name == "fem":
                if not sub_re or not sub_re.match(line, m.end()):
                    continue
            hits.append((m.start(), m.end(), name))
        for k, (s, e, name) in enumerate(hits):
            end = hits[k + 1][0] if k + 1 < len(hits) else len(line)
            seg = line[e:end]
            cut = separator.search(seg)
            if cut:
                seg = seg[:cut.start()]
            for f in FLAG.findall(seg):
                seen.add(f)
                checked_flags += 1
                if f not in flags[name]:
                    note(path, lineno, f"{name} flag {f}", line)
        # Container args, exec-form arrays, code spans.
        cand = []
        m = re.match(r"^\s*-\s+[\"']?(--[a-z][a-z0-9-]*)", line)
        if m:
            cand.append(m.group(1))
        cand += re.findall(r"[\"'](--[a-z][a-z0-9-]*)", line)
        cand += re.findall(r"`(--[a-z][a-z0-9-]*)", line)
        for f in cand:
            if f in seen:
                continue
            seen.add(f)
            checked_flags += 1
            if f not in file_flags:
                note(path, lineno, f"{own or 'FEM'} flag {f}", line)

for p in planned:
    print(f"  planned (not checked): {p}")
for m in missing:
    print(f"  MISSING {m}")
print(f"  {checked_flags} flag uses and {checked_env} variable uses checked against "
      f"{len(all_flags)} flags and {len(envs)} variables of fem-broker, fem-coder, fem "
      f"({', '.join(subs)})")
sys.exit(1 if missing else 0)
PY
}

# --------------------------------------------------------------- systemd ---
check_systemd() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "  systemd-analyze not installed; skipping"
    return "$SKIP"
  fi
  # verify needs the ExecStart programs to exist: point them at $BIN_DIR.
  local unit rc=0
  for unit in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/#$BIN_DIR/#" "$unit" >"$TMP/$(basename "$unit")"
    if systemd-analyze verify "$TMP/$(basename "$unit")"; then
      echo "  systemd-analyze verify $(basename "$unit"): ok"
    else
      rc=1
    fi
  done
  return "$rc"
}

# ------------------------------------------------------------------ helm ---
# Chart variants rendered besides the defaults.
write_helm_variants() {
  cat >"$TMP/values-deployment.yaml" <<'EOF'
namespace: {create: true}
broker:
  replicaCount: 1
  service: {type: LoadBalancer, loadBalancerSourceRanges: ["10.0.0.0/8"]}
  extraArgs: ["--agent-queue-limit", "4096"]
agents:
  coder:
    kind: Deployment
    replicaCount: 2
    allowPrograms: [python3, git]
    allowPaths: [/work]
EOF
  cat >"$TMP/values-devtls.yaml" <<'EOF'
broker:
  tls: {enabled: false}
  metrics: {enabled: false}
agents:
  coder:
    insecure: true
    metrics: {enabled: false}
EOF
}

# Renders the chart with `helm`, or with the helm-python-sdk package (Helm's
# Go SDK behind a Python binding: pip install helm-python-sdk) when the helm
# binary is absent. Writes $TMP/chart-{default,deployment,devtls}.yaml.
render_chart() { # helm|python
  local chart=deploy/helm/fem v
  if [ "$1" = helm ]; then
    helm lint --strict "$chart" --namespace fem-system || return 1
    helm template fem "$chart" --namespace fem-system >"$TMP/chart-default.yaml" || return 1
    for v in deployment devtls; do
      helm lint --strict "$chart" --namespace fem-system -f "$TMP/values-$v.yaml" || return 1
      helm template fem "$chart" --namespace fem-system -f "$TMP/values-$v.yaml" \
        >"$TMP/chart-$v.yaml" || return 1
    done
    return 0
  fi
  python3 - "$chart" "$TMP" <<'PY'
import sys, yaml
import helm_python as helm
chart, tmp = sys.argv[1], sys.argv[2]
bad = False
for variant in ("default", "deployment", "devtls"):
    values = None if variant == "default" else yaml.safe_load(open(f"{tmp}/values-{variant}.yaml"))
    report = helm.lint(chart, values, strict=True, namespace="fem-system")
    for m in report.get("messages", []):
        level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m["severity"], "UNKNOWN")
        print(f"  lint {variant}: [{level}] {m['path']}: {m['error']}")
        bad |= m["severity"] >= 2
    for e in report.get("errors", []):
        print(f"  lint {variant}: {e}")
        bad = True
    with helm.Chart.load(chart) as c:
        out = c.render(values, name="fem", namespace="fem-system", is_install=True)
    with open(f"{tmp}/chart-{variant}.yaml", "w") as f:
        for path in sorted(out):
            if path.endswith(".yaml") and out[path].strip():
                f.write(f"---\n# Source: {path}\n{out[path].strip()}\n")
print(f"  helm-python-sdk: linted and rendered {chart} (default, deployment, devtls)")
sys.exit(1 if bad else 0)
PY
}

check_helm() {
  local how
  if command -v helm >/dev/null 2>&1; then
    how=helm
  elif python3 -c 'import helm_python' >/dev/null 2>&1; then
    how=python
  else
    echo "  helm not installed; skipping"
    return "$SKIP"
  fi
  need kubernetes-validate "pip install kubernetes-validate" || return 1
  need yamllint "apt-get install yamllint" || return 1
  write_helm_variants
  render_chart "$how" || return 1
  local -a rendered=("$TMP/chart-default.yaml" "$TMP/chart-deployment.yaml" "$TMP/chart-devtls.yaml")
  # Duplicate keys, indentation, syntax of the rendered YAML.
  yamllint -d '{extends: relaxed, rules: {line-length: disable, key-duplicates: enable}}' \
    "${rendered[@]}" || return 1
  kubernetes-validate --strict --quiet "${rendered[@]}" || return 1
  echo "  rendered chart (3 variants) | yamllint, kubernetes-validate --strict: ok"
  # The chart with default values must create the same objects and run the
  # same containers (image, args, env, ports, probes, mounts) as the plain
  # manifests.
  python3 - "$TMP/chart-default.yaml" deploy/kubernetes <<'PY'
import glob, sys, yaml
def containers(docs):
    out = {}
    for d in docs:
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                out[(d["kind"], d["metadata"]["name"], c["name"])] = c
    return out
def objects(docs):
    # The plain manifests create the Namespace; with the chart, helm does.
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Namespace")
chart_docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
plain_docs = [d for f in sorted(glob.glob(sys.argv[2] + "/*.yaml")) if not f.endswith("kustomization.yaml")
              for d in yaml.safe_load_all(open(f)) if d]
bad = False
if objects(chart_docs) != objects(plain_docs):
    print(f"  objects differ:\n    chart:     {objects(chart_docs)}\n    manifests: {objects(plain_docs)}")
    bad = True
chart, plain = containers(chart_docs), containers(plain_docs)
for key in sorted(set(chart) & set(plain)):
    for field in ("image", "args", "env", "ports", "livenessProbe", "readinessProbe",
                  "volumeMounts", "securityContext", "resources"):
        a, b = chart[key].get(field), plain[key].get(field)
        if a != b:
            print(f"  {key[1]}: {field} differs\n    chart:     {a}\n    manifests: {b}")
            bad = True
print("  chart defaults and deploy/kubernetes define the same objects and containers"
      if not bad else "  chart and manifests differ")
sys.exit(1 if bad else 0)
PY
}

step "yaml (yamllint)" check_yaml
step "kubernetes (kubernetes-validate)" check_kubernetes
step "compose (check-jsonschema, compose-spec)" check_compose
step "prometheus (promtool)" check_prometheus
step "shell (shellcheck)" check_shell
step "dashboard (json, PromQL)" check_dashboard
step "flags and FEM_* variables (--help of ${BIN_DIR#"$ROOT"/})" check_flags
step "systemd (systemd-analyze verify)" check_systemd
step "helm (lint, template, validate)" check_helm

printf '\n=== summary\n'
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "deploy/check.sh: FAIL"
  exit 1
fi
echo "deploy/check.sh: PASS"
