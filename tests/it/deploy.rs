//! Deployment files (issue #12), checked as far as a machine without a
//! container engine can: hadolint accepts the Dockerfile; `docker-compose
//! config` accepts compose/compose.yaml with and without the SQS override;
//! every archiver service's command line and settings are ones the binaries
//! accept; every metric name in deploy/prometheus/ and the Grafana dashboard
//! is one the exporter or a worker serves; Prometheus accepts its scrape
//! config. hadolint and docker-compose come from `scripts/services.sh
//! hadolint compose` (ARCHIVER_HADOLINT, ARCHIVER_COMPOSE in its env.sh).

use crate::helpers::bin::{self, both, stdout};
use crate::helpers::http::WORKER_SERIES;
use crate::helpers::{TestDb, ok};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Histograms' series carry these suffixes.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// A database URL for commands that only parse their flags.
const NO_DATABASE: &str = "postgresql://nobody@127.0.0.1:1/none";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool scripts/services.sh provides: `$var`, else `name` on PATH.
fn tool(var: &str, name: &str, service: &str) -> String {
    let tool = std::env::var(var).unwrap_or_else(|_| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .map_or_else(|| name.to_owned(), |p| p.display().to_string())
    });
    match Command::new(&tool).arg("--version").output() {
        Ok(o) if o.status.success() => tool,
        r => panic!(
            "{tool}: {r:?}; `scripts/services.sh {service}` provides it (and names it in {var})"
        ),
    }
}

fn hadolint() -> String {
    tool("ARCHIVER_HADOLINT", "hadolint", "hadolint")
}

fn compose() -> String {
    tool("ARCHIVER_COMPOSE", "docker-compose", "compose")
}

