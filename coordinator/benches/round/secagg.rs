//! Case s of the round benchmark: what secure aggregation costs a round. The same federation
//! (10 nodes, `echo` with 1,000,000 f32 parameters, `min_nodes = 10`, in-memory coordinator)
//! runs one experiment with `secure_aggregation = false` and then one with `= true`, each
//! after its own warm-up, on a fresh federation; the ratio of their medians is the cost.
//!
//! Besides `round_ms` and the wall time per round (see the parent's header), it records:
//! - bytes per node and round: the answer's payload (`answer_bytes` of the node's `done` log
//!   line: 4 B per f32 value in clear, 16 B per ring element when masked) and what the node
//!   put on the wire, from the QUIC `udp_tx.bytes` counter the same line carries
//!   (`sent_bytes`): its growth from the end of the warm-up to the last round, divided by the
//!   rounds; it includes the keys, shares and reveals of secure steps, QUIC framing and the
//!   acknowledgements of the model download. The download itself is the global model (4 B per
//!   parameter) in both modes;
//! - the secure exchanges' times, from the coordinator's event log: the round starts, then
//!   every node's keys have arrived (the roster goes out), their shares (forwarded), their
//!   masked answers (the unmask request goes out), their reveals. The event times are taken
//!   when the last message of an exchange arrives, so `round_ms` (and the last exchange) leave
//!   out the coordinator's unmasking itself; the wall time per round includes it;
//! - an in-process microbenchmark of the pure costs (nothing else of the bench running;
//!   `fedstat_secagg` expands masks on up to 4 threads, as in the node): encoding an
//!   answer in the ring, a node's masking, the coordinator's folding and unmasking.
//!
//! The comparison with Flower's SecAgg+ is measured in one sitting: with
//! `FEDSTAT_BENCH_FLOWER="shell command"` the bench runs our pair, then the command (e.g.
//! `RESULTS=/tmp/flower-secagg VENV=/work/flower-venv ../shared/bench/flower/run_secagg.sh`),
//! then our pair again, so Flower's runs are bracketed by ours; `FEDSTAT_BENCH_FLOWER_RESULTS=DIR`
//! names the folder of Flower's `summary-sa-*.json` to report (also without a command, to
//! report an earlier sitting's). Results: `bench-results/secagg.{json,md}`
//! (`secagg-quick.*` in quick mode).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use fedstat_coordinator::harness::{self, Bins};
use fedstat_core::aggregate::{self, AggregatorKind, Values};
use fedstat_proto::secure::{Ring, SecureRound};
use fedstat_proto::wire::{DType, EventRecord, Phase};
use fedstat_secagg::{Client as MaskClient, Context, Server as MaskServer};
use serde_json::{json, Value};

use super::{mem_kib, run_echo, Federation, Store};

/// Case s's federation: 10 nodes, 1M f32 parameters.
const NODES: usize = 10;
const PARAMS: u64 = 1_000_000;
/// The coordinator waits for every node (`min_nodes = 10`), so the Shamir threshold is 10 too.
const THRESHOLD: u32 = 10;

