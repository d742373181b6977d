//! Secure aggregation over the real binaries: what the coordinator receives is masked, the
//! unmasked sums equal the plain ones bit for bit, and rounds survive the dropouts the
//! threshold allows and fail, revealing nothing, beyond them.
//!
//! The coordinator runs with `record_received`, which keeps a copy of every answer and every
//! secure-aggregation message exactly as received: the tests read what the secretariat holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedstat_core::aggregate::{encode_ring, AggregatorKind, Values};
use fedstat_proto::wire::AnswerHeader;
use serde_json::Value;

use crate::support::{demo_data, events, logit_experiment, run_bin, Fed, REGIONS};

/// `fedstat results` of an experiment: its parameters' bytes and its model document.
fn results(fed: &Fed, id: u64) -> (Vec<u8>, Value) {
    let out = fed.path(&format!("results-{id}"));
    let printed = fed.cli(&["results", &id.to_string(), "--out", out.to_str().expect("utf-8")]);
    assert!(printed.status.success(), "{printed:?}");
    let params = std::fs::read(out.join("parameters.bin")).expect("parameters.bin");
    let model = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).expect("model.json"))
        .expect("model.json parses");
    (params, model)
}

/// Recorded files of experiment `id` whose names end with `suffix`.
fn recorded(dir: &Path, id: u64, suffix: &str) -> Vec<PathBuf> {
    let prefix = format!("e{id}-");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("recorded folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(suffix)
        })
        .collect();
    files.sort();
    files
}

/// `e{id}-r{round}-{Phase}-{node}-...`: the round, phase and node of a recorded file.
fn key(path: &Path) -> (u32, String, String) {
    let name = path.file_name().and_then(|n| n.to_str()).expect("file name");
    let mut parts = name.splitn(5, '-');
    let _experiment = parts.next();
    let round = parts
        .next()
        .and_then(|r| r.strip_prefix('r'))
        .and_then(|r| r.parse().ok())
        .expect("round");
    let phase = parts.next().expect("phase").to_owned();
    let node = parts.next().expect("node").to_owned();
    (round, phase, node)
}

/// Pearson correlation of two equally long series.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Ring elements as signed numbers (the fixed-point integers they encode, for plain ones).
fn signed(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")) as i128 as f64)
        .collect()
}