/// Runs `program args` in `dir`, feeding it `stdin`.
fn run(program: &str, args: &[&str], dir: &Path, stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// YAML as JSON, by the Python that runs docker-compose 1.x (its shebang):
/// it has PyYAML, since docker-compose needs it. serde_yaml is not a
/// dependency of ours.
fn yaml_to_json(yaml: &str) -> Value {
    let script = std::fs::read_to_string(compose()).unwrap_or_default();
    let python = script
        .strip_prefix("#!")
        .and_then(|s| s.lines().next())
        .and_then(|l| l.split_whitespace().next())
        .filter(|p| p.contains("python"))
        .unwrap_or("python3")
        .to_owned();
    let o = run(
        &python,
        &[
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        &repo(),
        yaml,
    );
    assert!(o.status.success(), "{python}: {}", both(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `docker-compose -f … config` in compose/, with `extra` arguments.
fn compose_config(files: &[&str], extra: &[&str]) -> Output {
    let mut args = Vec::new();
    for f in files {
        args.extend(["-f", f]);
    }
    args.push("config");
    args.extend(extra);
    run(&compose(), &args, &repo().join("compose"), "")
}

/// The stack as compose resolves it (defaults filled in), as JSON.
fn stack(files: &[&str]) -> Value {
    // docker-compose 2.x (a Go binary) prints JSON when asked; 1.x (a
    // Python script) only YAML.
    let v1 = std::fs::read(compose())
        .unwrap_or_default()
        .starts_with(b"#!");
    let o = compose_config(files, if v1 { &[] } else { &["--format", "json"] });
    assert!(o.status.success(), "{files:?}: {}", both(&o));
    if v1 {
        yaml_to_json(&stdout(&o))
    } else {
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

const BASE: &[&str] = &["compose.yaml"];
const SQS: &[&str] = &["compose.yaml", "compose.sqs.yaml"];

// ------------------------------------------------------------------- image

#[test]
fn hadolint_accepts_the_dockerfile_and_rejects_a_bad_one() {
    let lint = hadolint();
    let o = run(&lint, &["Dockerfile"], &repo(), "");
    assert!(o.status.success(), "hadolint Dockerfile:\n{}", both(&o));

    // The linter lints: a Dockerfile with the usual mistakes fails.
    let o = run(
        &lint,
        &["-"],
        &repo(),
        "FROM debian:latest\nRUN apt-get update && apt-get install curl\nCMD worker\n",
    );
    assert!(!o.status.success(), "hadolint accepted a bad Dockerfile");
    let out = both(&o);
    for rule in ["DL3007", "DL3015", "DL3025"] {
        assert!(out.contains(rule), "{rule} not reported:\n{out}");
    }
}

#[test]
fn the_image_runs_both_binaries_as_a_non_root_user_with_a_small_context() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let rust = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust}\n")),
        "the build image is not Rust {rust} (Cargo.toml's rust-version)"
    );
    for needed in [
        "cargo build --release --locked --bin planner --bin worker",
        "ca-certificates",
        "ENTRYPOINT [",
        "org.opencontainers.image.title",
    ] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed:?}");
    }
    let users: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .collect();
    assert!(
        users
            .last()
            .is_some_and(|u| !u.starts_with("root") && !u.starts_with('0')),
        "the image must end as a non-root user: {users:?}"
    );

    // Every COPY from the context is let in by .dockerignore, which keeps
    // everything else (target/, .services/, .git, compose/.env) out.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        rules.first(),
        Some(&"*"),
        ".dockerignore must start by excluding everything"
    );
    let let_in: BTreeSet<&str> = rules
        .iter()
        .filter_map(|r| r.strip_prefix('!'))
        .map(|r| r.trim_end_matches('/'))
        .collect();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        for src in &words[..words.len() - 1] {
            let src = src.trim_end_matches('/');
            assert!(
                let_in.contains(src),
                "COPY {src}: not let in by .dockerignore ({let_in:?})"
            );
        }
    }
    for kept_out in ["target", ".services", ".git", "compose", "tests"] {
        assert!(
            !let_in.contains(kept_out),
            ".dockerignore lets {kept_out} in"
        );
    }

    // What the build stage copies is a workspace cargo can load: every
    // member's manifest is there (a member left out of the context fails
    // the build before it starts).
    let context = tempdir("image-context");
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        for src in &words[..words.len() - 1] {
            let copied = Command::new("cp")
                .args(["-r", src, context.to_str().unwrap()])
                .current_dir(repo())
                .status()
                .unwrap();
            assert!(copied.success(), "cp {src}");
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = run(
        &cargo,
        &[
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ],
        &context,
        "",
    );
    assert!(
        o.status.success(),
        "the image's build context is not a workspace cargo can load: {}",
        both(&o)
    );
    let _ = std::fs::remove_dir_all(&context);
}

// ----------------------------------------------------------------- compose

#[test]
fn compose_config_accepts_the_stack_with_and_without_sqs() {
    for files in [BASE, SQS] {
        let o = compose_config(files, &["-q"]);
        assert!(o.status.success(), "{files:?}:\n{}", both(&o));
        // With the example settings too (what an operator copies to .env).
        let mut args = vec!["--env-file", ".env.example"];
        for f in files {
            args.extend(["-f", f]);
        }
        args.extend(["config", "-q"]);
        let o = run(&compose(), &args, &repo().join("compose"), "");
        assert!(
            o.status.success(),
            "{files:?} with .env.example:\n{}",
            both(&o)
        );
    }

    // The check checks: a service with a key compose does not know fails.
    let dir = tempdir("compose-bad");
    std::fs::write(
        dir.join("compose.yaml"),
        "services:\n  worker:\n    image: archiver\n    replicaz: 3\n",
    )
    .unwrap();
    let o = run(&compose(), &["config", "-q"], &dir, "");
    assert!(
        !o.status.success(),
        "docker-compose accepted an unknown key"
    );
}

fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn service<'a>(stack: &'a Value, name: &str) -> &'a Value {
    &stack["services"][name]
}

