//! Exact logistic fit benchmark (issue 10): the federated Newton/IRLS logit on the four CPS 1988
//! offices, real `fedstat-coordinator` and `fedstat-node` processes on loopback, next to
//! statsmodels fitting the same model on the pooled rows in the same sitting.
//!
//! Run:
//! ```text
//! cargo build --release --bins                           # fedstat-node must be current
//! FEDSTAT_BENCH_PYTHON=/tmp/refvenv/bin/python cargo bench -p fedstat-coordinator --bench glm
//! FEDSTAT_BENCH_QUICK=1 cargo bench -p fedstat-coordinator --bench glm   # one repetition
//! ```
//! `FEDSTAT_BENCH_PYTHON` names a Python with statsmodels and pandas
//! (`python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install statsmodels pandas`);
//! without it the comparison is skipped. Binaries, `FEDSTAT_BENCH_BIN_DIR`,
//! `FEDSTAT_BENCH_ALLOW_STALE` and `FEDSTAT_BENCH_OUT` work as in the round benchmark. Results:
//! `bench-results/glm.{json,md}` (`glm-quick.*` in quick mode), also printed.
//!
//! The model: `model = "logistic"`, `method = "exact"`, target wage > 522.32, education,
//! experience and its square, the ethnicity, smsa and parttime dummies (7 coefficients), train
//! rows, `min_nodes = 4`; each node allows these columns and has `min_nodes_floor = 4`.
//!
//! What is timed. One federation (PKI, coordinator on port 0, the four offices, one
//! researcher `Client`) is started untimed, then one untimed warm-up fit, then N fits (5; 1 in
//! quick mode). A fit's **wall time** is from the researcher's `submit` to the status poll
//! (every 2 ms) that first sees `Completed`: admission, every Newton round (broadcast of the
//! coefficients, the nodes' sums, upload, the coordinator's solve) and the final result. Each
//! fit has its own name, so its manifest is new and the nodes read and prepare their CSV
//! again (their cache is per manifest): reading the data is inside the wall time. Per fit we
//! also keep the rounds and the coordinator's `RoundRecord.round_ms` of each. Not timed: the
//! start of the processes, TLS handshakes, `fedstat results`. The **round trip** is the median
//! of 50 researcher `nodes` requests (researcher -> coordinator -> researcher over QUIC), a
//! stand-in for the coordinator -> node -> coordinator trip of a round.
//!
//! statsmodels, in the same sitting right after the fits: `glm_statsmodels.py` builds the
//! pooled train design and times (median of N, after one warm-up) `Logit.fit(method="newton")`
//! alone, `GLM(Binomial).fit()` alone, and reading the four CSVs plus the Logit fit. The
//! interpreter's start and imports are not timed. The goal is
//! `wall <= 2 x statsmodels + rounds x round trip`.
//!
//! Bytes: every node logs, with each answer it sent, the answer's payload bytes (the tensor and
//! the auxiliary figures) and its QUIC connection's `udp_tx.bytes` so far (everything it put on
//! the wire: frames, acknowledgements, heartbeats, retransmissions). A fit's bytes per node are
//! the counter at its last answer minus the counter at the last answer of the fit before (the
//! warm-up for the first one), so the handshake is not in them but heartbeats in between are.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use fedstat_coordinator::client::Client;
use fedstat_coordinator::config::ResearcherConfig;
use fedstat_coordinator::harness::{self, Bins, CoordinatorOptions, Proc};
use fedstat_core::spec::ExperimentSpec;
use fedstat_proto::wire::ExperimentState;
use serde_json::{json, Value};

const OFFICES: [&str; 4] = ["midwest", "northeast", "south", "west"];

const POLICY: &str = "[policy]\n\
    allowed_targets = [\"wage\"]\n\
    allowed_features = [\"education\", \"experience\", \"ethnicity\", \"smsa\", \"parttime\"]\n\
    min_nodes_floor = 4\n";

