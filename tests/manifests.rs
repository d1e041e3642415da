//! The Kubernetes manifests in deploy/ and the container build file: they render, the
//! Kubernetes schemas and checkov accept them, the Policy CRD's schema agrees with the agent's
//! own validator on the good and the bad policies, and the DaemonSet's capability list is
//! exactly what the real agent needs (a root test that runs it with only those).
//!
//! The tools come from `cargo xtask setup` (pinned versions in a venv, TOOLS_BIN); a missing
//! tool fails the test, never skips it.

mod support;

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tollgate_testbed::NetNs;

use support::env::BINARY;

/// Where `cargo xtask setup` installs kubectl, kubernetes-validate, checkov and the Python
/// that checks the CRD schema (xtask/src/setup.rs, TOOLS_VENV, says the same).
const TOOLS_BIN: &str = "/opt/tollgate-tools/venv/bin";

/// At least this many bad policies in tests/data/bad-policies.
const MIN_BAD_POLICIES: usize = 12;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn tool(name: &str) -> PathBuf {
    let path = Path::new(TOOLS_BIN).join(name);
    assert!(
        path.is_file(),
        "{} is missing; run `cargo xtask setup` (it installs the pinned Kubernetes tools)",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `kubectl kustomize DIR` (relative to the repository root), as YAML.
fn render(dir: &str) -> String {
    run_ok(
        Command::new(tool("kubectl"))
            .arg("kustomize")
            .arg(repo().join(dir)),
    )
}

/// YAML documents as JSON values (through the venv's PyYAML).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(tool("python"))
        .arg(repo().join("tests/tools/crd_check.py"))
        .arg("to-json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "YAML to JSON failed");
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn agent_container(docs: &[Value]) -> &Value {
    object(docs, "DaemonSet", "tollgate-agent")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("container agent")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn base_renders_with_the_expected_objects() {
    let docs = yaml_docs(&render("deploy"));
    let kinds: BTreeSet<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    let expected: BTreeSet<String> = [
        "Namespace/tollgate-system",
        "CustomResourceDefinition/policies.tollgate.dev",
        "ServiceAccount/tollgate",
        "ClusterRole/tollgate-agent",
        "ClusterRoleBinding/tollgate-agent",
        "DaemonSet/tollgate-agent",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds, expected);

    // The ClusterRole reads pods, namespaces and policies, and nothing else.
    let role = object(&docs, "ClusterRole", "tollgate-agent");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let keys: Vec<&str> = rule
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["apiGroups", "resources", "verbs"], "{rule}");
        assert_eq!(strings(&rule["verbs"]), ["get", "list", "watch"], "{rule}");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        granted,
        ["/namespaces", "/pods", "tollgate.dev/policies"]
            .into_iter()
            .map(String::from)
            .collect()
    );

    let crd = object(&docs, "CustomResourceDefinition", "policies.tollgate.dev");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["kind"], "Policy");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"].is_null(), "no status subresource");
    assert!(
        !serde_json::to_string(version)
            .unwrap()
            .contains("x-kubernetes-preserve-unknown-fields"),
        "the schema must be closed"
    );

    let ds = object(&docs, "DaemonSet", "tollgate-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "tollgate");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{ "operator": "Exists" }])
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({ "maxUnavailable": 1, "maxSurge": 0 })
    );
    let c = agent_container(&docs);
    assert_eq!(c["image"], "ghcr.io/tollgate-dev/tollgate:0.1.0");
    let args = strings(&c["args"]);
    assert_eq!(args[..2], ["agent", "--kubernetes"]);
    for flag in [
        "--interfaces",
        "--uplinks",
        "--node-name",
        "--bpffs",
        "--state-dir",
        "--metrics-addr",
        "--audit-stdout",
        "--svid-dir",
        "--auth-addr",
        "--trust-domain",
    ] {
        assert!(args.contains(&flag), "{flag} missing from {args:?}");
    }
    // Peers are found by their pods' status.hostIP, on the port every agent listens on.
    let at = args.iter().position(|a| *a == "--auth-addr").unwrap();
    assert_eq!(args[at + 1], "$(HOST_IP):7443");
    assert!(c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "auth" && p["containerPort"] == 7443));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        [
            "/run/tollgate",
            "/sys/fs/bpf",
            "/var/lib/tollgate",
            "/var/lib/tollgate-svids"
        ]
        .into_iter()
        .collect()
    );
}