fn command(svc: &Value) -> Vec<String> {
    svc["command"]
        .as_array()
        .map(|a| a.iter().map(|w| w.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn env_of(svc: &Value) -> BTreeMap<String, String> {
    svc["environment"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn waits_for(svc: &Value, dep: &str, condition: &str) -> bool {
    svc["depends_on"][dep]["condition"] == condition
}

#[test]
fn the_stack_is_wired_as_the_fleet_needs() {
    let s = stack(BASE);
    let pg = service(&s, "postgres");
    assert!(
        pg["healthcheck"]["test"].to_string().contains("pg_isready"),
        "{pg}"
    );
    assert_eq!(command(service(&s, "migrate")), ["planner", "migrate"]);
    assert!(waits_for(
        service(&s, "migrate"),
        "postgres",
        "service_healthy"
    ));
    for name in ["worker", "scheduler", "exporter"] {
        let svc = service(&s, name);
        assert!(
            waits_for(svc, "migrate", "service_completed_successfully"),
            "{name} does not wait for the migration: {}",
            svc["depends_on"]
        );
    }
    for name in ["worker", "scheduler"] {
        assert!(waits_for(
            service(&s, name),
            "objects-init",
            "service_completed_successfully"
        ));
    }

    // `--scale worker=N`: nothing that names one container or host port.
    let worker = service(&s, "worker");
    assert!(worker.get("container_name").is_none(), "{worker}");
    assert!(worker.get("ports").is_none(), "{worker}");
    assert!(
        worker["deploy"]["replicas"].as_u64().unwrap() >= 2,
        "{worker}"
    );
    let env = env_of(worker);
    assert_eq!(env["ARCHIVER_WORKER_LISTEN"], "0.0.0.0:9188");
    assert!(env["QUEUE_URL"].starts_with("amqp://"), "{env:?}");

    assert_eq!(
        command(service(&s, "exporter")),
        ["planner", "metrics", "--listen", "0.0.0.0:9187"]
    );
    let prometheus =
        std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(prometheus.contains("exporter:9187"));
    assert!(prometheus.contains("- names: [\"worker\"]") && prometheus.contains("port: 9188"));

    // The scheduler runs the README's crontab: the same two schedules.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for (schedule, job) in crontab_jobs(&s) {
        let line = format!("{schedule} DATABASE_URL=");
        assert!(
            readme.contains(&line) && readme.contains(&format!("/opt/archiver/bin/{job}")),
            "`{schedule} {job}` is not the README's crontab"
        );
    }

    // With SQS: the queue is ElasticMQ's, and RabbitMQ is not started.
    let s = stack(SQS);
    for name in ["worker", "scheduler"] {
        let env = env_of(service(&s, name));
        assert!(
            env["QUEUE_URL"].starts_with("http://elasticmq:9324/"),
            "{name}: {env:?}"
        );
    }
    assert_eq!(
        service(&s, "rabbitmq")["profiles"],
        serde_json::json!(["amqp"])
    );
    for (name, svc) in s["services"].as_object().unwrap() {
        assert!(
            svc["depends_on"].get("rabbitmq").is_none(),
            "{name} depends on rabbitmq, which the SQS stack does not start"
        );
    }
}

/// The scheduler's crontab (the host file its volume mounts): schedule and
/// command of each job.
fn crontab_jobs(stack: &Value) -> Vec<(String, String)> {
    let scheduler = service(stack, "scheduler");
    let cmd = command(scheduler);
    assert_eq!(
        cmd.first().map(String::as_str),
        Some("supercronic"),
        "{cmd:?}"
    );
    let inside = cmd.last().unwrap();
    let host = scheduler["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| {
            let (source, target) = match v {
                Value::String(s) => {
                    let mut parts = s.split(':');
                    (parts.next()?.to_owned(), parts.next()?.to_owned())
                }
                v => (
                    v["source"].as_str()?.to_owned(),
                    v["target"].as_str()?.to_owned(),
                ),
            };
            (target == *inside).then_some(source)
        })
        .unwrap_or_else(|| panic!("{inside} is not mounted into the scheduler"));
    parse_crontab(&std::fs::read_to_string(repo().join("compose").join(&host)).unwrap())
}

fn parse_crontab(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            assert!(fields.len() > 5, "not a crontab line: {l:?}");
            (fields[..5].join(" "), fields[5..].join(" "))
        })
        .collect()
}

/// Help texts: the binaries' own and every planner subcommand's.
struct Help {
    planner: String,
    worker: String,
    subcommands: BTreeSet<String>,
}

async fn help() -> Help {
    let top = ok(&bin::planner(NO_DATABASE).args(["--help"]).output().await);
    let subcommands: BTreeSet<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(subcommands.contains("migrate"), "{top}");
    let mut planner = top.clone();
    for sub in &subcommands {
        planner += &ok(&bin::planner(NO_DATABASE)
            .args([sub.as_str(), "--help"])
            .output()
            .await);
    }
    let worker = ok(&bin::worker(NO_DATABASE).args(["--help"]).output().await);
    Help {
        planner,
        worker,
        subcommands,
    }
}

/// Whether `help` documents the environment variable `name`.
fn documents(help: &str, name: &str) -> bool {
    help.contains(&format!("[env: {name}]")) || help.contains(&format!("[env: {name}="))
}

/// The archiver's own variables (the AWS SDK's and the images' others are
/// not ours to check).
fn ours(name: &str) -> bool {
    name.starts_with("ARCHIVER_")
        || name.starts_with("REPORTS_")
        || ["DATABASE_URL", "QUEUE_URL"].contains(&name)
}

/// What is wrong with the archiver services of `stack`: a variable the
/// binary does not document, a command it rejects, a subcommand it lacks.
async fn misfits(stack: &Value, help: &Help) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut archiver_services = 0;
    for (name, svc) in stack["services"].as_object().unwrap() {
        let cmd = command(svc);
        let program = cmd.first().map(String::as_str).unwrap_or("");
        // What runs in the service: its command, or its crontab's jobs.
        let lines: Vec<Vec<String>> = match program {
            "planner" | "worker" => vec![cmd.clone()],
            "supercronic" => crontab_jobs(stack)
                .into_iter()
                .map(|(_, job)| job.split_whitespace().map(str::to_owned).collect())
                .collect(),
            _ => {
                let image = svc["image"].as_str().unwrap_or("");
                if image.starts_with("archiver") || svc.get("build").is_some() {
                    wrong.push(format!("{name}: runs {cmd:?}, neither planner nor worker"));
                }
                continue;
            }
        };
        archiver_services += 1;
        for line in &lines {
            let (bin_name, args) = (line[0].as_str(), &line[1..]);
            let text = match bin_name {
                "planner" => &help.planner,
                "worker" => &help.worker,
                other => {
                    wrong.push(format!("{name}: runs {other}, neither planner nor worker"));
                    continue;
                }
            };
            if bin_name == "planner"
                && let Some(sub) = args.first().filter(|a| !a.starts_with('-'))
                && !help.subcommands.contains(sub)
            {
                wrong.push(format!("{name}: planner has no subcommand {sub:?}"));
            }
            // The whole command line, parsed (and not run): --help after
            // it, which clap honours only once every argument before it
            // was accepted.
            let b = if bin_name == "planner" {
                bin::planner(NO_DATABASE)
            } else {
                bin::worker(NO_DATABASE)
            };
            let o = b.args(args).args(["--help"]).output().await;
            if !o.status.success() {
                wrong.push(format!("{name}: {line:?} is rejected: {}", both(&o).trim()));
            }
            for var in env_of(svc).keys().filter(|v| ours(v)) {
                if !documents(text, var) {
                    wrong.push(format!("{name}: {bin_name} does not take {var}"));
                }
            }
        }
    }
    if archiver_services < 4 {
        wrong.push(format!("only {archiver_services} archiver services found"));
    }
    wrong
}

