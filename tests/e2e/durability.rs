//! Durability and fault tolerance: coordinator crashes, nodes cut off, unusable stores.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{bin, demo_data, events, logit_experiment, wait_until, Fed, SLOW_TRAINING_POLICY};

const NODES: [&str; 3] = ["midwest", "south", "west"];

fn federation() -> Fed {
    let mut fed = Fed::start();
    fed.node_policy.push_str(SLOW_TRAINING_POLICY);
    // The crash test's echo model is large on purpose (long aggregation and model writes).
    fed.node_policy.push_str("max_params = 2000000\n");
    for n in NODES {
        fed.add_node(n, &[("cps1988", demo_data(n))]);
    }
    fed.wait_for_nodes(&NODES);
    fed
}

/// Small xorshift so the kill points are random but the seed is printed and replayable.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn results_bytes(fed: &Fed, id: u64, round: Option<u32>) -> Vec<u8> {
    let out = fed.path(&format!("results-{id}-{round:?}"));
    let mut args = vec![
        "results".to_owned(),
        id.to_string(),
        "--out".to_owned(),
        out.display().to_string(),
    ];
    if let Some(r) = round {
        args.extend(["--round".to_owned(), r.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = fed.cli(&args);
    assert!(
        r.status.success(),
        "results {round:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::read(out.join("parameters.bin")).expect("parameters.bin")
}

/// Run `toml` to completion on a fresh federation, SIGKILLing the coordinator `kills` times at
/// random moments; returns the final parameters and the federation.
fn run(toml: &str, rounds: u32, kills: usize, seed: u64) -> (Vec<u8>, Fed) {
    let mut fed = federation();
    let id = fed.submit("exp.toml", toml);
    let mut rng = seed;
    let started = Instant::now();
    let mut hits = 0;
    for k in 0..kills {
        // Spread the kills over the run: wait for a random moment after a random round began.
        let span = (rounds / (kills as u32 + 1)).max(1);
        let target = k as u32 * span + (next(&mut rng) % u64::from(span)) as u32;
        wait_until(
            Duration::from_secs(120),
            "the run to reach the kill point",
            || fed.status(id)["rounds_done"].as_u64().unwrap_or(0) >= u64::from(target),
        );
        std::thread::sleep(Duration::from_millis(next(&mut rng) % 250));
        let s = fed.status(id);
        let done = s["rounds_done"].as_u64().unwrap_or(0);
        let running = s["state"] != "Completed";
        hits += usize::from(running);
        eprintln!(
            "kill {k}: SIGKILL the coordinator after {done} rounds ({:?} in{})",
            started.elapsed(),
            if running { "" } else { ", already completed" }
        );
        fed.crash_and_restart_coordinator();
    }
    let s = fed.wait_finished(id, Duration::from_secs(180));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let history = s["history"].as_array().expect("history");
    let numbers: Vec<u64> = history.iter().filter_map(|r| r["round"].as_u64()).collect();
    assert_eq!(
        numbers,
        (1..=u64::from(rounds)).collect::<Vec<_>>(),
        "every round once, in order"
    );
    for r in history {
        assert_eq!(r["participants"], serde_json::json!(NODES), "{r}");
    }
    if kills > 0 {
        assert!(
            hits > 0,
            "every kill came after the run completed: make the run longer"
        );
        assert!(
            events(&s).contains("coordinator restarted: resuming after round"),
            "{}",
            events(&s)
        );
    }
    // Every completed round's model is in the store.
    for k in 1..=rounds {
        assert!(!results_bytes(&fed, id, Some(k)).is_empty());
    }
    (results_bytes(&fed, id, None), fed)
}

/// A coordinator killed with SIGKILL at random points (during training, aggregation, evaluation
/// and store writes) resumes by itself, and the final model is bit-identical to an
/// uninterrupted run's.
#[test]
fn coordinator_crashes_leave_the_final_model_bit_identical() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 | 1)
        .unwrap_or(0x9e37_79b9);
    eprintln!("kill-point seed {seed}");
    // Slow enough local training that kills land inside rounds; min_nodes = 3 so that every
    // round has the same participants in both runs.
    let rounds = 8;
    let toml = logit_experiment(rounds, 3, "local_epochs = 400").replace("batch_size = 32", "batch_size = 1");
    let (want, _) = run(&toml, rounds, 0, seed);
    let (got, fed) = run(&toml, rounds, 3, seed);
    assert_eq!(
        got, want,
        "the interrupted run's final model differs (seed {seed})"
    );

    // A large model makes the aggregation and the 8 MB model writes long enough to be hit.
    let echo = "name = \"echo\"\nmodel = \"echo\"\nrounds = 30\nmin_nodes = 3\nround_timeout_secs = 20\n\
                [echo]\nparams = 2000000\n";
    let (want, _) = run(echo, 30, 0, seed);
    let (got, _) = run(echo, 30, 2, seed ^ 0x5555);
    assert_eq!(
        got, want,
        "the interrupted echo run's final model differs (seed {seed})"
    );
    drop(fed);
}

/// A node cut off in the middle of a round: the round completes on quorum at its deadline, and
/// the node, started again, takes part in a later round.
#[test]
fn a_node_cut_off_mid_round_rejoins_a_later_round() {
    let mut fed = federation();
    // Retries absorb rounds that miss the deadline on a loaded machine.
    let toml = logit_experiment(8, 2, "local_epochs = 1000")
        .replace("batch_size = 32", "batch_size = 1")
        .replace(
            "round_timeout_secs = 10",
            "round_timeout_secs = 6\nmax_round_retries = 10",
        );
    let id = fed.submit("exp.toml", &toml);
    wait_until(Duration::from_secs(60), "round 2 training", || {
        let s = fed.status(id);
        s["rounds_done"] == 1 && s["state"]["Running"]["phase"] == "Train"
    });
    fed.node("west").kill();
    wait_until(Duration::from_secs(60), "round 2 to close without west", || {
        fed.status(id)["rounds_done"].as_u64().unwrap_or(0) >= 2
    });
    fed.restart_node("west");
    let s = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let history = s["history"].as_array().expect("history");
    assert_eq!(
        history[1]["participants"],
        serde_json::json!(["midwest", "south"])
    );
    let back = history[2..]
        .iter()
        .any(|r| r["participants"] == serde_json::json!(NODES));
    assert!(back, "west never took part again: {history:#?}");
    let ev = events(&s);
    assert!(ev.contains("west"), "{ev}");
}

/// An unusable store is a clear error at start-up, before the coordinator listens.
#[test]
fn an_unusable_store_fails_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let out = Command::new(bin("fedstat-coordinator"))
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .output()
        .expect("pki");
    assert!(out.status.success());
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a folder").expect("write");
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).expect("mkdir");
    std::fs::write(garbage.join("fedstat.db"), vec![b'x'; 8192]).expect("write");
    for (data_dir, needle) in [
        (blocker.join("data"), "data_dir"),
        (garbage.clone(), "not a fedstat store"),
    ] {
        let cfg = dir.path().join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca_cert = \"pki/ca.pem\"\n\
                 cert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator.key\"\n",
                data_dir.display()
            ),
        )
        .expect("config");
        let out = Command::new(bin("fedstat-coordinator"))
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .expect("run");
        assert!(!out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("listening on"), "{stdout}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
}
