//! Writes seed corpora for the fuzz targets: well-formed frames of every message kind (with the
//! example experiment specs), tensor bodies and a valid audit log, so the fuzzers start from
//! inputs that get past the first checks. Run from `fuzz/`:
//! `cargo run --example seeds` (writes into `corpus/<target>/`).

use std::path::{Path, PathBuf};

use fedstat_core::aggregate::Values;
use fedstat_core::algorithm::{evaluate, standardize};
use fedstat_core::audit::{AuditEvent, AuditLog};
use fedstat_core::data::{ColumnSums, Standardization};
use fedstat_core::model::{EvalSums, Metrics};
use fedstat_core::spec::ExperimentSpec;
use fedstat_net::identity::Role;
use fedstat_proto::wire::{
    encode_frame, AnswerHeader, CoordMsg, DType, ExperimentState, ExperimentStatus, NodeInfo, NodeMsg, Phase,
    Request, Response, ResultsHeader, RoundRecord, Task, TensorMeta, Upload,
};
use serde::Serialize;

fn write(target: &str, name: &str, kind: u8, parts: &[Vec<u8>]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("create corpus folder");
    let mut bytes = vec![kind];
    for p in parts {
        bytes.extend_from_slice(p);
    }
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_frame(msg).expect("encode seed")
}

fn specs() -> Vec<ExperimentSpec> {
    ["experiment-echo", "experiment-linear", "experiment-logit"]
        .iter()
        .map(|n| {
            let path = PathBuf::from(format!("../configs/{n}.toml"));
            fedstat_core::spec::from_toml_file(&path).expect("example spec")
        })
        .collect()
}

