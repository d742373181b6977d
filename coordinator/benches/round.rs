//! Round benchmark: the real `fedstat-coordinator` and `fedstat-node` binaries as separate
//! processes on loopback, running the `echo` model (each node returns the global parameters
//! plus a small seeded change, weight 100: the task of `shared/bench/README.md`), plus
//! in-process aggregation throughput.
//!
//! Run:
//! ```text
//! cargo build --release --bins                            # fedstat-node must be current
//! cargo bench -p fedstat-coordinator --bench round        # full run, about 6 minutes
//! FEDSTAT_BENCH_QUICK=1 cargo bench -p fedstat-coordinator --bench round   # smoke, < 60 s
//! FEDSTAT_BENCH_CASES=a,e cargo bench -p fedstat-coordinator --bench round # some cases only
//! FEDSTAT_BENCH_CASES=a-durable,b-durable cargo bench ...                  # the durable ones
//! FEDSTAT_BENCH_CASES=s cargo bench ...      # secure aggregation against plain, about 2 min
//! ```
//! The binaries are taken from the folder above this executable's (`target/release/`); the
//! bench refuses to run when one is missing or older than a source file of its crates
//! (`FEDSTAT_BENCH_ALLOW_STALE=1` turns that into a warning). `FEDSTAT_BENCH_BIN_DIR=DIR` takes
//! them from DIR instead, unchecked (to compare two builds in one sitting).
//! Results: `bench-results/round.{json,md}` at the workspace root (`round-quick.*` in quick
//! mode; `FEDSTAT_BENCH_OUT=DIR` writes them to DIR instead), also printed.
//!
//! Cases (every federation is started fresh: PKI from `pki init/issue`, coordinator on port 0,
//! N nodes, one researcher `Client`; `min_nodes = N`, so every round waits for every node).
//! a-d run the coordinator **in memory** (`durable = false`): the like-for-like comparison with
//! Flower, which keeps no store. The `-durable` cases run the same federation with the store on
//! (`durable = true`, `data_dir` in the bench's temporary folder: SQLite with synchronous
//! writes, and every round's global model written and fsynced), to show what durability costs:
//! - a. 10 nodes, 1,000 f32 params: 2 warm-up + 30 measured rounds (coordination overhead);
//! - a-durable: a with the store on;
//! - b. 10 nodes, 10,000,000 f32 params: 1 warm-up + 10 measured rounds (data movement);
//! - b-durable: b with the store on;
//! - c. 20, 30, 50 nodes, 1,000 params: 2 warm-up + 30 measured rounds each;
//! - d. peak RSS of the coordinator (VmHWM from /proc/PID/status at the end of the run) in b
//!   and in the same run with 50 nodes (1 warm-up + 3 rounds); node side: the sum of the
//!   nodes' VmHWM and the peak of their summed VmRSS (sampled every 50 ms);
//! - e. `ExactSum::fold` of 10 updates x 10M params, f32 and f64: GB/s of input bytes, median
//!   of 5 reps; a rep times `ExactSum::new` (the accumulator is fresh each round in the real
//!   coordinator, page faults included) and the ten folds.
//! - s. (only when named in `FEDSTAT_BENCH_CASES`) secure aggregation against plain: 10 nodes,
//!   1,000,000 params, `secure_aggregation = false` then `true`, 2 warm-up + 20 measured rounds
//!   each, bytes per node, the secure exchanges' times, an in-process microbenchmark of the
//!   masking, and Flower's SecAgg+ ratios measured in the same sitting (see `round/secagg.rs`).
//!   It writes `bench-results/secagg.{json,md}`; run alone, it leaves `round.*` as they are.
//!   Not in the default run: it needs `fedstat_secagg` (not a stub) in the node, and its
//!   comparison only means something next to Flower's, in a quiet sitting of its own.
//!
//! What is timed: a round's time is the coordinator's own `RoundRecord.round_ms` (from the
//! task broadcast to the aggregate, integer milliseconds) read with `Client::status`; we report
//! the median and range over the measured rounds. Cross-check: the researcher polls the status
//! (every 2 ms for 1k params, 20 ms for 10M) and notes when `rounds_done` changes; the wall
//! clock from the end of the warm-up to the last round, divided by the measured rounds, is the
//! mean wall time per round (it includes the start of the next round, which `round_ms` does
//! not). With the store on, a round's model is written after its aggregate and before the next
//! round's tasks go out, so it is counted in the next round's `round_ms` and in the wall time.
//! Everything (coordinator, nodes, researcher) shares the same machine: on the 2-core
//! box of `shared/bench/README.md`, N nodes compete with the coordinator for CPU, as Flower's
//! supernodes do in its runs.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fedstat_coordinator::client::Client;
use fedstat_coordinator::config::ResearcherConfig;
use fedstat_coordinator::harness::{self, Bins, CoordinatorOptions, Proc};
use fedstat_core::aggregate::{ExactSum, Values};
use fedstat_core::spec::{EchoSpec, ExperimentSpec};
use fedstat_proto::wire::{DType, EventRecord, ExperimentState};
use serde_json::{json, Value};