#[tokio::test]
async fn compose_uses_only_settings_and_commands_the_binaries_accept() {
    let help = help().await;
    for files in [BASE, SQS] {
        let wrong = misfits(&stack(files), &help).await;
        assert!(wrong.is_empty(), "{files:?}:\n{}", wrong.join("\n"));
    }

    // A drifted file is caught: a made-up variable, a misspelt subcommand,
    // a flag that does not exist.
    let mut s = stack(BASE);
    s["services"]["worker"]["environment"]["ARCHIVER_MADE_UP"] = "1".into();
    s["services"]["migrate"]["command"] = serde_json::json!(["planner", "migrat"]);
    s["services"]["exporter"]["command"] =
        serde_json::json!(["planner", "metrics", "--lissen", "x"]);
    let wrong = misfits(&s, &help).await.join("\n");
    for expected in [
        "worker: worker does not take ARCHIVER_MADE_UP",
        "migrate: planner has no subcommand \"migrat\"",
        "exporter: [\"planner\", \"metrics\", \"--lissen\", \"x\"] is rejected",
    ] {
        assert!(wrong.contains(expected), "{expected:?} not in:\n{wrong}");
    }
}

// ----------------------------------------------------------------- metrics

/// The names in a PromQL expression that are metric names: identifiers
/// that are not functions, aggregations, keywords, label names (in `{…}`,
/// `by (…)`, `on (…)` and the like), strings, durations or Grafana
/// variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "inf",
        "nan",
        "Inf",
        "NaN",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut previous = String::new();
    // Skips from an opening bracket to its closing one.
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < chars.len() {
            if chars[i] == open {
                depth += 1;
            } else if chars[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '(' && LABEL_LISTS.contains(&previous.as_str()) {
            i = skip_group(i, '(', ')');
            previous.clear();
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, or a number or duration.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let is_call = j < chars.len() && chars[j] == '(';
            if !is_call && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word.clone());
            }
            previous = word;
        } else {
            if !c.is_whitespace() {
                previous.clear();
            }
            i += 1;
        }
    }
    names
}