/// Run case s (both passes when a Flower command is given) and write its report.
pub(super) async fn run(bins: &Bins, pki: &Path, work: &Path, rounds: (u32, u32), quick: bool, out: &Path) {
    let started = Instant::now();
    let flower_cmd = std::env::var("FEDSTAT_BENCH_FLOWER")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let flower_dir = std::env::var_os("FEDSTAT_BENCH_FLOWER_RESULTS");
    let mut passes = vec![pass(bins, pki, work, rounds, 1).await];
    let mut flower_run = Value::Null;
    if let Some(cmd) = &flower_cmd {
        println!("  running Flower between our passes: {cmd}");
        let t = Instant::now();
        let status = Command::new("sh").arg("-c").arg(cmd).status();
        let ok = status.as_ref().is_ok_and(std::process::ExitStatus::success);
        if !ok {
            println!("  warning: the Flower command failed: {status:?}");
        }
        flower_run = json!({ "command": cmd, "ok": ok, "seconds": t.elapsed().as_secs_f64() });
        passes.push(pass(bins, pki, work, rounds, 2).await);
    }
    let flower = flower_dir.map_or(Value::Null, |d| flower_summaries(Path::new(&d)));
    let micro = micro(if quick { 1 } else { 3 });
    let report = json!({
        "bench": "secagg",
        "quick": quick,
        "machine": super::machine(),
        "task": "echo model (global params + seeded change, weight 100), 10 nodes, 1,000,000 f32 params, min_nodes = 10, in-memory coordinator, real processes on 127.0.0.1",
        "rounds": { "warmup": rounds.0, "measured": rounds.1 },
        "passes": passes,
        "flower_run": flower_run,
        "flower": flower,
        "micro": micro,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::create_dir_all(out).expect("cannot create bench-results/");
    let stem = if quick { "secagg-quick" } else { "secagg" };
    let text = serde_json::to_string_pretty(&report).expect("the report serialises");
    harness::write(&out.join(format!("{stem}.json")), &text).expect("cannot write the results");
    let md = markdown(&report);
    harness::write(&out.join(format!("{stem}.md")), &md).expect("cannot write the results");
    println!("\n{md}");
    println!("written to {}.{{json,md}}", out.join(stem).display());
}

/// Plain, then secure, each on a fresh federation.
async fn pass(bins: &Bins, pki: &Path, work: &Path, rounds: (u32, u32), n: u32) -> Value {
    let plain = one(bins, pki, work, rounds, false, n).await;
    let secure = one(bins, pki, work, rounds, true, n).await;
    let ratio = |key: &str| {
        secure[key]["median"].as_f64().unwrap_or(f64::NAN) / plain[key]["median"].as_f64().unwrap_or(f64::NAN)
    };
    let wall = |r: &Value| r["wall_ms_per_round_mean"].as_f64().unwrap_or(f64::NAN);
    json!({
        "pass": n,
        "plain": plain,
        "secure": secure,
        "round_ms_ratio": ratio("round_ms"),
        "wall_ratio": wall(&secure) / wall(&plain),
    })
}

/// One experiment on a fresh federation.
async fn one(bins: &Bins, pki: &Path, work: &Path, rounds: (u32, u32), secure: bool, pass: u32) -> Value {
    let mode = if secure { "secure" } else { "plain" };
    println!(
        "  case s, pass {pass}, {mode}: {NODES} nodes, {PARAMS} params, {} warm-up + {} rounds",
        rounds.0, rounds.1
    );
    let dir = work.join(format!("s{pass}-{mode}"));
    let load_before = loadavg();
    let fed = Federation::start(bins, pki, &dir, NODES, Store::InMemory).await;
    let node_pids: Vec<u32> = fed.nodes.iter().map(|p| p.pid()).collect();
    let r = run_echo(
        &fed.client,
        (fed.coordinator.pid(), &node_pids),
        NODES,
        PARAMS,
        rounds,
        secure,
    )
    .await;
    let coordinator_hwm_kib = mem_kib(fed.coordinator.pid()).1;
    let nodes_hwm_kib: Vec<u64> = node_pids.iter().map(|&p| mem_kib(p).1).collect();
    let logs: Vec<String> = fed.nodes.iter().map(|p| p.log_text()).collect();
    fed.stop().await;
    let load_after = loadavg();
    let bytes: Vec<(f64, f64)> = logs.iter().filter_map(|l| node_bytes(l, &r.kept)).collect();
    assert_eq!(
        bytes.len(),
        NODES,
        "every node logged its answers (logs in {})",
        dir.display()
    );
    let answer: Vec<f64> = bytes.iter().map(|b| b.0).collect();
    let wire: Vec<f64> = bytes.iter().map(|b| b.1).collect();
    let exchanges = exchanges(&r.events, &r.kept);
    let (md, lo, hi) = harness::median_range(&r.round_ms);
    let (wmd, _, _) = harness::median_range(&wire);
    println!(
        "    round_ms median {md:.0} ({lo:.0}-{hi:.0}), wall {:.0} ms/round; CPU per round: coordinator {:.0} ms, nodes {:.0} ms; per node and round: answer {:.1} MB, on the wire {:.1} MB; coordinator peak RSS {} MiB",
        r.wall_ms_per_round,
        r.cpu_ms_per_round.0,
        r.cpu_ms_per_round.1,
        answer.first().copied().unwrap_or(f64::NAN) / 1e6,
        wmd / 1e6,
        coordinator_hwm_kib / 1024
    );
    json!({
        "mode": mode,
        "nodes": NODES,
        "params": PARAMS,
        "measured_rounds": r.measured,
        "round_ms": stats(&r.round_ms),
        "train_ms": stats(&r.train_ms),
        "wall_ms_per_round_mean": r.wall_ms_per_round,
        "cpu_ms_per_round": { "coordinator": r.cpu_ms_per_round.0, "nodes_sum": r.cpu_ms_per_round.1 },
        "answer_bytes_per_node": stats(&answer),
        "udp_tx_bytes_per_node_round": stats(&wire),
        "exchanges_ms": exchanges,
        "coordinator_peak_rss_mib": coordinator_hwm_kib as f64 / 1024.0,
        "loadavg_1min": { "start": load_before, "end": load_after },
        "node_peak_rss_mib": stats(&nodes_hwm_kib.iter().map(|&k| k as f64 / 1024.0).collect::<Vec<_>>()),
    })
}

/// The 1-minute load average: how busy the shared machine was around a run.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn stats(xs: &[f64]) -> Value {
    let (md, lo, hi) = harness::median_range(xs);
    json!({ "median": md, "min": lo, "max": hi, "all": xs })
}

/// `key=DIGITS` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// From a node's log: its answer's payload bytes and its `udp_tx.bytes` growth per round over
/// the measured rounds `kept` (from the `done` line of the round before the first kept one).
fn node_bytes(log: &str, kept: &[u32]) -> Option<(f64, f64)> {
    let mut by_round: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains(" done (") && l.contains("sent_bytes="))
    {
        let (Some(round), Some(answer), Some(sent)) = (
            field(line, "round"),
            field(line, "answer_bytes"),
            field(line, "sent_bytes"),
        ) else {
            continue;
        };
        by_round.insert(u32::try_from(round).ok()?, (answer, sent));
    }
    let (first, last) = (*kept.first()?, *kept.last()?);
    let before = by_round.get(&first.checked_sub(1)?)?.1;
    let (answer, end) = *by_round.get(&last)?;
    Some((answer as f64, (end - before) as f64 / f64::from(last - first + 1)))
}