fn logit_spec(name: &str) -> ExperimentSpec {
    let text = format!(
        r#"
name = "{name}"
dataset = "cps1988"
model = "logistic"
method = "exact"
min_nodes = 4
round_timeout_secs = 60

[schema]
target = {{ column = "wage", threshold = 522.32 }}
numeric = [{{ column = "education" }}, {{ column = "experience", squared = true }}]
categorical = [
  {{ column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" }},
  {{ column = "smsa", levels = ["no", "yes"], reference = "no" }},
  {{ column = "parttime", levels = ["no", "yes"], reference = "no" }},
]
"#
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("the benchmark's spec: {e}"))
}

/// Binaries as in the round benchmark: this build's, refused when stale, or a given folder.
fn locate_bins(root: &Path) -> Bins {
    if let Some(dir) = std::env::var_os("FEDSTAT_BENCH_BIN_DIR") {
        return Bins::in_dir(PathBuf::from(dir)).unwrap_or_else(|e| panic!("FEDSTAT_BENCH_BIN_DIR: {e}"));
    }
    let bins = Bins::of_this_build().unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = bins.check_fresh(root) {
        assert!(std::env::var_os("FEDSTAT_BENCH_ALLOW_STALE").is_some(), "{e}");
        println!("warning: {e}");
    }
    bins
}

/// Coordinator, the four offices and a connected researcher.
struct Federation {
    coordinator: Proc,
    nodes: Vec<Proc>,
    client: Client,
}

impl Federation {
    async fn start(bins: &Bins, root: &Path, work: &Path) -> fedstat_coordinator::Result<Federation> {
        let pki = work.join("pki");
        bins.pki_init(&pki, None)?;
        bins.pki_issue(&pki, "researcher", "bench")?;
        for office in OFFICES {
            bins.pki_issue(&pki, "node", office)?;
        }
        let ca = pki.join("ca.pem");
        let tls = |name: &str| harness::tls_section(&pki, &ca, name);
        let opts = CoordinatorOptions {
            durable: Some(false),
            ..CoordinatorOptions::default()
        };
        let cfg = work.join("coordinator.toml");
        harness::write(&cfg, &harness::coordinator_config(&tls("coordinator"), &opts))?;
        let (coordinator, addr) = bins.spawn_coordinator(&cfg, &work.join("coordinator.log"))?;
        let mut nodes = Vec::new();
        for office in OFFICES {
            let csv = root.join("configs/demo/cps1988").join(format!("{office}.csv"));
            let cfg = work.join(format!("{office}.toml"));
            let text = harness::node_config(&addr, &tls(office), &[("cps1988", &csv)], POLICY);
            harness::write(&cfg, &text)?;
            nodes.push(bins.spawn_node(office, &cfg, &work.join(format!("{office}.log")), None)?);
        }
        let rcfg = work.join("researcher.toml");
        harness::write(&rcfg, &harness::researcher_config(&addr, &tls("bench")))?;
        let client = Client::connect(&ResearcherConfig::load(&rcfg)?).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client.nodes().await?.len();
            if up == OFFICES.len() {
                break;
            }
            if Instant::now() > deadline {
                return Err(fedstat_coordinator::Error::Harness(format!(
                    "only {up} of 4 nodes connected within 60 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Federation {
            coordinator,
            nodes,
            client,
        })
    }

    async fn stop(self) {
        self.client.close().await;
        harness::stop_all(self.nodes, Duration::from_secs(5));
        harness::stop_all(vec![self.coordinator], Duration::from_secs(5));
    }
}

/// One federated fit.
#[derive(Debug)]
struct Fit {
    id: u64,
    wall_ms: f64,
    rounds: u32,
    round_ms: Vec<f64>,
}

async fn fit(client: &Client, name: &str) -> Fit {
    let spec = logit_spec(name);
    let t = Instant::now();
    let id = client
        .submit(spec)
        .await
        .unwrap_or_else(|e| panic!("submit: {e:#}"));
    let status = loop {
        let s = client
            .status(Some(id))
            .await
            .unwrap_or_else(|e| panic!("status: {e:#}"))
            .pop()
            .expect("a status for the submitted fit");
        if s.state.is_finished() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    if !matches!(status.state, ExperimentState::Completed) {
        panic!(
            "the fit did not complete: {:?} {:#?}",
            status.state, status.events
        );
    }
    Fit {
        id,
        wall_ms,
        rounds: status.rounds_done,
        round_ms: status.history.iter().map(|r| r.round_ms as f64).collect(),
    }
}

/// Median of 50 researcher `nodes` requests, ms.
async fn round_trip_ms(client: &Client) -> f64 {
    let mut xs = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let _ = client.nodes().await;
        xs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    harness::median_range(&xs).0
}

/// What one node's log says about one fit: answers, their payload bytes, and the connection's
/// `udp_tx.bytes` at the last answer.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    answers: u64,
    payload: u64,
    counter: u64,
}

/// `key=VALUE` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Per experiment id, from a node's log.
fn sent_per_experiment(log: &str) -> BTreeMap<u64, Sent> {
    let mut out: BTreeMap<u64, Sent> = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains(" done (") && l.contains("sent_bytes="))
    {
        let (Some(exp), Some(answer), Some(counter)) = (
            field(line, "experiment"),
            field(line, "answer_bytes"),
            field(line, "sent_bytes"),
        ) else {
            continue;
        };
        let s = out.entry(exp).or_default();
        s.answers += 1;
        s.payload += answer;
        s.counter = s.counter.max(counter);
    }
    out
}

fn stats_json(xs: &[f64]) -> Value {
    let (md, lo, hi) = harness::median_range(xs);
    json!({ "median": md, "min": lo, "max": hi, "all": xs })
}

/// statsmodels on the pooled rows, or why it was skipped.
fn statsmodels(root: &Path, reps: usize) -> Result<Value, String> {
    let python = std::env::var_os("FEDSTAT_BENCH_PYTHON").ok_or_else(|| {
        "FEDSTAT_BENCH_PYTHON is not set; to compare, point it to a Python with statsmodels and pandas \
         (python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install statsmodels pandas)"
            .to_owned()
    })?;
    let script = root.join("coordinator/benches/glm_statsmodels.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(reps.to_string())
        .args(OFFICES.map(|o| root.join("configs/demo/cps1988").join(format!("{o}.csv"))))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&python).display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", script.display()))?;
    let ms = |key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).map(|s| s * 1e3).collect())
            .unwrap_or_default()
    };
    Ok(json!({
        "versions": { "statsmodels": v["statsmodels"], "pandas": v["pandas"], "numpy": v["numpy"] },
        "rows": v["rows"],
        "columns": v["columns"],
        "newton_iterations": v["iterations"],
        "converged": v["converged"],
        "logit_newton_fit_ms": stats_json(&ms("fit_s")),
        "glm_binomial_irls_fit_ms": stats_json(&ms("glm_fit_s")),
        "read_csvs_and_logit_fit_ms": stats_json(&ms("read_and_fit_s")),
    }))
}