/// Every string under a key named one of `keys`, anywhere in `v`.
fn strings_under(v: &Value, keys: &[&str], out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if keys.contains(&k.as_str()) => out.push(s.clone()),
                    _ => strings_under(v, keys, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| strings_under(v, keys, out)),
        _ => {}
    }
}

/// The PromQL of the rules, their unit tests, the scrape config and the
/// dashboard, by file.
fn queries() -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let dir = repo().join("deploy/prometheus");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            let yaml = yaml_to_json(&std::fs::read_to_string(&path).unwrap());
            let mut exprs = Vec::new();
            strings_under(&yaml, &["expr", "series"], &mut exprs);
            out.insert(path.display().to_string(), exprs);
        }
    }
    let path = repo().join("deploy/grafana/archiver.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    strings_under(&dashboard, &["expr"], &mut exprs);
    out.insert(path.display().to_string(), exprs);
    out
}

/// Names in `queries` that nothing serves, with where they are used.
fn unserved(queries: &BTreeMap<String, Vec<String>>, served: &BTreeSet<String>) -> Vec<String> {
    let known = |name: &str| {
        name == "up"
            || served.contains(name)
            || WORKER_SERIES.iter().any(|(n, _)| *n == name)
            || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| WORKER_SERIES.contains(&(base, "histogram")))
            })
    };
    let mut wrong = Vec::new();
    for (file, exprs) in queries {
        for expr in exprs {
            for name in metric_names(expr) {
                if !known(&name) {
                    wrong.push(format!("{file}: {name} in {expr:?}"));
                }
            }
        }
    }
    wrong
}