/// When each exchange of a round ended, ms after the round's start, median over the measured
/// rounds: `keys`, `shares`, `masked`, `reveals` (secure) and `aggregated` (both modes; for a
/// secure round the time the last reveal arrived, before the unmasking).
fn exchanges(events: &[EventRecord], kept: &[u32]) -> Value {
    const MARKS: [(&str, &str); 5] = [
        ("keys", "secure aggregation share exchange"),
        ("shares", "secure aggregation masked answers"),
        ("masked", "secure aggregation unmasking"),
        ("reveals", "unmasked the sum"),
        ("aggregated", "aggregated"),
    ];
    let mut offsets: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for &r in kept {
        let prefix = format!("round {r}: ");
        let of_round: Vec<&EventRecord> = events.iter().filter(|e| e.message.starts_with(&prefix)).collect();
        let Some(start) = of_round.iter().find(|e| e.message.contains(" started ")) else {
            continue;
        };
        for (name, text) in MARKS {
            // The last one: a retried step logs its exchanges again.
            if let Some(e) = of_round.iter().rev().find(|e| e.message.contains(text)) {
                offsets
                    .entry(name)
                    .or_default()
                    .push(e.at_ms.saturating_sub(start.at_ms) as f64);
            }
        }
    }
    let mut out = serde_json::Map::new();
    for (name, _) in MARKS {
        if let Some(xs) = offsets.get(name) {
            out.insert(name.to_owned(), json!(harness::median_range(xs).0));
        }
    }
    Value::Object(out)
}