fn main() {
    let specs = specs();
    let eval = EvalSums {
        n: 40,
        loss_sum: 12.5,
        correct: 30,
        sse: 3.0,
        sum_y: 20.0,
        sum_y2: 30.0,
        hist_pos: vec![1; 100],
        hist_neg: vec![2; 100],
    };
    let sums = ColumnSums {
        n: 40,
        sum: vec![1.0, 2.0, 3.0],
        sum_sq: vec![4.0, 5.0, 6.0],
    };
    let model = Values::from_f64(&[0.5, -1.25, 3.0], DType::F32).to_le_bytes();
    let model64 = Values::from_f64(&[0.5, -1.25, 3.0], DType::F64).to_le_bytes();

    // Peers -> coordinator: 0 control stream, 1 update stream, 2 request stream.
    let t = "wire_to_coordinator";
    let hello = frame(&NodeMsg::Hello {
        protocol: 2,
        software: "fedstat-node 0.1.0".into(),
        datasets: vec!["cps1988".into(), "lfs".into()],
    });
    let control = [
        hello.clone(),
        frame(&NodeMsg::Heartbeat),
        frame(&NodeMsg::Held {
            experiment: 1,
            round: 1,
            phase: Phase::Train,
            manifest: "ab".repeat(32),
        }),
        frame(&NodeMsg::TaskFailed {
            experiment: 1,
            round: 1,
            phase: Phase::Stats,
            reason: "node.csv line 3 column age: not a number".into(),
        }),
    ];
    write(t, "control", 0, &control);
    write(t, "hello", 0, &[hello]);
    for (i, (dtype, body)) in [(DType::F32, &model), (DType::F64, &model64)]
        .into_iter()
        .enumerate()
    {
        let header = AnswerHeader {
            experiment: 1,
            round: 1,
            phase: Phase::Train,
            weight: 40,
            aux: vec![0.7],
            tensor: TensorMeta { dtype, len: 3 },
        };
        write(
            t,
            &format!("update-{i}"),
            1,
            &[frame(&Upload::Answer(header)), body.clone()],
        );
    }
    // Statistics and evaluation answers, encoded as the node encodes them.
    for (name, phase, values) in [
        ("stats", Phase::Stats, standardize::answer(&sums)),
        ("eval", Phase::Evaluate, evaluate::answer(&eval)),
    ] {
        let header = AnswerHeader {
            experiment: 1,
            round: 2,
            phase,
            weight: 1,
            aux: Vec::new(),
            tensor: TensorMeta {
                dtype: DType::F64,
                len: values.len() as u64,
            },
        };
        write(
            t,
            &format!("answer-{name}"),
            1,
            &[frame(&Upload::Answer(header)), values.to_le_bytes()],
        );
    }
    let requests = [
        frame(&Request::Hello { protocol: 2 }),
        frame(&Request::Status {
            experiment: Some(1),
            after: None,
        }),
        frame(&Request::Status {
            experiment: None,
            after: None,
        }),
        frame(&Request::Status {
            experiment: None,
            after: Some(64),
        }),
        frame(&Request::Nodes),
        frame(&Request::Results {
            experiment: 1,
            round: Some(2),
        }),
        frame(&Request::Cancel { experiment: 1 }),
        frame(&Request::Disconnect { node: "ons".into() }),
    ];
    write(t, "requests", 2, &requests);
    for (i, spec) in specs.iter().enumerate() {
        let submit = frame(&Request::Submit {
            spec: Box::new(spec.clone()),
        });
        write(t, &format!("submit-{i}"), 2, &[submit]);
    }

    // Coordinator -> peers: 0 control stream, 1 task stream, 2 response stream.
    let t = "wire_from_coordinator";
    write(
        t,
        "control",
        0,
        &[
            frame(&CoordMsg::Welcome {
                protocol: 2,
                name: "ons".into(),
            }),
            frame(&CoordMsg::Heartbeat),
            frame(&CoordMsg::Rejected {
                experiment: 1,
                round: 1,
                reason: "late".into(),
            }),
            frame(&CoordMsg::Refused {
                reason: "revoked".into(),
            }),
        ],
    );
    for (i, spec) in specs.iter().enumerate() {
        let p = spec.schema.as_ref().map_or(3, |s| s.design_columns().len());
        let st = Standardization {
            mean: vec![0.5; p],
            sd: vec![2.0; p],
        };
        for (j, phase) in [Phase::Stats, Phase::Train, Phase::Evaluate]
            .into_iter()
            .enumerate()
        {
            let with_model = phase != Phase::Stats;
            let task = Task {
                experiment: 1,
                round: j as u32,
                phase,
                submitter: "researcher `r`".into(),
                spec: spec.clone(),
                standardization: with_model.then(|| st.clone()),
                model: with_model.then_some(TensorMeta {
                    dtype: DType::F64,
                    len: p as u64,
                }),
                secure: None,
            };
            let body = if with_model {
                Values::from_f64(&vec![0.25; p], DType::F64).to_le_bytes()
            } else {
                Vec::new()
            };
            write(t, &format!("task-{i}-{j}"), 1, &[frame(&task), body]);
        }
    }
    let status = ExperimentStatus {
        id: 1,
        name: specs[1].name.clone(),
        model: specs[1].model,
        submitter: "researcher `r`".into(),
        state: ExperimentState::Completed,
        rounds_done: 1,
        rounds: 1,
        participants: vec!["a".into(), "b".into()],
        privacy: Default::default(),
        history: vec![RoundRecord {
            round: 1,
            participants: vec!["a".into(), "b".into()],
            total_examples: 80,
            train_loss: 0.5,
            metrics: Some(Metrics {
                n: 20,
                log_loss: Some(0.4),
                ..Metrics::default()
            }),
            train_ms: 10,
            round_ms: 20,
            retries: 0,
        }],
        events: vec![],
    };
    write(
        t,
        "responses",
        2,
        &[
            frame(&Response::Welcome {
                protocol: 2,
                name: "r".into(),
                role: Role::Researcher,
            }),
            frame(&Response::Submitted { experiment: 1 }),
            frame(&Response::Status {
                experiments: vec![status.clone()],
                next: None,
            }),
            frame(&Response::Status {
                experiments: vec![status.clone()],
                next: Some(1),
            }),
            frame(&Response::Nodes {
                nodes: vec![NodeInfo {
                    name: "a".into(),
                    datasets: vec!["cps1988".into()],
                    connected_secs: Some(5),
                }],
            }),
            frame(&Response::Error {
                message: "no such experiment".into(),
            }),
        ],
    );
    write(
        t,
        "results",
        2,
        &[
            frame(&Response::Results(Box::new(ResultsHeader {
                status,
                spec: specs[1].clone(),
                columns: vec!["(intercept)".into(), "x".into(), "y".into()],
                standardization: None,
                tensor: TensorMeta {
                    dtype: DType::F32,
                    len: 3,
                },
                output: None,
            }))),
            model.clone(),
        ],
    );

    // Tensor bodies: flags (low bit: f64; high nibble: number of splits), len, splits, bytes.
    let t = "tensor_staging";
    write(t, "f32", 0x30, &[vec![3, 1, 5, 2], model]);
    write(t, "f64", 0x21, &[vec![3, 7, 9], model64]);

    // Audit logs: a valid chain, and the same with its last line cut.
    let dir = std::env::temp_dir().join(format!("fedstat-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp folder");
    let path = dir.join("audit.jsonl");
    let mut log = AuditLog::open(&path).expect("open audit log");
    let events = [
        AuditEvent::ConnectFailed {
            coordinator: "coordinator:4433".into(),
            reason: "node `a` \"timed out\"".into(),
        },
        AuditEvent::ManifestSeen {
            manifest: "ab".repeat(32),
            experiment: 1,
            submitter: "researcher `r`".into(),
            name: "wages".into(),
            model: "logistic".into(),
            dataset: "cps1988".into(),
            rounds: 3,
        },
        AuditEvent::UpdateSent {
            experiment: 1,
            round: 1,
            manifest: "ab".repeat(32),
            rows: 40,
            bytes: 64,
            sha256: "cd".repeat(32),
        },
        AuditEvent::NodeStopped {},
    ];
    for event in &events {
        log.append(event).expect("append");
    }
    drop(log);
    let bytes = std::fs::read(&path).expect("read audit log");
    let dir_out = Path::new("corpus/audit_log");
    std::fs::create_dir_all(dir_out).expect("create corpus folder");
    std::fs::write(dir_out.join("seed-valid"), &bytes).expect("write seed");
    std::fs::write(dir_out.join("seed-cut"), &bytes[..bytes.len() - 20]).expect("write seed");
    let _ = std::fs::remove_dir_all(&dir);
    println!("seeds written under corpus/");
}