const ECHO_EXPERIMENT: &str = include_str!("../../configs/experiment-echo.toml");
const SMALL: u64 = 1_000;
const LARGE: u64 = 10_000_000;
const KNOWN_CASES: [&str; 8] = ["a", "a-durable", "b", "b-durable", "c", "d", "e", "s"];

// Beside this file, not in `benches/`, where cargo would take it for a bench of its own.
#[path = "round/secagg.rs"]
mod secagg;

/// Where the coordinator keeps its records during a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// `durable = false`: nothing on disk (as Flower).
    InMemory,
    /// `durable = true`, `data_dir` in the case's temporary folder.
    Durable,
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Store::InMemory => "in-memory",
            Store::Durable => "durable",
        }
    }
}

/// Which cases to run and how many rounds.
struct Plan {
    quick: bool,
    /// Case names: one letter `a`..`e`, or `a-durable`, `b-durable`.
    cases: BTreeSet<String>,
    small_rounds: (u32, u32),
    large_rounds: (u32, u32),
    many_nodes: Vec<usize>,
    rss_nodes: Option<(usize, (u32, u32))>,
    agg_reps: usize,
    /// Case s: warm-up and measured rounds of each of its runs.
    secagg_rounds: (u32, u32),
}

impl Plan {
    fn from_env() -> Plan {
        let quick = std::env::var("FEDSTAT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let cases: BTreeSet<String> = match std::env::var("FEDSTAT_BENCH_CASES") {
            Ok(list) => list
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect(),
            Err(_) => ["a", "a-durable", "b", "b-durable", "c", "d", "e"]
                .into_iter()
                .map(String::from)
                .collect(),
        };
        for c in &cases {
            assert!(
                KNOWN_CASES.contains(&c.as_str()),
                "unknown case `{c}` in FEDSTAT_BENCH_CASES (known: {})",
                KNOWN_CASES.join(", ")
            );
        }
        if quick {
            Plan {
                quick,
                cases,
                small_rounds: (1, 5),
                large_rounds: (1, 2),
                many_nodes: vec![20],
                rss_nodes: None,
                agg_reps: 2,
                secagg_rounds: (1, 3),
            }
        } else {
            Plan {
                quick,
                cases,
                small_rounds: (2, 30),
                large_rounds: (1, 10),
                many_nodes: vec![20, 30, 50],
                rss_nodes: Some((50, (1, 3))),
                agg_reps: 5,
                secagg_rounds: (2, 20),
            }
        }
    }

    fn has(&self, case: &str) -> bool {
        self.cases.contains(case)
    }

    fn max_nodes(&self) -> usize {
        let mut n = 10;
        if self.has("c") {
            n = n.max(self.many_nodes.iter().copied().max().unwrap_or(0));
        }
        if self.has("d") {
            n = n.max(self.rss_nodes.map_or(0, |(n, _)| n));
        }
        n
    }
}

/// `fedstat-coordinator` and `fedstat-node` of this build, refused when older than the sources
/// (unless `FEDSTAT_BENCH_ALLOW_STALE` is set), or from `FEDSTAT_BENCH_BIN_DIR`, unchecked.
fn locate_bins(root: &Path) -> Bins {
    if let Some(dir) = std::env::var_os("FEDSTAT_BENCH_BIN_DIR") {
        return Bins::in_dir(PathBuf::from(dir)).unwrap_or_else(|e| panic!("FEDSTAT_BENCH_BIN_DIR: {e}"));
    }
    let bins = Bins::of_this_build().unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = bins.check_fresh(root) {
        // Someone editing the tree meanwhile: FEDSTAT_BENCH_ALLOW_STALE=1 runs anyway.
        assert!(std::env::var_os("FEDSTAT_BENCH_ALLOW_STALE").is_some(), "{e}");
        println!("warning: {e}");
    }
    bins
}

