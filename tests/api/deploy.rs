//! What deploy/ ships matches the binary it deploys: the manifests set only
//! settings the binary reads, probe the paths and port it serves, and scale on
//! the queue it consumes; every metric an alert rule or dashboard panel names is
//! one a running worker exposes. (The files' own validity, against Kubernetes',
//! KEDA's and Prometheus' rules, is `scripts/check-deploy`.)

use qty_test_support::app::TestApp;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The rendered manifests, one JSON value each, or `None` (after saying the test
/// is skipped) without kubectl. CI has kubectl, and there it must not skip.
fn rendered_manifests() -> Option<Vec<Value>> {
    let output = match Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/deploy/kubernetes")])
        .output()
    {
        Ok(output) => output,
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: cannot run kubectl ({error})");
            return None;
        }
        Err(error) => panic!("CI must have kubectl: {error}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 manifests");
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect();
    Some(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// The environment variables a subcommand reads, from its `--help`.
fn settings_of(subcommand: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_qty-worker"))
        .args([subcommand, "--help"])
        .output()
        .expect("run qty-worker --help");
    let help = String::from_utf8_lossy(&output.stdout);
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().expect("a name").to_owned())
        .collect()
}

/// Every variable a container gets: its `env` and the keys of what `envFrom` names.
fn container_env(docs: &[Value], container: &Value) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().expect("env name").to_owned())
        .collect();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let (kind, reference, field) = if source["configMapRef"].is_object() {
            ("ConfigMap", &source["configMapRef"], "data")
        } else {
            ("Secret", &source["secretRef"], "stringData")
        };
        let object = find(docs, kind, reference["name"].as_str().expect("name"));
        names.extend(object[field].as_object().expect("keys").keys().cloned());
    }
    names
}

#[test]
fn the_manifests_use_the_binarys_settings_probes_port_and_queue() {
    let Some(docs) = rendered_manifests() else {
        return;
    };
    let deployment = find(&docs, "Deployment", "qty-worker");
    let worker = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(worker["args"][0], "run");
    let run = settings_of("run");
    let env = container_env(&docs, worker);
    assert!(
        env.is_subset(&run),
        "the Deployment sets what `run` does not read: {:?}",
        env.difference(&run).collect::<Vec<_>>()
    );

    let job = find(&docs, "Job", "qty-worker-migrate");
    let migrate_container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(migrate_container["args"][0], "migrate");
    let migrate = settings_of("migrate");
    let env = container_env(&docs, migrate_container);
    assert!(
        env.is_subset(&migrate),
        "the Job sets what `migrate` does not read: {:?}",
        env.difference(&migrate).collect::<Vec<_>>()
    );

    // The probes reach the listener QTY_HTTP_ADDR opens, on the paths it serves.
    let config = &find(&docs, "ConfigMap", "qty-worker")["data"];
    let http_addr: std::net::SocketAddr = config["QTY_HTTP_ADDR"]
        .as_str()
        .expect("QTY_HTTP_ADDR")
        .parse()
        .expect("an address");
    let port = &worker["ports"][0];
    assert_eq!(port["containerPort"], http_addr.port());
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &worker[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == port["containerPort"],
            "{probe} probes port {} of {port}",
            get["port"]
        );
    }

    // KEDA watches every partition queue the workers consume, summed, and
    // never runs more replicas than there are partitions.
    let scaled = find(&docs, "ScaledObject", "qty-worker");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "qty-worker");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    let partitions: u64 = config["QTY_PARTITIONS"]
        .as_str()
        .expect("QTY_PARTITIONS")
        .parse()
        .expect("a number");
    let metadata = &trigger["metadata"];
    assert_eq!(
        (
            &metadata["useRegex"],
            &metadata["operation"],
            &metadata["protocol"]
        ),
        (
            &Value::from("true"),
            &Value::from("sum"),
            &Value::from("http")
        )
    );
    let queue = config["QTY_QUEUE"].as_str().expect("QTY_QUEUE");
    assert_eq!(
        metadata["queueName"],
        format!("^{}\\.[0-9]+$", queue.replace('.', "\\.")),
        "the regex matches {queue}.0 … {queue}.{} and nothing else",
        partitions - 1
    );
    let max = scaled["spec"]["maxReplicaCount"]
        .as_u64()
        .expect("maxReplicaCount");
    assert!(
        max <= partitions,
        "{max} replicas for {partitions} partitions"
    );
    let auth = trigger["authenticationRef"]["name"].as_str().expect("auth");
    let secret = &find(&docs, "TriggerAuthentication", auth)["spec"]["secretTargetRef"][0];
    find(&docs, "Secret", secret["name"].as_str().expect("secret"))["stringData"]
        [secret["key"].as_str().expect("key")]
    .as_str()
    .expect("the Secret KEDA reads has the key");
}

#[tokio::test]
async fn the_probe_paths_answer_on_a_running_worker() {
    let app = TestApp::spawn().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = app.get("/no-such-path").await;
    assert_eq!(status, 404, "an unknown path must not pass for a probe");
}

/// The `qty_worker_…` names in `text`, without the `_bucket`/`_sum`/`_count`
/// suffixes a histogram's series add.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("qty_worker_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[tokio::test]
async fn every_metric_the_alerts_and_dashboard_name_is_one_the_worker_exposes() {
    let app = TestApp::spawn().await;
    let (_, exposition) = app.get("/metrics").await;
    let exposed: BTreeSet<String> = exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let mut checked = 0;
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/prometheus/alerts.test.yaml",
        "deploy/grafana/qty-worker.json",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).expect(file);
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{file} names no qty_worker metric");
        for name in named {
            assert!(
                exposed.contains(&name),
                "{file} names {name}, which the worker does not expose; it exposes {exposed:#?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} names checked");
}

#[test]
fn the_compose_file_runs_a_current_4x_broker_with_the_hash_exchange_plugin() {
    let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).expect("compose"),
    )
    .expect("compose is YAML");
    let rabbitmq = &compose["services"]["rabbitmq"];
    let image = rabbitmq["image"].as_str().expect("an image");
    let tag = image
        .strip_prefix("rabbitmq:")
        .and_then(|tag| tag.strip_suffix("-management"))
        .unwrap_or_else(|| panic!("{image} is not RabbitMQ's management image"));
    assert!(
        tag.starts_with("4."),
        "{image}: the compose file runs a 4.x release"
    );
    let mounts: Vec<&str> = rabbitmq["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|mount| mount.as_str())
        .collect();
    assert!(
        mounts.contains(&"./deploy/rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro"),
        "{mounts:?}"
    );
    let plugins = std::fs::read_to_string(Path::new(ROOT).join("deploy/rabbitmq/enabled_plugins"))
        .expect("enabled_plugins");
    assert!(
        plugins.contains("rabbitmq_consistent_hash_exchange"),
        "{plugins}"
    );
}
