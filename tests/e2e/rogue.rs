//! A misbehaving node: a real QUIC peer with a valid node certificate that speaks the protocol
//! but answers training with bad updates. No real part sends bad updates on purpose, so this is
//! the one stand-in the end-to-end tests need.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedstat_core::data::ColumnSums;
use fedstat_net::tls::{client_config, TlsFiles};
use fedstat_net::transport::{read_frame, read_tensor, write_frame, write_tensor};
use fedstat_proto::wire::{
    AnswerHeader, CoordMsg, NodeMsg, Phase, Task, TensorMeta, Upload, PROTOCOL_VERSION,
};

#[derive(Debug, Clone, Copy)]
pub enum Misbehaviour {
    /// Sends garbage on a stream first, then an update with three parameters too many.
    WrongShape,
    /// Sends an update of the right shape with a NaN at parameter 2.
    NotANumber,
}

/// Run a rogue node until `stop` elapses; returns the rejection reasons the coordinator sent.
pub async fn run(
    addr: SocketAddr,
    tls: TlsFiles,
    how: Misbehaviour,
    dataset: &str,
    stop: Duration,
) -> Vec<String> {
    let rejections = Arc::new(Mutex::new(Vec::new()));
    let cfg = client_config(&tls).expect("rogue tls config");
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
    endpoint.set_default_client_config(cfg);
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: "rogue".into(),
        datasets: vec![dataset.to_owned()],
    };
    write_frame(&mut send, &hello).await.expect("hello");
    let welcome = read_frame::<CoordMsg>(&mut recv, "welcome")
        .await
        .expect("welcome");
    assert!(matches!(welcome, Some(CoordMsg::Welcome { .. })), "{welcome:?}");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<NodeMsg>();
    let writer = tokio::spawn(async move {
        let mut beat = tokio::time::interval(Duration::from_secs(2));
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => break },
                _ = beat.tick() => NodeMsg::Heartbeat,
            };
            if write_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
    });
    let seen = rejections.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(msg)) = read_frame::<CoordMsg>(&mut recv, "control").await {
            if let CoordMsg::Rejected { reason, .. } = msg {
                seen.lock().expect("lock").push(reason);
            }
        }
    });
    let tasks = {
        let conn = conn.clone();
        async move {
            while let Ok(mut stream) = conn.accept_uni().await {
                let Ok(Some(task)) = read_frame::<Task>(&mut stream, "task").await else {
                    continue;
                };
                let model = match task.model {
                    Some(meta) => read_tensor(&mut stream, meta, task.spec.num_params()).await.ok(),
                    None => None,
                };
                answer(&conn, &tx, &task, model.map(|m| m.to_f64()), how).await;
            }
        }
    };
    let _ = tokio::time::timeout(stop, tasks).await;
    writer.abort();
    reader.abort();
    conn.close(0u32.into(), b"rogue done");
    let out = rejections.lock().expect("lock").clone();
    out
}

async fn answer(
    conn: &quinn::Connection,
    tx: &tokio::sync::mpsc::UnboundedSender<NodeMsg>,
    task: &Task,
    model: Option<Vec<f64>>,
    how: Misbehaviour,
) {
    let k = task.spec.num_params() as usize - 1;
    match task.phase {
        // Plausible statistics (mean 0.5, variance 0.25 over 50 rows), so it stays selected.
        Phase::Stats => {
            let sums = ColumnSums {
                n: 50,
                sum: vec![25.0; k],
                sum_sq: vec![25.0; k],
            };
            let values = fedstat_core::algorithm::standardize::answer(&sums).to_f64();
            send_answer(conn, task, 1, Vec::new(), &values).await;
        }
        Phase::Train => {
            let mut params = model.unwrap_or_default();
            match how {
                Misbehaviour::WrongShape => {
                    if let Ok(mut s) = conn.open_uni().await {
                        let _ = s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]).await;
                        let _ = s.finish();
                    }
                    params.extend([0.0; 3]);
                }
                Misbehaviour::NotANumber => params[2] = f64::NAN,
            }
            send_answer(conn, task, 50, vec![0.5], &params).await;
        }
        Phase::Evaluate | Phase::Glm | Phase::Table => {
            let _ = tx.send(NodeMsg::TaskFailed {
                experiment: task.experiment,
                round: task.round,
                phase: task.phase,
                reason: "rogue node answers statistics and training only".into(),
            });
        }
    }
}

/// Send an answer to `task` on a stream of its own.
async fn send_answer(conn: &quinn::Connection, task: &Task, weight: u64, aux: Vec<f64>, values: &[f64]) {
    let header = AnswerHeader {
        experiment: task.experiment,
        round: task.round,
        phase: task.phase,
        weight,
        aux,
        tensor: TensorMeta {
            dtype: fedstat_proto::wire::DType::F64,
            len: values.len() as u64,
        },
    };
    if let Ok(mut s) = conn.open_uni().await {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let _ = write_frame(&mut s, &Upload::Answer(header)).await;
        let _ = write_tensor(&mut s, &bytes).await;
        let _ = s.finish();
    }
}