#[tokio::test]
async fn every_metric_the_rules_and_dashboard_use_is_served() {
    // A ledger with a completed job of each kind planned (nothing to
    // archive still completes one): a gauge with no series has no # TYPE.
    let db = TestDb::new().await;
    ok(&db.planner().args(["--logs", "--metrics"]).output().await);
    let page = ok(&db.planner().args(["metrics"]).output().await);
    db.cleanup().await;
    let served: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(served.contains("archive_batches"), "{page}");

    let queries = queries();
    let dashboard = &queries[&repo()
        .join("deploy/grafana/archiver.json")
        .display()
        .to_string()];
    assert!(
        dashboard.len() >= 10,
        "too few dashboard queries: {dashboard:?}"
    );
    let used: BTreeSet<String> = queries
        .values()
        .flatten()
        .flat_map(|e| metric_names(e))
        .collect();
    for name in [
        "archive_batches",
        "archiver_worker_batch_duration_seconds_bucket",
        "up",
    ] {
        assert!(
            used.contains(name),
            "{name} not found in the queries: {used:?}"
        );
    }
    let wrong = unserved(&queries, &served);
    assert!(
        wrong.is_empty(),
        "metrics nothing serves:\n{}",
        wrong.join("\n")
    );

    // A made-up name fails, wherever it hides in a query.
    let mut bad = queries.clone();
    bad.insert(
        "made-up".into(),
        vec![
            "sum by (kind) (rate(archive_made_up_total{kind=\"logs\"}[5m]))".into(),
            "histogram_quantile(0.9, sum by (le) (rate(archiver_worker_batch_duration_seconds_bucketz[$__rate_interval])))".into(),
            "archive_batches > 0 and on() (time() - archive_batch_last_completed > 3600)".into(),
        ],
    );
    let wrong = unserved(&bad, &served).join("\n");
    for name in [
        "archive_made_up_total",
        "archiver_worker_batch_duration_seconds_bucketz",
        "archive_batch_last_completed ",
    ] {
        assert!(wrong.contains(name), "{name} not caught:\n{wrong}");
    }
}

#[test]
fn metric_names_skip_what_is_not_a_metric() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"sum by (kind, le) (rate(a_total{kind="x", job=~"y|z"}[5m] offset 1h))"#),
        ["a_total"]
    );
    assert_eq!(
        names("time() - max by (job_type) (b{job_type!=\"retention\"}) > 90000"),
        ["b"]
    );
    assert_eq!(names("absent(c) or vector(0)"), ["c"]);
    assert_eq!(names("d > 0 and on() (time() - e > 3600)"), ["d", "e"]);
    assert_eq!(names("f * 1000 + 1e3"), ["f"]);
    assert_eq!(names(r#"g{label="has h_total in it"}"#), ["g"]);
    assert_eq!(names("rate(i[$__rate_interval]) * $scale"), ["i"]);
    assert_eq!(
        names("sum without (instance) (j) / ignoring(k) group_left l"),
        ["j", "l"]
    );
    assert_eq!(names("increase(m[1d]) > bool 1073741824"), ["m"]);
    assert!(names("").is_empty());
}

#[test]
fn prometheus_accepts_the_scrape_config_and_the_dashboard_is_whole() {
    let promtool = std::env::var("ARCHIVER_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let o = run(
        &promtool,
        &["check", "config", "prometheus.yml"],
        &repo().join("deploy/prometheus"),
        "",
    );
    assert!(o.status.success(), "promtool check config:\n{}", both(&o));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/archiver.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "archiver");
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for needed in [
        "Backlog by kind",
        "Workers up",
        "Dead batches",
        "Last success per kind",
    ] {
        assert!(titles.contains(&needed), "no {needed:?} panel: {titles:?}");
    }

    // Grafana in the stack loads it from where its provider looks.
    let provider = yaml_to_json(
        &std::fs::read_to_string(
            repo().join("deploy/grafana/provisioning/dashboards/archiver.yml"),
        )
        .unwrap(),
    );
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana = service(&stack(BASE), "grafana").clone();
    let mounts = grafana["volumes"].to_string();
    assert!(
        mounts.contains(&format!("{path}/archiver.json")),
        "{path} is not where compose mounts the dashboard: {mounts}"
    );
}

// ------------------------------------------------- the stack, as processes

/// What the stack's names become on this machine: the services' host names
/// are the loopback services the tests use, a volume is a scratch
/// directory, a listening address a free loopback port. The work queue and
/// the bucket get names of this test's own, so that the shared broker and
/// store are not touched by anything else.
struct Here {
    db: String,
    queue: String,
    bucket: String,
    reports: PathBuf,
}