#[test]
fn the_coordinator_sees_only_masked_answers_and_the_sum_is_the_plain_sum_bit_for_bit() {
    let mut fed = Fed::start_with("record_received = \"recorded\"");
    for region in REGIONS {
        fed.add_node(region, &[("cps1988", demo_data(region))]);
    }
    fed.wait_for_nodes(&REGIONS);
    let plain = logit_experiment(2, 4, "");
    let secure = plain.replacen("min_nodes = 4\n", "min_nodes = 4\nsecure_aggregation = true\n", 1);
    assert_ne!(plain, secure);
    let id_plain = fed.submit("plain.toml", &plain);
    let done = fed.wait_finished(id_plain, Duration::from_secs(120));
    assert_eq!(done["state"], "Completed", "{}", events(&done));
    let id_secure = fed.submit("secure.toml", &secure);
    let done = fed.wait_finished(id_secure, Duration::from_secs(120));
    assert_eq!(done["state"], "Completed", "{}", events(&done));
    assert!(
        events(&done).contains("unmasked the sum of 4 node(s)"),
        "{}",
        events(&done)
    );

    // The same model, bit for bit, and the same pooled metrics.
    let (params_plain, model_plain) = results(&fed, id_plain);
    let (params_secure, model_secure) = results(&fed, id_secure);
    assert_eq!(
        params_plain, params_secure,
        "secure aggregation changed the model"
    );
    assert_eq!(
        model_plain["final_test_metrics"],
        model_secure["final_test_metrics"]
    );
    assert_eq!(model_secure["secure_aggregation"], true);
    assert_eq!(model_plain["secure_aggregation"], false);

    // What the coordinator received in clear from each office in the plain run, encoded as
    // the ring elements a node masks, against what it received in the secure run.
    let dir = fed.path("recorded");
    let mut plain_answers: BTreeMap<(u32, String, String), Vec<u8>> = BTreeMap::new();
    for bin in recorded(&dir, id_plain, "-answer.bin") {
        let header: AnswerHeader =
            serde_json::from_slice(&std::fs::read(bin.with_extension("json")).expect("header"))
                .expect("header json");
        let bytes = std::fs::read(&bin).expect("answer");
        let values = Values::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
        );
        let kind = AggregatorKind::of_phase(header.phase);
        let encoded = encode_ring(kind, &values, header.weight, &header.aux).expect("encode");
        plain_answers.insert(key(&bin), encoded);
    }
    assert!(
        !recorded(&dir, id_secure, "-answer.bin").iter().any(|_| true),
        "a secure run sent an answer in clear"
    );
    let masked = recorded(&dir, id_secure, "-masked.bin");
    // Statistics, then two rounds of training and evaluation, from each of the four offices.
    assert_eq!(masked.len(), 4 * 5, "{masked:?}");
    assert_eq!(plain_answers.len(), masked.len());
    let (mut all_masked, mut all_plain) = (Vec::new(), Vec::new());
    for m in &masked {
        let (round, phase, node) = key(m);
        let got = std::fs::read(m).expect("masked");
        let plain = plain_answers
            .get(&(round, phase.clone(), node.clone()))
            .expect("the same answer in clear");
        assert_eq!(got.len(), plain.len());
        assert_ne!(
            &got, plain,
            "{node} sent its answer unmasked ({phase}, round {round})"
        );
        // Not one 16-byte element travelled as it was.
        let same = got
            .chunks_exact(16)
            .zip(plain.chunks_exact(16))
            .filter(|(a, b)| a == b)
            .count();
        assert_eq!(
            same, 0,
            "{node}: {same} elements unmasked ({phase}, round {round})"
        );
        all_masked.extend(signed(&got));
        all_plain.extend(signed(plain));
    }
    // Across everything the coordinator received, masked values do not follow the answers.
    let r = correlation(&all_masked, &all_plain);
    assert!(
        r.abs() < 0.2,
        "masked answers correlate with the plain ones: r = {r} over {} values",
        all_masked.len()
    );
    // And every other message it received (keys, sealed shares, reveals) carries none of them.
    for frame in recorded(&dir, id_secure, ".frame") {
        let bytes = std::fs::read(&frame).expect("frame");
        for plain in plain_answers.values() {
            for element in plain
                .chunks_exact(16)
                .filter(|e| e.iter().filter(|&&b| b != 0).count() > 4)
            {
                assert!(
                    !bytes.windows(16).any(|w| w == element),
                    "{} carries part of an answer in clear",
                    frame.display()
                );
            }
        }
    }
}

/// An echo experiment (no data) of one round under secure aggregation.
fn echo(min_nodes: u32) -> String {
    format!(
        "name = \"secure echo\"\nmodel = \"echo\"\nrounds = 1\nmin_nodes = {min_nodes}\nround_timeout_secs = 5\n\
         max_round_retries = 1\nsecure_aggregation = true\n[echo]\nparams = 1000\n"
    )
}

/// Run an echo experiment of one secure round; assert it completed with the sum of `n` nodes.
fn echo_completes_with_sum_of(fed: &Fed, n: usize) -> u64 {
    let id = fed.submit("echo.toml", &echo(3));
    let done = fed.wait_finished(id, Duration::from_secs(60));
    let ev = events(&done);
    assert_eq!(done["state"], "Completed", "{ev}");
    assert!(ev.contains(&format!("unmasked the sum of {n} node(s)")), "{ev}");
    id
}

/// Five offices, the listed ones leaving the federation at `point` of the secure step.
fn five_with_faults(faulty: &[&str], point: &str) -> Fed {
    let mut fed = Fed::start_with("record_received = \"recorded\"");
    let names = ["a", "b", "c", "d", "e"];
    let fault = format!("secagg-exit-{point}");
    for name in names {
        let env: Vec<(&str, &str)> = if faulty.contains(&name) {
            vec![("FEDSTAT_TEST_FAULT", fault.as_str())]
        } else {
            Vec::new()
        };
        fed.add_node_with_env(name, &[], "", &env);
    }
    fed.wait_for_nodes(&names);
    fed
}

#[test]
fn a_node_dropping_after_its_masked_answer_is_unmasked_from_the_others_shares() {
    // Five offices: the threshold is a strict majority, 3.
    let fed = five_with_faults(&["e"], "after-masked");
    echo_completes_with_sum_of(&fed, 5);
}