#[test]
fn file_mode_example_renders() {
    let docs = yaml_docs(&render("deploy/examples/file-mode"));
    let c = agent_container(&docs);
    let args = strings(&c["args"]);
    assert!(!args.contains(&"--kubernetes"), "{args:?}");
    let at = args
        .iter()
        .position(|a| *a == "--policy")
        .expect("--policy");
    assert_eq!(args[at + 1], "/etc/tollgate/policy.yaml");
    let cm = object(&docs, "ConfigMap", "tollgate-policy");
    let file =
        std::fs::read_to_string(repo().join("deploy/examples/file-mode/policy.yaml")).unwrap();
    assert_eq!(cm["data"]["policy.yaml"], file.as_str());
    let pod = &object(&docs, "DaemonSet", "tollgate-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "policy")
        .expect("policy volume");
    assert_eq!(volume["configMap"]["name"], "tollgate-policy");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "policy")
        .expect("policy mount");
    assert_eq!(mount["mountPath"], "/etc/tollgate");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
}

#[test]
fn kubernetes_validate_accepts_every_rendered_object() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kustomization) in [
        ("base", "deploy"),
        ("file-mode", "deploy/examples/file-mode"),
    ] {
        let yaml = render(kustomization);
        let objects = yaml_docs(&yaml).len();
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &yaml).unwrap();
        let out = run_ok(
            Command::new(tool("kubernetes-validate"))
                .arg("--strict")
                .arg(&path)
                .current_dir(dir.path()),
        );
        // It reports every object; one it has no schema for would not be "passed".
        let passed = out
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, objects, "{name}: not every object passed:\n{out}");
    }
}