impl Here {
    /// `env` as the compose file gives it, with the stack's names mapped.
    fn localize(&self, env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (key, value) in env {
            let local = match key.as_str() {
                "DATABASE_URL" => {
                    assert!(value.contains("@postgres:5432/"), "{key}={value}");
                    self.db.clone()
                }
                "QUEUE_URL" => {
                    assert!(value.contains("@rabbitmq:5672/"), "{key}={value}");
                    crate::helpers::amqp::amqp_url()
                }
                "AWS_ENDPOINT_URL_S3" | "AWS_ENDPOINT_URL" => {
                    assert!(value.starts_with("http://objects:"), "{key}={value}");
                    crate::helpers::s3::endpoint()
                }
                "REPORTS_ROOT" => {
                    assert_eq!(value, "/srv/reports", "the reports volume's mount point");
                    self.reports.display().to_string()
                }
                "REPORTS_ARCHIVE_BUCKET" => self.bucket.clone(),
                "ARCHIVER_WORKER_LISTEN" | "ARCHIVER_METRICS_LISTEN" => free_port(),
                _ => value.clone(),
            };
            out.insert(key.clone(), local);
        }
        if out.contains_key("QUEUE_URL") {
            out.insert("ARCHIVER_QUEUE".into(), self.queue.clone());
        }
        out
    }

    /// A service's command line and environment as they run here: the
    /// process, and the address it serves on (`--listen` or
    /// `ARCHIVER_WORKER_LISTEN`, mapped to a free loopback port), if any.
    fn process(
        &self,
        cmd: &[String],
        env: &BTreeMap<String, String>,
    ) -> (bin::Bin, Option<String>) {
        let (program, args) = cmd.split_first().expect("a command");
        let mut b = match program.as_str() {
            "planner" => bin::planner(&self.db),
            "worker" => bin::worker(&self.db),
            other => panic!("{other} is not one of the archiver's binaries"),
        };
        let mut args: Vec<String> = args.to_vec();
        let mut listen = None;
        for i in 1..args.len() {
            if args[i - 1] == "--listen" {
                args[i] = free_port();
                listen = Some(args[i].clone());
            }
        }
        let env = self.localize(env);
        listen = listen.or_else(|| env.get("ARCHIVER_WORKER_LISTEN").cloned());
        b = b.args(&args);
        for (k, v) in env {
            b = b.env(&k, v);
        }
        (b, listen)
    }
}