/// A CA, the coordinator's certificate, a researcher's and `nodes` nodes'.
fn make_pki(bins: &Bins, pki: &Path, nodes: usize) {
    let made = (|| {
        bins.pki_init(pki, Some("fedstat bench"))?;
        bins.pki_issue(pki, "researcher", "bench")?;
        (0..nodes).try_for_each(|i| bins.pki_issue(pki, "node", &node_name(i)))
    })();
    made.unwrap_or_else(|e| panic!("{e}"));
}

fn node_name(i: usize) -> String {
    format!("node-{i:02}")
}

/// One running federation: coordinator, nodes, and a connected researcher.
struct Federation {
    coordinator: Proc,
    nodes: Vec<Proc>,
    client: Client,
}

impl Federation {
    async fn start(bins: &Bins, pki: &Path, work: &Path, n: usize, store: Store) -> Federation {
        std::fs::create_dir_all(work).expect("cannot create the case folder");
        let (coordinator, nodes, rcfg) =
            launch(bins, pki, work, n, store).unwrap_or_else(|e| panic!("{e} (logs in {})", work.display()));
        let rcfg = ResearcherConfig::load(&rcfg).expect("researcher config");
        let client = Client::connect(&rcfg)
            .await
            .expect("cannot connect to the coordinator");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client.nodes().await.expect("nodes request").len();
            if up == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {up} of {n} nodes connected within 60 s (logs in {})",
                work.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Federation {
            coordinator,
            nodes,
            client,
        }
    }

    async fn stop(self) {
        self.client.close().await;
        harness::stop_all(self.nodes, Duration::from_secs(5));
        harness::stop_all(vec![self.coordinator], Duration::from_secs(5));
    }
}

/// Write the configs and start the coordinator and `n` nodes; returns them and the
/// researcher's config.
fn launch(
    bins: &Bins,
    pki: &Path,
    work: &Path,
    n: usize,
    store: Store,
) -> fedstat_coordinator::Result<(Proc, Vec<Proc>, PathBuf)> {
    let ca = pki.join("ca.pem");
    let tls = |name: &str| harness::tls_section(pki, &ca, name);
    let opts = match store {
        Store::InMemory => CoordinatorOptions {
            durable: Some(false),
            ..CoordinatorOptions::default()
        },
        // Relative to the config file: `work/data`, on the same disk as the temporary folder.
        Store::Durable => CoordinatorOptions {
            durable: Some(true),
            data_dir: Some("data".into()),
            ..CoordinatorOptions::default()
        },
    };
    let cfg = work.join("coordinator.toml");
    harness::write(&cfg, &harness::coordinator_config(&tls("coordinator"), &opts))?;
    let (coordinator, addr) = bins.spawn_coordinator(&cfg, &work.join("coordinator.log"))?;
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let name = node_name(i);
        let cfg = work.join(format!("{name}.toml"));
        // The benchmark's echo model is far larger than a node allows by default.
        let policy = "[policy]\nmax_params = 100000000\n";
        harness::write(&cfg, &harness::node_config(&addr, &tls(&name), &[], policy))?;
        nodes.push(bins.spawn_node(&name, &cfg, &work.join(format!("{name}.log")), None)?);
    }
    let rcfg = work.join("researcher.toml");
    harness::write(&rcfg, &harness::researcher_config(&addr, &tls("bench")))?;
    Ok((coordinator, nodes, rcfg))
}

/// What one experiment measured.
#[derive(Debug, Default)]
struct Rounds {
    /// `RoundRecord.round_ms` of the measured rounds.
    round_ms: Vec<f64>,
    /// `RoundRecord.train_ms` of the measured rounds.
    train_ms: Vec<f64>,
    /// Mean wall time per measured round, from the researcher's polling.
    wall_ms_per_round: f64,
    /// CPU time (user + system) per measured round: the coordinator's, the nodes' summed.
    /// Unlike wall time it hardly moves when other work shares the machine.
    cpu_ms_per_round: (f64, f64),
    measured: u32,
    /// `RoundRecord.round` of the measured rounds.
    kept: Vec<u32>,
    /// The experiment's event log (case s reads the secure exchanges' times from it).
    events: Vec<EventRecord>,
}