#[test]
fn n_minus_t_nodes_dropping_before_masking_leave_a_sum_of_the_others() {
    let fed = five_with_faults(&["d", "e"], "after-shares");
    echo_completes_with_sum_of(&fed, 3);
}

#[test]
fn more_dropouts_than_the_threshold_allows_fail_the_round_and_reveal_nothing() {
    let fed = five_with_faults(&["c", "d", "e"], "after-shares");
    let id = fed.submit("echo.toml", &echo(3));
    let done = fed.wait_finished(id, Duration::from_secs(90));
    assert!(done["state"].get("Failed").is_some(), "{done:#}");
    let ev = events(&done);
    assert!(ev.contains("needed for secure aggregation"), "{ev}");
    assert!(!ev.contains("unmasked"), "{ev}");
    // No one was asked to reveal a share: the coordinator holds masked answers only.
    let dir = fed.path("recorded");
    assert!(recorded(&dir, id, "-reveal.frame").is_empty());
    assert!(!recorded(&dir, id, "-masked.bin").is_empty(), "{ev}");
    assert_eq!(done["rounds_done"], 0, "{done:#}");
}

/// `fedstat-node fingerprint` of the certificate the federation issued to `name`: a line of
/// `[policy.secure_peers]`.
fn pin_line(fed: &Fed, name: &str) -> String {
    let cert = fed.pki().join(format!("{name}.pem"));
    let out = run_bin(
        "fedstat-node",
        &["fingerprint", "--cert", cert.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(line.starts_with(&format!("{name} = \"sha256:")), "{line}");
    line
}

#[test]
fn sybils_minted_by_the_ca_cannot_surround_an_office_that_pins_its_peers() {
    // The attack: a secretariat that also runs the CA issues node certificates for offices of
    // its own making (`s1`, `s2`) and runs a secure sum of the real office `a` with them
    // alone. It knows its sybils' answers, so the unmasked sum minus theirs is `a`'s answer.
    let mut fed = Fed::start_with("record_received = \"recorded\"");
    for name in ["a", "s1", "s2"] {
        fed.add_node(name, &[]);
    }
    fed.wait_for_nodes(&["a", "s1", "s2"]);
    let dir = fed.path("recorded");
    let from = |id: u64, node: &str| {
        recorded(&dir, id, "-masked.bin")
            .iter()
            .filter(|p| key(p).2 == node)
            .count()
    };
    let id = echo_completes_with_sum_of(&fed, 3);
    assert_eq!(
        from(id, "a"),
        1,
        "the attack works without pins: a's answer is in a sum of sybils"
    );

    // The defence: `a` pins the offices it agreed to sum with, their fingerprints exchanged
    // out of band. The sybils are not among them: `a` leaves the step before sharing.
    fed.add_node("b", &[]);
    fed.add_node("c", &[]);
    let pins = format!(
        "[policy.secure_peers]\n{}\n{}\n",
        pin_line(&fed, "b"),
        pin_line(&fed, "c")
    );
    fed.write_node_config_with("a", &[], &pins);
    fed.restart_node("a");
    fed.wait_for_nodes(&["a", "b", "c", "s1", "s2"]);
    let id = fed.submit("echo.toml", &echo(3));
    let done = fed.wait_finished(id, Duration::from_secs(60));
    let ev = events(&done);
    assert!(ev.contains("policy.secure_peers"), "{ev}");
    assert_eq!(from(id, "a"), 0, "{ev}");
    assert!(
        !recorded(&dir, id, "-shares.frame")
            .iter()
            .any(|p| key(p).2 == "a"),
        "{ev}"
    );
    // The others' sum goes on without `a`; no value or name of the detail leaves the node.
    assert_eq!(done["state"], "Completed", "{ev}");
    assert!(ev.contains("unmasked the sum of 4 node(s)"), "{ev}");
    let log = std::fs::read_to_string(fed.path("node-a.log")).expect("node log");
    assert!(
        log.contains("not listed"),
        "the custodian's log names the member and its key"
    );

    // With the sybils gone, `a` sums with its pinned peers.
    for sybil in ["s1", "s2"] {
        fed.node(sybil).terminate();
    }
    let id = echo_completes_with_sum_of(&fed, 3);
    assert_eq!(from(id, "a"), 1, "a sums with its pinned peers");
}