/// A loopback address with a port nothing listens on now.
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` on `addr` (as a compose file writes it): status and body;
/// `None` while nothing answers there.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    crate::helpers::http::try_get(addr.parse().ok()?, path).await
}

#[tokio::test]
async fn the_stacks_archiver_services_run_as_the_compose_file_gives_them() {
    use crate::helpers::wait::wait_until;
    use std::time::Duration;
    let stack = stack(BASE);
    let db = TestDb::unmigrated().await;
    let s3 = crate::helpers::s3::client();
    let here = Here {
        db: db.url.clone(),
        queue: format!("test.stack.{}", uuid::Uuid::new_v4().simple()),
        bucket: crate::helpers::s3::new_bucket(&s3).await,
        reports: tempdir("stack-reports"),
    };

    // migrate: a one-shot that must succeed before anything else starts.
    let migrate = service(&stack, "migrate");
    assert!(waits_for(migrate, "postgres", "service_healthy"));
    ok(&here
        .process(&command(migrate), &env_of(migrate))
        .0
        .output_within(Duration::from_secs(120))
        .await);
    // The exporter and three workers, each with the command and
    // environment the file gives it.
    let exporter = service(&stack, "exporter");
    let (run, addr) = here.process(&command(exporter), &env_of(exporter));
    let exporter_addr = addr.expect("the exporter listens");
    let exporter_run = run.spawn();
    let worker = service(&stack, "worker");
    assert!(waits_for(
        worker,
        "migrate",
        "service_completed_successfully"
    ));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (run, addr) = here.process(&command(worker), &env_of(worker));
        workers.push((addr.expect("ARCHIVER_WORKER_LISTEN"), run.spawn()));
    }
    for (addr, _) in &workers {
        wait_until(
            &format!("worker at {addr} ready"),
            Duration::from_secs(60),
            || async {
                http_get(addr, "/readyz")
                    .await
                    .is_some_and(|(c, _)| c == 200)
            },
        )
        .await;
    }

    // The scheduler's healthcheck (`planner check` with the nightly job's
    // settings) passes: every dependency, one line each.
    let scheduler = service(&stack, "scheduler");
    let probe: Vec<String> = scheduler["healthcheck"]["test"]
        .as_array()
        .expect("the scheduler has a healthcheck")
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .skip_while(|w| w == "CMD")
        .collect();
    let said = ok(&here
        .process(&probe, &env_of(scheduler))
        .0
        .output_within(Duration::from_secs(120))
        .await);
    for dependency in ["database", "queue", "reports root", "object store"] {
        let want = format!("{dependency}: ok, ");
        assert!(
            said.lines().any(|l| l.starts_with(&want)),
            "{probe:?}: no {want:?} in\n{said}"
        );
    }

    // Old rows to archive, then the scheduler's nightly job.
    db.load_logs(3000).await;
    let old = db
        .scalar(
            "SELECT count(*) FROM scenario_logs WHERE received_at < now() - interval '365 days'",
        )
        .await;
    assert!(old > 0);
    let nightly = crontab_jobs(&stack)
        .into_iter()
        .find(|(_, job)| job.contains("--all"))
        .expect("a nightly planner --all");
    let words: Vec<String> = nightly.1.split_whitespace().map(str::to_owned).collect();
    ok(&here
        .process(&words, &env_of(scheduler))
        .0
        .output_within(Duration::from_secs(180))
        .await);
    wait_until("every job completed", Duration::from_secs(180), || async {
        db.scalar("SELECT count(*) FROM archive_jobs WHERE status <> 'completed'")
            .await
            == 0
    })
    .await;
    let archived = db
        .scalar("SELECT count(*) FROM scenario_logs_archive")
        .await;
    assert_eq!(archived, old, "every old row archived once");

    // Every worker answers, and together they archived what the ledger says.
    let mut rows_by_workers = 0.0;
    for (addr, _) in &workers {
        let (code, _) = http_get(addr, "/readyz").await.expect("readyz answers");
        assert_eq!(code, 200, "{addr} /readyz");
        let (code, text) = http_get(addr, "/metrics").await.expect("metrics answer");
        assert_eq!(code, 200, "{addr} /metrics");
        for (name, _) in WORKER_SERIES {
            assert!(text.contains(name), "{addr} /metrics lacks {name}:\n{text}");
        }
        rows_by_workers +=
            crate::helpers::http::value(&text, "archiver_worker_rows_total{kind=\"logs\"}")
                .unwrap_or(0.0);
    }
    assert_eq!(
        rows_by_workers as i64, archived,
        "rows the workers say they archived"
    );
    // The exporter's figures are the ledger's.
    let (code, text) = http_get(&exporter_addr, "/metrics")
        .await
        .expect("the exporter answers");
    assert_eq!(code, 200);
    let ledger = db
        .scalar("SELECT COALESCE(sum(records_archived), 0)::bigint FROM archive_jobs WHERE job_type = 'logs'")
        .await;
    assert_eq!(
        crate::helpers::http::value(&text, "archive_rows_archived_total{job_type=\"logs\"}"),
        Some(ledger as f64),
        "{text}"
    );
    assert_eq!(ledger, archived);

    for (_, w) in workers {
        w.stop().await;
    }
    exporter_run.stop().await;
    crate::helpers::s3::delete_bucket(&s3, &here.bucket).await;
    crate::helpers::amqp::delete_queues(&archiver::transport::amqp::AmqpConfig {
        url: crate::helpers::amqp::amqp_url().into(),
        queue: here.queue.clone(),
        delivery_limit: 5,
    })
    .await;
    let _ = std::fs::remove_dir_all(&here.reports);
    db.cleanup().await;
}