/// Flower's `summary-sa-*.json` of `run_secagg.sh`, and the ratios of its SecAgg+ medians.
fn flower_summaries(dir: &Path) -> Value {
    let mut runs = serde_json::Map::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        println!("  warning: no Flower results in {}", dir.display());
        return Value::Null;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(tag) = name
            .strip_prefix("summary-sa-")
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Some(v) = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        else {
            continue;
        };
        // `plain-c10-p1000000` -> `plain`, `secagg5-...` -> `secagg5`.
        let kind = tag.split('-').next().unwrap_or(tag).to_owned();
        runs.insert(
            kind,
            json!({
                "tag": v["tag"], "params": v["params"], "rounds": v["rounds"],
                "warmup_excluded": v["warmup_excluded"],
                "round_s": { "median": v["round_s_median"], "min": v["round_s_min"], "max": v["round_s_max"] },
                "round_seconds": v["round_seconds"],
                "secagg_params": v.get("secagg_params").cloned().unwrap_or(Value::Null),
            }),
        );
    }
    let median = |k: &str| runs.get(k).and_then(|r| r["round_s"]["median"].as_f64());
    let mut ratios = serde_json::Map::new();
    for sec in ["secagg5", "secagg10"] {
        for base in ["plain", "legacy"] {
            if let (Some(s), Some(b)) = (median(sec), median(base)) {
                ratios.insert(format!("{sec}_over_{base}"), json!(s / b));
            }
        }
    }
    json!({ "dir": dir.display().to_string(), "runs": runs, "ratios": ratios })
}

/// Deterministic bytes (a xorshift), for ring elements that are not an encoded answer.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The pure costs of one secure step, in process, one member at a time: encoding, each stage of
/// `fedstat_secagg` for `NODES` members and no drop-out, and decoding the sum. Median ms over
/// `reps`, for the ring the engine uses (Z128) and for Z64.
fn micro(reps: usize) -> Value {
    let len = PARAMS as usize;
    let values = Values::F32(
        noise(len * 4, 7)
            .chunks_exact(4)
            .map(|c| f32::from(c[0]) / 256.0 - 0.5)
            .collect(),
    );
    let kind = AggregatorKind::of_phase(Phase::Train);
    let mut encode = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let enc = aggregate::encode_ring(kind, &values, 100, &[0.5]).expect("encode_ring");
        encode.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let pooled =
            aggregate::pooled_from_ring(kind, DType::F32, len, 1, &enc, 1).expect("pooled_from_ring");
        decode.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(pooled);
    }
    let ms = |xs: &[f64]| harness::median_range(xs).0;
    println!(
        "  in process: encode_ring of {len} f32 {:.1} ms, pooled_from_ring {:.1} ms",
        ms(&encode),
        ms(&decode)
    );
    let rings: Vec<Value> = [Ring::Z128, Ring::Z64]
        .into_iter()
        .map(|ring| secagg_step(ring, len + 2, reps))
        .collect();
    json!({
        "params": len,
        "reps": reps,
        "encode_ring_ms": ms(&encode),
        "pooled_from_ring_ms": ms(&decode),
        "secagg": rings,
    })
}