/// Runs checkov with JSON output; every report's results.
fn checkov(args: &[&str], cwd: &Path) -> Vec<Value> {
    let out = run(Command::new(tool("checkov"))
        .args(["--skip-download", "--output", "json", "--compact"])
        .args(args)
        .env(
            "PATH",
            format!("{TOOLS_BIN}:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .current_dir(cwd));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov {args:?} gave no JSON ({e}; {}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    match json {
        Value::Array(reports) => reports,
        report => vec![report],
    }
}

#[test]
fn checkov_passes_with_every_skip_explained() {
    let scratch = tempfile::tempdir().unwrap();
    // checkov's dockerfile framework only recognises files named Dockerfile*.
    let dockerfile = scratch.path().join("Dockerfile");
    std::fs::copy(repo().join("deploy/Containerfile"), &dockerfile).unwrap();
    let deploy = repo().join("deploy");
    let mut reports = checkov(
        &["--framework", "kustomize", "-d", deploy.to_str().unwrap()],
        scratch.path(),
    );
    reports.extend(checkov(
        &[
            "--framework",
            "dockerfile",
            "-f",
            dockerfile.to_str().unwrap(),
        ],
        scratch.path(),
    ));
    let mut types = BTreeSet::new();
    let mut skipped = BTreeSet::new();
    let mut passed = 0;
    for report in &reports {
        types.insert(report["check_type"].as_str().unwrap().to_string());
        let results = &report["results"];
        let failed = results["failed_checks"].as_array().unwrap();
        assert!(
            failed.is_empty(),
            "checkov failed checks:\n{}",
            failed
                .iter()
                .map(|f| format!("{} {} {}", f["check_id"], f["resource"], f["file_path"]))
                .collect::<Vec<_>>()
                .join("\n")
        );
        passed += results["passed_checks"].as_array().unwrap().len();
        for s in results["skipped_checks"].as_array().unwrap() {
            let reason = s["check_result"]["suppress_comment"].as_str().unwrap_or("");
            assert!(
                reason.len() > 20,
                "skip of {} without a reason: {s}",
                s["check_id"]
            );
            skipped.insert(s["check_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        types,
        ["dockerfile", "kustomize"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert!(passed > 100, "checkov ran only {passed} checks");
    // Adding a skip is a decision: it goes in the manifest with its reason and here.
    let expected: BTreeSet<String> = [
        "CKV_K8S_15",
        "CKV_K8S_19",
        "CKV_K8S_23",
        "CKV_K8S_25",
        "CKV_K8S_38",
        "CKV_K8S_40",
        "CKV_K8S_43",
        "CKV2_K8S_6",
        "CKV_DOCKER_2",
        "CKV_DOCKER_3",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(skipped, expected);
}

/// deploy/prometheus/scrape-kubernetes.yml finds the DaemonSet's pods and port, and
/// scrape.yml (which Debian's promtool can check) stays valid.
#[test]
fn kubernetes_scrape_job_matches_the_daemonset() {
    let prometheus = repo().join("deploy/prometheus");
    let out = run(Command::new("promtool")
        .args(["check", "config", "scrape.yml"])
        .current_dir(&prometheus));
    assert!(
        out.status.success(),
        "promtool check config scrape.yml: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(prometheus.join("scrape-kubernetes.yml")).unwrap();
    let config = &yaml_docs(&text)[0];
    let job = &config["scrape_configs"][0];
    let sd = &job["kubernetes_sd_configs"][0];
    assert_eq!(sd["role"], "pod");
    let docs = yaml_docs(&render("deploy"));
    let ds = object(&docs, "DaemonSet", "tollgate-agent");
    assert_eq!(
        strings(&sd["namespaces"]["names"]),
        [ds["metadata"]["namespace"].as_str().unwrap()]
    );
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let keep: Vec<(Vec<&str>, &str)> = job["relabel_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "keep")
        .map(|r| (strings(&r["source_labels"]), r["regex"].as_str().unwrap()))
        .collect();
    assert_eq!(keep.len(), 2, "{keep:?}");
    let pod_labels: Vec<String> = keep[0]
        .0
        .iter()
        .map(|l| {
            let key = l
                .strip_prefix("__meta_kubernetes_pod_label_")
                .expect("a pod label");
            labels
                .as_object()
                .unwrap()
                .iter()
                .find(|(k, _)| k.replace(['.', '/', '-'], "_") == key)
                .unwrap_or_else(|| panic!("the pods have no label for {l}"))
                .1
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(pod_labels.join(";"), keep[0].1);
    assert_eq!(keep[1].0, ["__meta_kubernetes_pod_container_port_name"]);
    let ports = &agent_container(&docs)["ports"];
    assert!(
        ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == keep[1].1 && p["containerPort"] == 9464),
        "no container port {} (9464): {ports}",
        keep[1].1
    );
}

/// The good policies: examples/*.yaml, deploy/examples/policy-*.yaml and the file-mode one.
fn good_policies() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (dir, prefix) in [("examples", ""), ("deploy/examples", "policy-")] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if name.starts_with(prefix) && name.ends_with(".yaml") {
                files.push(path);
            }
        }
    }
    files.push(repo().join("deploy/examples/file-mode/policy.yaml"));
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

fn bad_policies() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/data/bad-policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= MIN_BAD_POLICIES,
        "only {} bad policies",
        files.len()
    );
    files
}

/// `# KEY: value` in a bad policy's header.
fn header(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("{}: no `# {key}:` line", path.display()))
        .to_string()
}

fn uses_selector(path: &Path) -> bool {
    std::fs::read_to_string(path).unwrap().contains("selector:")
}

/// The errors the CRD's schema finds in each file, by file.
fn schema_errors(files: &[PathBuf]) -> Vec<(PathBuf, Vec<(String, String)>)> {
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("deploy.yaml");
    std::fs::write(&rendered, render("deploy")).unwrap();
    let out = run_ok(
        Command::new(tool("python"))
            .arg(repo().join("tests/tools/crd_check.py"))
            .arg("schema")
            .arg(&rendered)
            .args(files),
    );
    let results: Vec<_> = out
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let errors = v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["path"].as_str().unwrap().to_string(),
                        e["message"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            (PathBuf::from(v["file"].as_str().unwrap()), errors)
        })
        .collect();
    assert_eq!(results.len(), files.len());
    results
}

#[test]
fn crd_schema_accepts_every_example() {
    for (file, errors) in schema_errors(&good_policies()) {
        assert!(
            errors.is_empty(),
            "{}: the CRD schema refuses it: {errors:?}",
            file.display()
        );
    }
}

#[test]
fn crd_schema_rejects_every_bad_policy_at_the_field() {
    for (file, errors) in schema_errors(&bad_policies()) {
        let at = header(&file, "schema-error-at");
        assert!(
            errors.iter().any(|(path, _)| *path == at),
            "{}: expected a schema error at {at}, got {errors:?}",
            file.display()
        );
    }
}

fn agent_validate(file: &Path) -> Output {
    run(Command::new(BINARY)
        .args(["policy", "validate", "-f"])
        .arg(file))
}

#[test]
fn agent_accepts_the_examples_without_selectors() {
    for file in good_policies().iter().filter(|f| !uses_selector(f)) {
        let out = agent_validate(file);
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Fails until the agent's Kubernetes mode (identities[].selector) is merged: the schema
/// accepts these and the agent must too.
#[test]
fn agent_accepts_the_examples_with_selectors() {
    let files: Vec<_> = good_policies()
        .into_iter()
        .filter(|f| uses_selector(f))
        .collect();
    assert!(!files.is_empty());
    for file in files {
        let out = agent_validate(&file);
        assert!(
            out.status.success(),
            "{}: the CRD schema accepts it, the agent does not: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn agent_rejects_every_bad_policy_at_the_field() {
    for file in bad_policies() {
        let expected = header(&file, "agent-error");
        let out = agent_validate(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        assert!(
            stderr.contains(&expected),
            "{}: expected {expected:?} in the agent's error: {stderr}",
            file.display()
        );
    }
}

// --- the capability proof --------------------------------------------------------------------

/// capabilities(7) numbers.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter()
        .map(|c| {
            let bit = CAPABILITIES
                .iter()
                .position(|k| k == c)
                .unwrap_or_else(|| panic!("unknown capability {c}"));
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

/// The tiny policy the proof runs with: the peer end of the veth as an identity.
const CAP_POLICY: &str = "\
apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: caps
spec:
  identities:
    - name: peer
      cidrs: [\"10.200.91.2/32\"]
  rules:
    - name: host-to-peer
      from: host
      to: peer
      ports: [{ protocol: ICMP }]
";

/// One agent started with exactly `caps` (bounding, inheritable and ambient sets, and so
/// permitted and effective after exec as uid 0) and no_new_privs, in `ns`, with a pin
/// directory of its own. Drop stops it by pid and uninstalls its pins with full privileges.
struct CappedAgent {
    child: Option<Child>,
    bpffs: PathBuf,
    log: PathBuf,
}

impl CappedAgent {
    fn start(ns: &NetNs, caps: &[&str], dir: &Path, index: usize) -> Self {
        let set = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let work = dir.join(format!("run-{index}"));
        std::fs::create_dir_all(&work).unwrap();
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, CAP_POLICY).unwrap();
        let svids = work.join("svids");
        std::fs::create_dir_all(&svids).unwrap();
        let bpffs = support::test_pin_dir(&format!("manifests-caps-{index}"));
        // A killed earlier run may have left this exact directory.
        let _ = Command::new(BINARY)
            .args(["agent", "--uninstall", "--bpffs"])
            .arg(&bpffs)
            .output();
        let log = work.join("agent.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = ns
            .command_inside("setpriv")
            .unwrap()
            .arg(format!("--bounding-set={set}"))
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg("--no-new-privs")
            .arg("--")
            .arg(BINARY)
            .args([
                "agent",
                "--interfaces",
                "tgmf0,tgmf1",
                "--uplinks",
                "tgmf1",
                "--policy",
            ])
            .arg(&policy)
            .arg("--socket")
            .arg(work.join("tollgate.sock"))
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--state-dir")
            .arg(work.join("state"))
            .args(["--metrics-addr", "127.0.0.1:9464", "--audit-stdout"])
            // The auth listener and SVID directory, as the DaemonSet has them (an empty
            // directory: no SVIDs delivered yet).
            .arg("--svid-dir")
            .arg(&svids)
            .args(["--auth-addr", "127.0.0.1:7443"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("setpriv (util-linux) starts");
        CappedAgent {
            child: Some(child),
            bpffs,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls /readyz inside `ns` (as the DaemonSet's readiness probe does) until it answers
    /// 200 or the agent exits or `timeout` passes. Ok(()) when ready; Err(why) otherwise.
    fn wait_ready(&mut self, ns: &NetNs, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("exited ({status})"));
            }
            let ready = ns
                .run(|| {
                    let mut s = TcpStream::connect("127.0.0.1:9464").ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                        .ok()?;
                    let mut reply = String::new();
                    s.read_to_string(&mut reply).ok()?;
                    Some(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"))
                })
                .unwrap();
            if ready == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// (CapEff, CapPrm, CapBnd, NoNewPrivs) of the running agent.
    fn process_caps(&self) -> (u64, u64, u64, bool) {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
                .trim()
                .to_string()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        (
            hex("CapEff"),
            hex("CapPrm"),
            hex("CapBnd"),
            field("NoNewPrivs") == "1",
        )
    }
}

impl Drop for CappedAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child's pid, not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The agent does not uninstall on SIGTERM; this runs with the test's full privileges.
        let out = Command::new(BINARY)
            .args(["agent", "--uninstall", "--bpffs"])
            .arg(&self.bpffs)
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "warning: uninstall of {} failed: {out:?}",
                self.bpffs.display()
            );
        }
        if let Some(parent) = self.bpffs.parent() {
            let _ = std::fs::remove_dir(parent); // only once empty
        }
    }
}

/// The capability list of the rendered DaemonSet (not a copy of it) is exactly what the agent
/// needs: with it the agent starts and gets ready; without any one of them it does not.
#[test]
fn daemonset_capabilities_are_exactly_what_the_agent_needs() {
    support::require_root();
    let docs = yaml_docs(&render("deploy"));
    let sc = &agent_container(&docs)["securityContext"];
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        ["ALL"],
        "the proof assumes drop: [ALL]"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "the proof runs with no_new_privs"
    );
    let caps = strings(&sc["capabilities"]["add"]);
    assert!(!caps.is_empty());

    let ns = NetNs::new(&format!("tgmf-caps-{}", std::process::id())).expect("namespace");
    for args in [
        &[
            "link", "add", "tgmf0", "type", "veth", "peer", "name", "tgmf1",
        ][..],
        &["addr", "add", "10.200.91.1/30", "dev", "tgmf0"],
        &["addr", "add", "10.200.91.2/30", "dev", "tgmf1"],
        &["link", "set", "tgmf0", "up"],
        &["link", "set", "tgmf1", "up"],
    ] {
        let mut full = vec!["ip"];
        full.extend_from_slice(args);
        ns.exec_checked(&full).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    const READY_TIMEOUT: Duration = Duration::from_secs(20);

    {
        let mut agent = CappedAgent::start(&ns, &caps, dir.path(), 0);
        if let Err(why) = agent.wait_ready(&ns, READY_TIMEOUT) {
            panic!(
                "with the DaemonSet's capabilities {caps:?} the agent {why}; log:\n{}",
                agent.log_text()
            );
        }
        let (eff, prm, bnd, nnp) = agent.process_caps();
        let mask = cap_mask(&caps);
        assert_eq!(
            (eff, prm, bnd),
            (mask, mask, mask),
            "the agent ran with other capabilities"
        );
        assert!(nnp, "no_new_privs not set");
        let status = run(Command::new(BINARY)
            .arg("--socket")
            .arg(dir.path().join("run-0/tollgate.sock"))
            .arg("status"));
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    }

    for (i, missing) in caps.iter().enumerate() {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| c != missing).collect();
        let mut agent = CappedAgent::start(&ns, &fewer, dir.path(), i + 1);
        match agent.wait_ready(&ns, READY_TIMEOUT) {
            Ok(()) => panic!(
                "the agent got ready without CAP_{missing} ({fewer:?}): drop it from the \
                 DaemonSet; log:\n{}",
                agent.log_text()
            ),
            Err(why) => eprintln!(
                "without CAP_{missing}: {why}: {}",
                agent.log_text().lines().last().unwrap_or("")
            ),
        }
    }
}

/// The DaemonSet's arguments (both the base and the file-mode example) are ones this build's
/// `tollgate` accepts: parsed with the CLI's own parser, `$(VAR)` references filled in as
/// kubelet would.
#[test]
fn daemonset_arguments_parse_with_this_build() {
    use clap::Parser as _;
    for dir in ["deploy", "deploy/examples/file-mode"] {
        let docs = yaml_docs(&render(dir));
        let c = agent_container(&docs);
        let mut argv = vec!["tollgate".to_owned()];
        argv.extend(strings(&c["args"]).iter().map(|a| {
            a.replace("$(NODE_NAME)", "node-a")
                .replace("$(HOST_IP)", "192.0.2.10")
        }));
        if let Err(e) = tollgate_agent::cli::Cli::try_parse_from(&argv) {
            panic!("{dir}: the DaemonSet's arguments {argv:?} do not parse: {e}");
        }
    }
}
