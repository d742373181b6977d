//! A rogue coordinator: a QUIC server holding the federation's real coordinator certificate
//! that pushes tasks no honest coordinator sends, to the real `fedstat-node` binary. The node
//! must answer only what its custodian approved: no round beyond the manifest's rounds, one
//! evaluation per round, and an approval used by one experiment id only. Each refusal is in
//! the node's audit log. No real part misbehaves like this, so this is a stand-in by need.

use std::net::SocketAddr;
use std::time::Duration;

use fedstat_core::aggregate::Values;
use fedstat_core::spec::ExperimentSpec;
use fedstat_net::tls::{server_config, TlsFiles};
use fedstat_net::transport::{read_frame, read_tensor, write_frame, write_tensor};
use fedstat_proto::wire::{
    AnswerHeader, CoordMsg, NodeMsg, Phase, Task, TensorMeta, Upload, PROTOCOL_VERSION,
};
use serde_json::Value;

use crate::support::{demo_data, logit_experiment, run_bin, Fed};

/// A QUIC server holding the federation's real coordinator certificate, on a free port. Call
/// inside a runtime.
fn rogue_endpoint(fed: &Fed) -> (quinn::Endpoint, SocketAddr) {
    let pki = fed.pki();
    let tls = TlsFiles {
        ca_cert: pki.join("ca.pem"),
        cert: pki.join("coordinator.pem"),
        key: pki.join("coordinator.key"),
    };
    let endpoint = quinn::Endpoint::server(
        server_config(&tls).expect("server tls"),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .expect("rogue endpoint");
    let addr = endpoint.local_addr().expect("addr");
    (endpoint, addr)
}

/// Accept the office `office`'s connection and hello, and welcome it; returns the connection
/// and its control stream (keep the sending side: dropping it would finish the stream).
async fn welcome_office(
    endpoint: &quinn::Endpoint,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = tokio::time::timeout(Duration::from_secs(30), endpoint.accept())
        .await
        .expect("the node dials in")
        .expect("incoming")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("control stream");
    let hello = read_frame::<NodeMsg>(&mut recv, "hello").await.expect("hello");
    assert!(matches!(hello, Some(NodeMsg::Hello { .. })), "{hello:?}");
    let welcome = CoordMsg::Welcome {
        protocol: PROTOCOL_VERSION,
        name: "office".into(),
    };
    write_frame(&mut send, &welcome).await.expect("welcome");
    (conn, send, recv)
}

/// The node's next control message that is not a heartbeat.
async fn next(recv: &mut quinn::RecvStream) -> NodeMsg {
    loop {
        let msg = tokio::time::timeout(
            Duration::from_secs(30),
            read_frame::<NodeMsg>(recv, "node message"),
        )
        .await
        .expect("the node answers within 30 s")
        .expect("a well-formed message")
        .expect("the control stream stays open");
        if msg != NodeMsg::Heartbeat {
            return msg;
        }
    }
}

/// Push one task on its own stream, with the model's bytes when it carries one.
async fn push(
    conn: &quinn::Connection,
    spec: &ExperimentSpec,
    experiment: u64,
    phase: Phase,
    round: u32,
    model: Option<f64>,
) {
    let p = spec.num_params() as usize;
    let values = model.map(|v| Values::F64(vec![v; p]));
    let task = Task {
        experiment,
        round,
        phase,
        submitter: "researcher `alice`".into(),
        spec: spec.clone(),
        standardization: None,
        model: values.as_ref().map(|v| TensorMeta {
            dtype: v.dtype(),
            len: v.len() as u64,
        }),
        secure: None,
    };
    let mut s = conn.open_uni().await.expect("task stream");
    write_frame(&mut s, &task).await.expect("task frame");
    if let Some(v) = values {
        write_tensor(&mut s, &v.to_le_bytes()).await.expect("model bytes");
    }
    s.finish().expect("finish");
}

/// The node's next answer, on a stream of its own: header and values.
async fn next_answer(conn: &quinn::Connection) -> (AnswerHeader, Values) {
    let read = async {
        let mut s = conn.accept_uni().await.expect("an answer stream");
        let upload = read_frame::<Upload>(&mut s, "answer")
            .await
            .expect("a well-formed header")
            .expect("a header");
        let Upload::Answer(header) = upload else {
            panic!("a plain answer, not a masked one")
        };
        let values = read_tensor(&mut s, header.tensor, header.tensor.len)
            .await
            .expect("the answer's values");
        (header, values)
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the node answers within 30 s")
}

fn failed_with(msg: &NodeMsg, want: &str) {
    match msg {
        NodeMsg::TaskFailed { reason, .. } => assert!(reason.contains(want), "{reason}"),
        other => panic!("expected a refusal containing {want:?}, got {other:?}"),
    }
}

#[test]
fn a_rogue_coordinator_gets_nothing_beyond_the_approved_manifest() {
    let fed = Fed::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let (endpoint, rogue_addr) = rogue_endpoint(&fed);

    // The office dials the rogue coordinator and holds every manifest for its custodian.
    fed.issue("node", "office");
    let cfg = fed.write_node_config_with(
        "office",
        &[("cps1988", demo_data("midwest"))],
        "[policy]\napproval = \"manual\"\n",
    );
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace(&fed.addr, &rogue_addr.to_string())).expect("config");
    let _node = fed.spawn_node_with_config("office", &cfg);
    let cfg_arg = cfg.to_str().expect("utf-8").to_owned();

    let spec: ExperimentSpec = toml::from_str(&logit_experiment(2, 1, "")).expect("spec");
    rt.block_on(async {
        let (conn, _control, mut recv) = welcome_office(&endpoint).await;
        // As the real coordinator does once the hello is accepted: answers come on streams of
        // their own.
        conn.set_max_concurrent_uni_streams(8u32.into());

        // Held until the custodian approves; then the statistics are answered.
        push(&conn, &spec, 1, Phase::Stats, 0, None).await;
        let NodeMsg::Held { manifest, .. } = next(&mut recv).await else {
            panic!("the manifest must be held first");
        };
        let out = run_bin("fedstat-node", &["approve", &manifest, "--config", &cfg_arg]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        push(&conn, &spec, 1, Phase::Stats, 0, None).await;
        let (stats, _) = next_answer(&conn).await;
        assert_eq!(stats.phase, Phase::Stats);

        // A round above the manifest's two.
        push(&conn, &spec, 1, Phase::Train, 3, Some(0.0)).await;
        failed_with(
            &next(&mut recv).await,
            "round 3 is outside the experiment's 2 rounds",
        );

        // One evaluation per round: the same model again is a retry, another model is not.
        push(&conn, &spec, 1, Phase::Evaluate, 1, Some(0.0)).await;
        let first = next_answer(&conn).await;
        assert_eq!(first.0.phase, Phase::Evaluate);
        push(&conn, &spec, 1, Phase::Evaluate, 1, Some(0.0)).await;
        assert_eq!(next_answer(&conn).await, first, "a retry gets the same answer");
        push(&conn, &spec, 1, Phase::Evaluate, 1, Some(0.3)).await;
        failed_with(
            &next(&mut recv).await,
            "a evaluation answer for round 1 was already given on other inputs",
        );

        // The approved manifest under an experiment id the custodian never saw: held again.
        push(&conn, &spec, 2, Phase::Stats, 0, None).await;
        let again = next(&mut recv).await;
        assert!(
            matches!(&again, NodeMsg::Held { manifest: m, experiment: 2, .. } if *m == manifest),
            "{again:?}"
        );
        conn.close(0u32.into(), b"done");
    });

    let audit: Vec<Value> = std::fs::read_to_string(fed.node_audit_log("office"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let refused: Vec<&Value> = audit.iter().filter(|r| r["kind"] == "task_refused").collect();
    assert_eq!(refused.len(), 2, "{audit:#?}");
    assert_eq!(refused[0]["details"]["round"], 3);
    assert_eq!(refused[1]["details"]["phase"], "evaluation");
    assert!(
        audit.iter().any(|r| r["kind"] == "held"
            && r["details"]["experiment"] == 2
            && r["details"]["approval_used_by"] == 1),
        "{audit:#?}"
    );
    let out = run_bin("fedstat-node", &["audit", "verify", "--config", &cfg_arg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Push one task whose model is exactly `model`.
async fn push_model(
    conn: &quinn::Connection,
    spec: &ExperimentSpec,
    experiment: u64,
    phase: Phase,
    round: u32,
    model: Vec<f64>,
) {
    let values = Values::F64(model);
    let task = Task {
        experiment,
        round,
        phase,
        submitter: "researcher `alice`".into(),
        spec: spec.clone(),
        standardization: None,
        model: Some(TensorMeta {
            dtype: values.dtype(),
            len: values.len() as u64,
        }),
        secure: None,
    };
    let mut s = conn.open_uni().await.expect("task stream");
    write_frame(&mut s, &task).await.expect("task frame");
    write_tensor(&mut s, &values.to_le_bytes())
        .await
        .expect("model bytes");
    s.finish().expect("finish");
}

/// The attack on exact fits: a rogue coordinator sends coefficients of its own making rather
/// than the Newton step. With η = 20·(experience − 60), every row but the one person with 60
/// years of experience at this office gets a working weight of about 1e-16, so XᵀWX and XᵀWz
/// would be that person's row: education, ethnicity, metropolitan area, part-time work and
/// the wage class. The node refuses by its dominance rule (no row may carry more than
/// 1/min_cell of the working weight); honest coefficients are answered.
#[test]
fn a_rogue_coordinator_cannot_single_out_a_person_with_crafted_glm_coefficients() {
    let fed = Fed::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = rt.enter();
    let (endpoint, rogue_addr) = rogue_endpoint(&fed);
    fed.issue("node", "office");
    let cfg = fed.write_node_config_with(
        "office",
        &[("cps1988", demo_data("midwest"))],
        "[policy]\napproval = \"auto\"\n",
    );
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace(&fed.addr, &rogue_addr.to_string())).expect("config");
    let _node = fed.spawn_node_with_config("office", &cfg);

    let text = logit_experiment(1, 1, "")
        .replace("rounds = 1\n", "method = \"exact\"\n")
        .replace(
            "[training]\nlearning_rate = 0.05\nbatch_size = 32\nseed = 7\n",
            "",
        );
    let spec: ExperimentSpec = toml::from_str(&text).expect("spec");
    fedstat_core::spec::validate(&spec).expect("a valid exact fit");
    let p = spec.num_params() as usize;
    rt.block_on(async {
        let (conn, _control, mut recv) = welcome_office(&endpoint).await;
        conn.set_max_concurrent_uni_streams(8u32.into());

        // Round 1 from β = 0, as an honest coordinator starts: answered.
        push_model(&conn, &spec, 1, Phase::Glm, 1, vec![0.0; p + 1]).await;
        let (header, values) = next_answer(&conn).await;
        assert_eq!(header.phase, Phase::Glm);
        assert_eq!(values.len(), fedstat_core::algorithm::glm::answer_len(p));

        // Round 2 at crafted coefficients: refused, naming the rule and nothing else.
        let mut crafted = vec![0.0; p + 1];
        crafted[0] = -20.0 * 60.0;
        crafted[2] = 20.0;
        push_model(&conn, &spec, 1, Phase::Glm, 2, crafted).await;
        tokio::select! {
            _ = conn.accept_uni() => panic!("the node answered crafted coefficients: one person's row left the office"),
            msg = next(&mut recv) => failed_with(&msg, "dominance"),
        }
        conn.close(0u32.into(), b"done");
    });
    let audit = std::fs::read_to_string(fed.node_audit_log("office")).expect("audit log");
    assert!(
        audit.contains("dominance"),
        "the refusal is in the custodian's audit log"
    );
}