/// One step of `fedstat_secagg` with `NODES` members, `len` ring elements each; median ms of
/// each stage (a node's: median over the nodes; the coordinator's: the whole stage).
fn secagg_step(ring: Ring, len: usize, reps: usize) -> Value {
    let names: Vec<String> = (0..NODES).map(super::node_name).collect();
    let ctx = Context {
        at: SecureRound {
            experiment: 1,
            round: 1,
            phase: Phase::Train,
            attempt: 0,
        },
        ring,
        len: len as u64,
        threshold: THRESHOLD,
    };
    let inputs: Vec<Vec<u8>> = (0..NODES)
        .map(|i| noise(len * ring.width(), i as u64 + 1))
        .collect();
    let mut t: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    fn lap(t: &mut BTreeMap<&'static str, Vec<f64>>, name: &'static str, since: Instant) {
        t.entry(name)
            .or_default()
            .push(since.elapsed().as_secs_f64() * 1e3);
    }
    for _ in 0..reps {
        let mut clients = Vec::new();
        let mut roster = Vec::new();
        for n in &names {
            let s = Instant::now();
            let (c, keys) = MaskClient::new(ctx, n);
            lap(&mut t, "node_keys", s);
            clients.push(c);
            roster.push((n.clone(), keys));
        }
        let mut server = MaskServer::new(ctx, roster.clone()).expect("server");
        let mut inbox: BTreeMap<String, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        for (c, n) in clients.iter_mut().zip(&names) {
            let s = Instant::now();
            let sealed = c.share_keys(THRESHOLD, &roster).expect("share_keys");
            lap(&mut t, "node_share_keys", s);
            server.shared(n).expect("shared");
            for (to, ct) in sealed {
                inbox.entry(to).or_default().push((n.clone(), ct));
            }
        }
        let mut fold = 0.0;
        for ((c, n), input) in clients.iter_mut().zip(&names).zip(&inputs) {
            let received = inbox.remove(n).unwrap_or_default();
            let s = Instant::now();
            let masked = c.masked_input(&received, input).expect("masked_input");
            lap(&mut t, "node_mask", s);
            let s = Instant::now();
            server.add_masked(n, &masked).expect("add_masked");
            fold += s.elapsed().as_secs_f64() * 1e3;
        }
        t.entry("coordinator_add_masked_all").or_default().push(fold);
        let (survivors, dropped) = server.unmask_sets();
        let s = Instant::now();
        for (c, n) in clients.iter_mut().zip(&names) {
            let shares = c.unmask(&survivors, &dropped).expect("unmask");
            server.add_reveal(n, shares).expect("add_reveal");
        }
        lap(&mut t, "reveals_all", s);
        let s = Instant::now();
        let sum = server.finish().expect("finish");
        lap(&mut t, "coordinator_finish", s);
        std::hint::black_box(sum);
    }
    let mut out = serde_json::Map::new();
    out.insert("ring".into(), json!(format!("{ring:?}")));
    out.insert("len".into(), json!(len));
    for (k, xs) in &t {
        out.insert(format!("{k}_ms"), json!(harness::median_range(xs).0));
    }
    let f = |k: &str| out.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!(
        "  in process, {ring:?}, {len} elements, {NODES} members: a node's masking {:.0} ms, the coordinator's folds {:.0} ms and unmasking {:.0} ms",
        f("node_mask_ms"),
        f("coordinator_add_masked_all_ms"),
        f("coordinator_finish_ms")
    );
    Value::Object(out)
}