/// CPU time (user + system) of processes, in ms, from `/proc/PID/stat`.
fn cpu_ms(pids: &[u32]) -> f64 {
    // Ticks of 1/100 s (USER_HZ) on Linux.
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            // Fields after the parenthesised command: state is 3rd, utime 14th, stime 15th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) * 10.0
        })
        .sum()
}

async fn run_echo(
    client: &Client,
    pids: (u32, &[u32]),
    nodes: usize,
    params: u64,
    (warmup, measured): (u32, u32),
    secure: bool,
) -> Rounds {
    let cpu = || (cpu_ms(&[pids.0]), cpu_ms(pids.1));
    let mut spec: ExperimentSpec = toml::from_str(ECHO_EXPERIMENT).expect("configs/experiment-echo.toml");
    let total = warmup + measured;
    spec.name = format!("bench {nodes} nodes {params} params");
    spec.rounds = total;
    spec.min_nodes = nodes as u32;
    spec.round_timeout_secs = 600;
    spec.echo = Some(EchoSpec { params });
    spec.secure_aggregation = secure;
    let poll = if params > 100_000 {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(2)
    };
    let id = client.submit(spec).await.expect("submit");
    let mut warm_seen: Option<(u32, Instant)> = None;
    let mut cpu_at_warm = (0.0, 0.0);
    let status = loop {
        let s = client
            .status(Some(id))
            .await
            .expect("status")
            .pop()
            .expect("a status for the submitted experiment");
        let now = Instant::now();
        if warm_seen.is_none() && s.rounds_done >= warmup {
            warm_seen = Some((s.rounds_done, now));
            cpu_at_warm = cpu();
        }
        if s.state.is_finished() {
            break s;
        }
        tokio::time::sleep(poll).await;
    };
    let end = Instant::now();
    let cpu_end = cpu();
    if let ExperimentState::Failed { reason } = &status.state {
        panic!("the experiment failed: {reason}");
    }
    assert_eq!(status.history.len(), total as usize, "rounds recorded");
    for r in &status.history {
        assert_eq!(r.participants.len(), nodes, "round {} used every node", r.round);
    }
    let (from, at) = warm_seen.expect("the warm-up ended before completion");
    let counted = total - from;
    let kept = &status.history[warmup as usize..];
    Rounds {
        round_ms: kept.iter().map(|r| r.round_ms as f64).collect(),
        train_ms: kept.iter().map(|r| r.train_ms as f64).collect(),
        wall_ms_per_round: if counted > 0 {
            (end - at).as_secs_f64() * 1e3 / f64::from(counted)
        } else {
            f64::NAN
        },
        cpu_ms_per_round: if counted > 0 {
            let per = |a: f64, b: f64| (b - a) / f64::from(counted);
            (per(cpu_at_warm.0, cpu_end.0), per(cpu_at_warm.1, cpu_end.1))
        } else {
            (f64::NAN, f64::NAN)
        },
        measured,
        kept: kept.iter().map(|r| r.round).collect(),
        events: status.events.clone(),
    }
}

/// Memory of a process in KiB: (VmRSS, VmHWM).
fn mem_kib(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Samples the nodes' summed RSS every 50 ms until dropped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(pids.iter().map(|&p| mem_kib(p).0).sum::<u64>());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Peak of the summed RSS, KiB.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Memory {
    coordinator_hwm_kib: u64,
    nodes_hwm_sum_kib: u64,
    nodes_rss_peak_kib: u64,
}