fn machine(root: &Path) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "git_commit": git(&["rev-parse", "--short", "HEAD"]),
        "git_dirty": !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "unix_time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let fed = &r["fedstat"];
    let m = &r["machine"];
    let _ = writeln!(
        md,
        "# fedstat exact logit benchmark{}\n\nMachine: {} ({} cores); commit {}{}; unix time {}. \
         CPS 1988, 4 offices as real processes on loopback, {} measured fits (after a warm-up).\n",
        if r["quick"] == true { " (quick)" } else { "" },
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["git_commit"].as_str().unwrap_or("?"),
        if m["git_dirty"] == true { " (dirty)" } else { "" },
        m["unix_time"],
        r["reps"],
    );
    let w = &fed["wall_ms"];
    let rm = &fed["round_ms"];
    let _ = writeln!(md, "| what | median ms | min-max ms |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| fedstat exact logit, submit to completed | {:.0} | {:.0}-{:.0} |",
        f(&w["median"]),
        f(&w["min"]),
        f(&w["max"])
    );
    let _ = writeln!(
        md,
        "| fedstat, one round (`round_ms`, all rounds of all fits) | {:.0} | {:.0}-{:.0} |",
        f(&rm["median"]),
        f(&rm["min"]),
        f(&rm["max"])
    );
    for (key, label) in [
        ("first_round_ms", "fedstat, first round (nodes read their CSV)"),
        ("later_round_ms", "fedstat, later rounds"),
    ] {
        let x = &fed[key];
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.0}-{:.0} |",
            f(&x["median"]),
            f(&x["min"]),
            f(&x["max"])
        );
    }
    let _ = writeln!(
        md,
        "| researcher round trip (`nodes` request) | {:.2} | |",
        f(&fed["round_trip_ms"])
    );
    match r["statsmodels"].as_object() {
        Some(_) => {
            let s = &r["statsmodels"];
            for (key, label) in [
                ("logit_newton_fit_ms", "statsmodels `Logit.fit(newton)` alone"),
                (
                    "glm_binomial_irls_fit_ms",
                    "statsmodels `GLM(Binomial).fit()` alone",
                ),
                (
                    "read_csvs_and_logit_fit_ms",
                    "statsmodels reading the 4 CSVs + Logit fit",
                ),
            ] {
                let x = &s[key];
                let _ = writeln!(
                    md,
                    "| {label} | {:.0} | {:.0}-{:.0} |",
                    f(&x["median"]),
                    f(&x["min"]),
                    f(&x["max"])
                );
            }
            let c = &r["comparison"];
            let _ = writeln!(
                md,
                "\nRounds per fit: {} (statsmodels Newton iterations: {}). Ratio of medians, fedstat / \
                 statsmodels: {:.2} (fit alone), {:.2} (with reading the CSVs). Goal 2 x statsmodels + \
                 rounds x round trip = {:.0} ms (fit alone) or {:.0} ms (with reading): {}.",
                fed["rounds"],
                s["newton_iterations"],
                f(&c["ratio_to_fit"]),
                f(&c["ratio_to_read_and_fit"]),
                f(&c["goal_ms_fit"]),
                f(&c["goal_ms_read_and_fit"]),
                c["verdict"].as_str().unwrap_or("?"),
            );
        }
        None => {
            let _ = writeln!(
                md,
                "\nRounds per fit: {}. statsmodels skipped: {}",
                fed["rounds"],
                r["statsmodels_skipped"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nTime in rounds: median {:.0} ms of the wall time is the sum of `round_ms` (the rest: \
         admission, the status poll, the result).\n",
        f(&fed["sum_round_ms_median"])
    );
    let _ = writeln!(
        md,
        "| node | answers per fit | f64 values per answer | payload bytes per fit | UDP bytes sent per fit, median (min-max) |\n|---|---|---|---|---|"
    );
    if let Some(nodes) = r["bytes"].as_object() {
        for (name, b) in nodes {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {:.0} ({:.0}-{:.0}) |",
                b["answers_per_fit"],
                b["values_per_answer"],
                b["payload_bytes_per_fit"],
                f(&b["udp_tx_bytes_per_fit"]["median"]),
                f(&b["udp_tx_bytes_per_fit"]["min"]),
                f(&b["udp_tx_bytes_per_fit"]["max"])
            );
        }
    }
    md
}

fn main() {
    let quick = std::env::var("FEDSTAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let reps = if quick { 1 } else { 5 };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the coordinator crate sits in the workspace")
        .to_owned();
    let bins = locate_bins(&root);
    let tmp = tempfile::Builder::new()
        .prefix("fedstat-bench-glm-")
        .tempdir()
        .expect("cannot create a temporary folder");
    let work = tmp.path().to_owned();
    println!(
        "fedstat exact logit bench{}: binaries from {}, work folder {}",
        if quick { " (quick)" } else { "" },
        bins.dir().display(),
        work.display()
    );
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (warm, fits, rtt, logs) = rt.block_on(async {
        let fed = Federation::start(&bins, &root, &work)
            .await
            .unwrap_or_else(|e| panic!("{e} (logs in {})", work.display()));
        let warm = fit(&fed.client, "bench exact logit warm-up").await;
        println!("  warm-up: {:.0} ms, {} rounds", warm.wall_ms, warm.rounds);
        let mut fits = Vec::new();
        for i in 1..=reps {
            let x = fit(&fed.client, &format!("bench exact logit {i}")).await;
            println!(
                "  fit {i}: {:.0} ms, {} rounds, round_ms {:?}",
                x.wall_ms, x.rounds, x.round_ms
            );
            fits.push(x);
        }
        let rtt = round_trip_ms(&fed.client).await;
        let logs: Vec<(String, String)> = fed
            .nodes
            .iter()
            .zip(OFFICES)
            .map(|(p, o)| (o.to_owned(), p.log_text()))
            .collect();
        fed.stop().await;
        (warm, fits, rtt, logs)
    });

    // Bytes per node and fit, from the nodes' logs.
    let mut bytes = serde_json::Map::new();
    for (office, log) in &logs {
        let per = sent_per_experiment(log);
        let mut prev = per.get(&warm.id).map_or(0, |s| s.counter);
        let (mut answers, mut payload, mut udp) = (Vec::new(), Vec::new(), Vec::new());
        for x in &fits {
            let s = per.get(&x.id).copied().unwrap_or_default();
            answers.push(s.answers);
            payload.push(s.payload);
            udp.push(s.counter.saturating_sub(prev) as f64);
            prev = s.counter;
        }
        bytes.insert(
            office.clone(),
            json!({
                "answers_per_fit": answers.first().copied().unwrap_or(0),
                "values_per_answer": match (answers.first(), payload.first()) {
                    (Some(&a), Some(&p)) if a > 0 => p / a / 8,
                    _ => 0,
                },
                "payload_bytes_per_fit": payload.first().copied().unwrap_or(0),
                "udp_tx_bytes_per_fit": stats_json(&udp),
            }),
        );
    }

    let wall: Vec<f64> = fits.iter().map(|x| x.wall_ms).collect();
    let round_ms: Vec<f64> = fits.iter().flat_map(|x| x.round_ms.iter().copied()).collect();
    let first: Vec<f64> = fits.iter().filter_map(|x| x.round_ms.first().copied()).collect();
    let later: Vec<f64> = fits
        .iter()
        .flat_map(|x| x.round_ms.iter().skip(1).copied())
        .collect();
    let sum_rounds: Vec<f64> = fits.iter().map(|x| x.round_ms.iter().sum()).collect();
    let rounds = fits.first().map_or(0, |x| x.rounds);
    let fedstat = json!({
        "wall_ms": stats_json(&wall),
        "rounds": rounds,
        "rounds_per_fit": fits.iter().map(|x| x.rounds).collect::<Vec<_>>(),
        "round_ms": stats_json(&round_ms),
        "sum_round_ms_median": harness::median_range(&sum_rounds).0,
        // The first round includes reading and preparing the CSV at every node.
        "first_round_ms": stats_json(&first),
        "later_round_ms": stats_json(&later),
        "round_trip_ms": rtt,
        "warm_up_wall_ms": warm.wall_ms,
    });
    println!("  running statsmodels");
    let sm = statsmodels(&root, reps.max(5));
    let mut report = json!({
        "bench": "glm",
        "quick": quick,
        "reps": reps,
        "machine": machine(&root),
        "model": "exact logistic: wage > 522.32 ~ education + experience + experience^2 + ethnicity + smsa + parttime, train rows, 4 offices",
        "fedstat": fedstat,
        "bytes": bytes,
        "seconds": 0.0,
    });
    match sm {
        Ok(s) => {
            let md = harness::median_range(&wall).0;
            let fit_ms = f(&s["logit_newton_fit_ms"]["median"]);
            let read_ms = f(&s["read_csvs_and_logit_fit_ms"]["median"]);
            let trips = f64::from(rounds) * rtt;
            let (goal_fit, goal_read) = (2.0 * fit_ms + trips, 2.0 * read_ms + trips);
            let verdict = if md <= goal_fit {
                "met against the fit alone"
            } else if md <= goal_read {
                "met against statsmodels with reading the CSVs, not against the fit alone"
            } else {
                "not met"
            };
            report["comparison"] = json!({
                "ratio_to_fit": md / fit_ms,
                "ratio_to_read_and_fit": md / read_ms,
                "round_trips_ms": trips,
                "goal_ms_fit": goal_fit,
                "goal_ms_read_and_fit": goal_read,
                "verdict": verdict,
            });
            report["statsmodels"] = s;
        }
        Err(why) => {
            println!("  statsmodels comparison skipped: {why}");
            report["statsmodels_skipped"] = json!(why);
        }
    }
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    let out = std::env::var_os("FEDSTAT_BENCH_OUT").map_or_else(|| root.join("bench-results"), PathBuf::from);
    std::fs::create_dir_all(&out).expect("cannot create bench-results/");
    let stem = if quick { "glm-quick" } else { "glm" };
    let json_text = serde_json::to_string_pretty(&report).expect("the report serialises");
    harness::write(&out.join(format!("{stem}.json")), &json_text).expect("cannot write the results");
    let md = markdown(&report);
    harness::write(&out.join(format!("{stem}.md")), &md).expect("cannot write the results");
    println!("\n{md}");
    println!(
        "written to {} and {}.md ({:.0} s)",
        out.join(format!("{stem}.json")).display(),
        out.join(stem).display(),
        started.elapsed().as_secs_f64()
    );
}