fn markdown(report: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Secure aggregation: round time against plain{}\n",
        if report["quick"] == true { " (quick)" } else { "" }
    );
    let m = &report["machine"];
    let _ = writeln!(
        md,
        "Machine: {} ({} cores), kernel {}; commit {}{}; unix time {}.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
        m["git_commit"].as_str().unwrap_or("?"),
        if m["git_dirty"] == true { " (dirty)" } else { "" },
        m["unix_time"]
    );
    let _ = writeln!(
        md,
        "Task: {}; {} warm-up + {} measured rounds per run. `round_ms` is the coordinator's `RoundRecord.round_ms` (it ends when the last message of the round arrives, so it leaves out the final fold or unmasking); wall ms/round is the researcher's mean wall time per round (it includes them, and the start of the next round).\n",
        report["task"].as_str().unwrap_or("?"),
        report["rounds"]["warmup"],
        report["rounds"]["measured"]
    );
    let _ = writeln!(md, "| pass | mode | round_ms median (min-max) | wall ms/round | CPU ms/round coordinator + nodes | answer bytes/node | on the wire bytes/node/round | coordinator peak RSS | load (1 min) before, after |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let passes = report["passes"].as_array().cloned().unwrap_or_default();
    for p in &passes {
        for mode in ["plain", "secure"] {
            let r = &p[mode];
            let _ = writeln!(
                md,
                "| {} | {mode} | {:.0} ({:.0}-{:.0}) | {:.0} | {:.0} + {:.0} | {:.0} | {:.0} | {:.0} MiB | {:.1}, {:.1} |",
                p["pass"],
                f(&r["round_ms"]["median"]),
                f(&r["round_ms"]["min"]),
                f(&r["round_ms"]["max"]),
                f(&r["wall_ms_per_round_mean"]),
                f(&r["cpu_ms_per_round"]["coordinator"]),
                f(&r["cpu_ms_per_round"]["nodes_sum"]),
                f(&r["answer_bytes_per_node"]["median"]),
                f(&r["udp_tx_bytes_per_node_round"]["median"]),
                f(&r["coordinator_peak_rss_mib"]),
                f(&r["loadavg_1min"]["start"]),
                f(&r["loadavg_1min"]["end"]),
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| pass | secure / plain, round_ms medians | secure / plain, wall ms/round |"
    );
    let _ = writeln!(md, "|---|---|---|");
    for p in &passes {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} |",
            p["pass"],
            f(&p["round_ms_ratio"]),
            f(&p["wall_ratio"])
        );
    }
    let _ = writeln!(md, "\nWhen each exchange of a secure round ended (coordinator's event log, ms after the round's start, median of the measured rounds): keys in (roster out), shares in (forwarded), masked answers in (unmask request out), reveals in (unmasking starts).\n");
    let _ = writeln!(
        md,
        "| pass | mode | keys | shares | masked | reveals | aggregated |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for p in &passes {
        for mode in ["plain", "secure"] {
            let e = &p[mode]["exchanges_ms"];
            let cell = |k: &str| {
                e.get(k)
                    .and_then(Value::as_f64)
                    .map_or("-".to_owned(), |x| format!("{x:.0}"))
            };
            let _ = writeln!(
                md,
                "| {} | {mode} | {} | {} | {} | {} | {} |",
                p["pass"],
                cell("keys"),
                cell("shares"),
                cell("masked"),
                cell("reveals"),
                cell("aggregated")
            );
        }
    }
    let mi = &report["micro"];
    let _ = writeln!(
        md,
        "\nIn process, one member at a time (mask expansion on up to 4 threads, as in the node), {} params: `encode_ring` {:.1} ms, `pooled_from_ring` {:.1} ms.\n",
        mi["params"],
        f(&mi["encode_ring_ms"]),
        f(&mi["pooled_from_ring_ms"])
    );
    let _ = writeln!(md, "| fedstat_secagg, 10 members, no drop-out | ring elements | a node's keys | a node's shares | a node's masking | coordinator: 10 folds | 10 reveals | coordinator: unmasking |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for s in mi["secagg"].as_array().cloned().unwrap_or_default() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.1} ms | {:.0} ms |",
            s["ring"].as_str().unwrap_or("?"),
            s["len"],
            f(&s["node_keys_ms"]),
            f(&s["node_share_keys_ms"]),
            f(&s["node_mask_ms"]),
            f(&s["coordinator_add_masked_all_ms"]),
            f(&s["reveals_all_ms"]),
            f(&s["coordinator_finish_ms"]),
        );
    }
    let fr = &report["flower_run"];
    if fr["ok"] == false {
        let _ = writeln!(
            md,
            "\nThe Flower command between our passes failed after {:.0} s: `{}`.",
            f(&fr["seconds"]),
            fr["command"].as_str().unwrap_or("?")
        );
    }
    let fl = &report["flower"];
    if let Some(runs) = fl["runs"].as_object().filter(|r| !r.is_empty()) {
        let _ = writeln!(md, "\nFlower 1.42 (`shared/bench/flower/run_secagg.sh`, results in {}), 10 clients, median (min-max) round seconds after the warm-up:\n", fl["dir"].as_str().unwrap_or("?"));
        let _ = writeln!(md, "| Flower run | rounds (warm-up) | round s median (min-max) |");
        let _ = writeln!(md, "|---|---|---|");
        for (k, r) in runs {
            let _ = writeln!(
                md,
                "| {k} | {} ({}) | {:.1} ({:.1}-{:.1}) |",
                r["rounds"],
                r["warmup_excluded"],
                f(&r["round_s"]["median"]),
                f(&r["round_s"]["min"]),
                f(&r["round_s"]["max"])
            );
        }
        if let Some(ratios) = fl["ratios"].as_object() {
            let _ = writeln!(md, "\n| Flower ratio | value |");
            let _ = writeln!(md, "|---|---|");
            for (k, v) in ratios {
                let _ = writeln!(md, "| {k} | {:.2} |", f(v));
            }
        }
    }
    md
}