/// Start a federation, run one echo experiment, measure memory, stop everything.
async fn case(
    bins: &Bins,
    pki: &Path,
    work: &Path,
    nodes: usize,
    params: u64,
    rounds: (u32, u32),
    store: Store,
) -> (Rounds, Memory) {
    let label = format!("{nodes} nodes, {params} params, {}", store.label());
    println!("  running {label}: {} warm-up + {} rounds", rounds.0, rounds.1);
    let dir = work.join(format!("n{nodes}-p{params}-{}", store.label()));
    let fed = Federation::start(bins, pki, &dir, nodes, store).await;
    let sampler = RssSampler::start(fed.nodes.iter().map(Proc::pid).collect());
    let node_pids: Vec<u32> = fed.nodes.iter().map(Proc::pid).collect();
    let r = run_echo(
        &fed.client,
        (fed.coordinator.pid(), &node_pids),
        nodes,
        params,
        rounds,
        false,
    )
    .await;
    let nodes_rss_peak_kib = sampler.finish();
    let mem = Memory {
        coordinator_hwm_kib: mem_kib(fed.coordinator.pid()).1,
        nodes_hwm_sum_kib: fed.nodes.iter().map(|p| mem_kib(p.pid()).1).sum(),
        nodes_rss_peak_kib,
    };
    fed.stop().await;
    let (md, lo, hi) = harness::median_range(&r.round_ms);
    println!(
        "    round_ms median {md:.0} ({lo:.0}-{hi:.0}), wall {:.1} ms/round; CPU per round: coordinator {:.0} ms, nodes {:.0} ms; coordinator peak RSS {} MiB, nodes {} MiB",
        r.wall_ms_per_round,
        r.cpu_ms_per_round.0,
        r.cpu_ms_per_round.1,
        mem.coordinator_hwm_kib / 1024,
        mem.nodes_rss_peak_kib / 1024
    );
    (r, mem)
}

fn rounds_json(r: &Rounds) -> Value {
    let (md, lo, hi) = harness::median_range(&r.round_ms);
    let (tmd, _, _) = harness::median_range(&r.train_ms);
    json!({
        "measured_rounds": r.measured,
        "round_ms": { "median": md, "min": lo, "max": hi, "all": r.round_ms },
        "train_ms_median": tmd,
        "wall_ms_per_round_mean": r.wall_ms_per_round,
        "cpu_ms_per_round": { "coordinator": r.cpu_ms_per_round.0, "nodes_sum": r.cpu_ms_per_round.1 },
    })
}

fn mem_json(m: &Memory) -> Value {
    json!({
        "coordinator_peak_rss_mib": m.coordinator_hwm_kib as f64 / 1024.0,
        "nodes_peak_rss_sum_mib": m.nodes_rss_peak_kib as f64 / 1024.0,
        "nodes_hwm_sum_mib": m.nodes_hwm_sum_kib as f64 / 1024.0,
    })
}

/// Deterministic pseudo-random parameters in [-1, 1).
fn update(len: usize, seed: u64, dtype: DType) -> Values {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    };
    match dtype {
        DType::F32 => Values::F32((0..len).map(|_| next() as f32).collect()),
        DType::F64 => Values::F64((0..len).map(|_| next()).collect()),
    }
}

/// Case e: `ExactSum::new` + 10 folds of 10M parameters, GB/s of input bytes.
fn aggregation(dtype: DType, reps: usize) -> Value {
    const UPDATES: usize = 10;
    let len = LARGE as usize;
    let updates: Vec<Values> = (0..UPDATES).map(|i| update(len, i as u64 + 1, dtype)).collect();
    let bytes = (UPDATES * len * dtype.size()) as f64;
    let mut round_gbs = Vec::new();
    let mut warm_gbs = Vec::new();
    let mut average_ms = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut agg = ExactSum::new(dtype, len);
        let mut folds = Vec::with_capacity(UPDATES);
        for u in &updates {
            let f = Instant::now();
            agg.fold(u, 100).expect("fold of a valid update");
            folds.push(f.elapsed().as_secs_f64());
        }
        round_gbs.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        // Folds after the first touch an accumulator whose pages are already mapped.
        let warm: f64 = folds[1..].iter().sum();
        warm_gbs.push(((UPDATES - 1) * len * dtype.size()) as f64 / warm / 1e9);
        let a = Instant::now();
        let avg = agg.average().expect("average");
        average_ms.push(a.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(avg);
    }
    let (md, lo, hi) = harness::median_range(&round_gbs);
    let (wmd, _, _) = harness::median_range(&warm_gbs);
    let (amd, _, _) = harness::median_range(&average_ms);
    println!(
        "  ExactSum {dtype:?}: new + 10 folds {md:.2} GB/s ({lo:.2}-{hi:.2}); folds into a mapped accumulator {wmd:.2} GB/s; average() {amd:.0} ms"
    );
    json!({
        "dtype": format!("{dtype:?}"),
        "updates": UPDATES,
        "params": len,
        "reps": reps,
        "new_plus_folds_gb_per_s": { "median": md, "min": lo, "max": hi },
        "folds_into_mapped_accumulator_gb_per_s_median": wmd,
        "average_ms_median": amd,
    })
}

/// Durable over in-memory, for each case run both ways: medians of `round_ms` and the mean
/// wall time per round, and their ratios.
fn durability(runs: &[Value]) -> Vec<Value> {
    let find = |case: &str| runs.iter().find(|r| r["case"] == case);
    let mut out = Vec::new();
    for (mem, dur) in [("a", "a-durable"), ("b", "b-durable")] {
        let (Some(m), Some(d)) = (find(mem), find(dur)) else {
            continue;
        };
        let median = |r: &Value| r["rounds"]["round_ms"]["median"].as_f64().unwrap_or(f64::NAN);
        let wall = |r: &Value| r["rounds"]["wall_ms_per_round_mean"].as_f64().unwrap_or(f64::NAN);
        out.push(json!({
            "nodes": m["nodes"],
            "params": m["params"],
            "in_memory_round_ms_median": median(m),
            "durable_round_ms_median": median(d),
            "round_ms_ratio": median(d) / median(m),
            "in_memory_wall_ms_per_round": wall(m),
            "durable_wall_ms_per_round": wall(d),
            "wall_ratio": wall(d) / wall(m),
        }));
    }
    out
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0.0, |k| k as f64 / 1024.0 / 1024.0);
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": mem,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "git_commit": git(&["rev-parse", "--short", "HEAD"]),
        "git_dirty": !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "unix_time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# fedstat round benchmark{}\n",
        if report["quick"] == true { " (quick)" } else { "" }
    );
    let m = &report["machine"];
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {:.1} GiB), kernel {}; commit {}{}; unix time {}.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"].as_f64().unwrap_or(0.0),
        m["kernel"].as_str().unwrap_or("?"),
        m["git_commit"].as_str().unwrap_or("?"),
        if m["git_dirty"] == true { " (dirty)" } else { "" },
        m["unix_time"]
    );
    let _ = writeln!(md, "Real processes on loopback, `echo` model, f32; `round_ms` is the coordinator's `RoundRecord.round_ms`. Store: `in-memory` is `durable = false` (like Flower, which keeps no store; cases a-d); `durable` is `durable = true` (SQLite, synchronous writes, every round's model written and fsynced).\n");
    let _ = writeln!(md, "| case | store | nodes | params | rounds | round_ms median (min-max) | wall ms/round (mean) | CPU ms/round coordinator + nodes | coordinator peak RSS | nodes peak RSS (sum) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    if let Some(runs) = report["runs"].as_array() {
        for r in runs {
            let rm = &r["rounds"]["round_ms"];
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.0} + {:.0} | {:.0} MiB | {:.0} MiB |",
                r["case"].as_str().unwrap_or("?"),
                r["store"].as_str().unwrap_or("?"),
                r["nodes"],
                r["params"],
                r["rounds"]["measured_rounds"],
                rm["median"].as_f64().unwrap_or(f64::NAN),
                rm["min"].as_f64().unwrap_or(f64::NAN),
                rm["max"].as_f64().unwrap_or(f64::NAN),
                r["rounds"]["wall_ms_per_round_mean"].as_f64().unwrap_or(f64::NAN),
                r["rounds"]["cpu_ms_per_round"]["coordinator"].as_f64().unwrap_or(f64::NAN),
                r["rounds"]["cpu_ms_per_round"]["nodes_sum"].as_f64().unwrap_or(f64::NAN),
                r["memory"]["coordinator_peak_rss_mib"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                r["memory"]["nodes_peak_rss_sum_mib"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    if let Some(ds) = report["durability"].as_array().filter(|d| !d.is_empty()) {
        let _ = writeln!(md, "\n| cost of the durable store, 10 nodes | in-memory round_ms | durable round_ms | ratio | in-memory wall ms/round | durable wall ms/round | ratio |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for d in ds {
            let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| {} params | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} |",
                d["params"],
                f("in_memory_round_ms_median"),
                f("durable_round_ms_median"),
                f("round_ms_ratio"),
                f("in_memory_wall_ms_per_round"),
                f("durable_wall_ms_per_round"),
                f("wall_ratio"),
            );
        }
    }
    if let Some(aggs) = report["aggregation"].as_array() {
        let _ = writeln!(md, "\n| e. ExactSum, 10 updates x 10M params | new + 10 folds GB/s, median (min-max) | folds into mapped accumulator GB/s | average() ms |");
        let _ = writeln!(md, "|---|---|---|---|");
        for a in aggs {
            let g = &a["new_plus_folds_gb_per_s"];
            let _ = writeln!(
                md,
                "| {} | {:.2} ({:.2}-{:.2}) | {:.2} | {:.0} |",
                a["dtype"].as_str().unwrap_or("?"),
                g["median"].as_f64().unwrap_or(f64::NAN),
                g["min"].as_f64().unwrap_or(f64::NAN),
                g["max"].as_f64().unwrap_or(f64::NAN),
                a["folds_into_mapped_accumulator_gb_per_s_median"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                a["average_ms_median"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    md
}

fn main() {
    let plan = Plan::from_env();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the coordinator crate sits in the workspace")
        .to_owned();
    let bins = locate_bins(&root);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tmp = tempfile::Builder::new()
        .prefix("fedstat-bench-")
        .tempdir()
        .expect("cannot create a temporary folder");
    let work = tmp.path().to_owned();
    println!(
        "fedstat round bench{}: binaries from {}, work folder {}",
        if plan.quick { " (quick)" } else { "" },
        bins.dir().display(),
        work.display()
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    let federated = plan.cases.iter().any(|c| c != "e");
    let out = std::env::var_os("FEDSTAT_BENCH_OUT").map_or_else(|| root.join("bench-results"), PathBuf::from);
    rt.block_on(async {
        if !federated {
            return;
        }
        let pki = work.join("pki");
        make_pki(&bins, &pki, plan.max_nodes());
        if plan.has("s") {
            secagg::run(&bins, &pki, &work, plan.secagg_rounds, plan.quick, &out).await;
        }
        let mut record = |case: &str, nodes: usize, params: u64, store: Store, (r, m): (Rounds, Memory)| {
            runs.push(json!({
                "case": case, "nodes": nodes, "params": params, "store": store.label(),
                "rounds": rounds_json(&r), "memory": mem_json(&m),
            }));
        };
        // Each durable case runs right after its in-memory twin, so their ratio is measured
        // under the same background load.
        let pairs = [
            ("a", "a-durable", SMALL, plan.small_rounds),
            ("b", "b-durable", LARGE, plan.large_rounds),
        ];
        for (name, durable, params, rounds) in pairs {
            // d's coordinator RSS at 10 nodes is b's.
            if plan.has(name) || (name == "b" && plan.has("d")) {
                let r = case(&bins, &pki, &work, 10, params, rounds, Store::InMemory).await;
                record(name, 10, params, Store::InMemory, r);
            }
            if plan.has(durable) {
                let r = case(&bins, &pki, &work, 10, params, rounds, Store::Durable).await;
                record(durable, 10, params, Store::Durable, r);
            }
        }
        if plan.has("c") {
            for &n in &plan.many_nodes {
                let r = case(&bins, &pki, &work, n, SMALL, plan.small_rounds, Store::InMemory).await;
                record("c", n, SMALL, Store::InMemory, r);
            }
        }
        if plan.has("d") {
            if let Some((n, rounds)) = plan.rss_nodes {
                let r = case(&bins, &pki, &work, n, LARGE, rounds, Store::InMemory).await;
                record("d", n, LARGE, Store::InMemory, r);
            }
        }
    });
    let mut aggregation_runs = Vec::new();
    if plan.has("e") {
        for dtype in [DType::F32, DType::F64] {
            aggregation_runs.push(aggregation(dtype, plan.agg_reps));
        }
    }
    if runs.is_empty() && aggregation_runs.is_empty() {
        // Case s alone: it wrote its own report; keep round.{json,md} as they are.
        return;
    }
    let durability = durability(&runs);
    let report = json!({
        "bench": "round",
        "quick": plan.quick,
        "machine": machine(),
        "task": "echo model (global params + seeded change, weight 100), real processes on 127.0.0.1",
        "runs": runs,
        "aggregation": aggregation_runs,
        "durability": durability,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::create_dir_all(&out).expect("cannot create bench-results/");
    let stem = if plan.quick { "round-quick" } else { "round" };
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
