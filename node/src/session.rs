//! The node's network edge: dial out to the coordinator (offices allow outbound traffic only),
//! keep one connection, redial with exponential backoff and jitter when it drops, and serve
//! the tasks the coordinator pushes: each one admitted by [`crate::governance`], run by the
//! [`crate::worker`], recorded in the audit log, then answered.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedstat_core::aggregate::Values;
use fedstat_core::audit::AuditEvent;
use fedstat_core::data::ColumnSums;
use fedstat_core::model::EvalSums;
use fedstat_net::tls;
use fedstat_net::transport::{read_frame, read_tensor, write_frame, write_tensor};
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{CoordMsg, NodeMsg, Task, TensorMeta, UpdateHeader, PROTOCOL_VERSION};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::governance::{Admission, Governance};
use crate::worker::{Outcome, Worker};
use crate::{Error, Result};

/// Protocol heartbeat: proves the node process (not only its connection) is alive, also during
/// long local training.
const HEARTBEAT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest pause while receiving a task.
const TASK_IDLE: Duration = Duration::from_secs(120);

/// How a session ended: the connection dropped after working; redial soon.
struct Dropped(String);

/// Run the node until `shutdown` resolves. Connection failures are retried forever (with
/// backoff); only configuration errors (bad certificate files, an unusable audit log, ...) end
/// it early.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let me = config.tls.identity()?;
    let client_config = tls::client_config_with_crl(&config.tls, config.crl.as_deref())?;
    let gov = Arc::new(Governance::open(&config, &me.name)?);
    let worker = Arc::new(Worker::new(me.name.clone(), config.datasets.clone(), gov.clone()));
    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_START;
    // Only the first failure of a streak goes to the audit log: retries are not events.
    let mut failing = false;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    loop {
        let attempt = session(
            &config,
            client_config.clone(),
            worker.clone(),
            gov.clone(),
            !failing,
            stop_rx.clone(),
        );
        tokio::pin!(attempt);
        let ended = tokio::select! {
            r = &mut attempt => r,
            () = &mut shutdown => {
                // Let the session close its connection with a reason, briefly.
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
                break;
            }
        };
        match ended {
            Ok(Dropped(why)) => {
                tracing::warn!("connection to the coordinator lost: {why}; reconnecting");
                gov.note(AuditEvent::Disconnected {
                    coordinator: config.coordinator.clone(),
                    reason: why,
                });
                backoff = BACKOFF_START;
                failing = false;
            }
            Err(e) => {
                tracing::warn!("cannot connect: {e:#}; retrying in {backoff:?}");
                if !failing {
                    gov.note(AuditEvent::ConnectFailed {
                        coordinator: config.coordinator.clone(),
                        reason: e.to_string(),
                    });
                }
                failing = true;
            }
        }
        // Full jitter: nodes that lost the coordinator together do not come back together.
        let wait = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    gov.note(AuditEvent::NodeStopped {});
    Ok(())
}

async fn session(
    config: &NodeConfig,
    client_config: quinn::ClientConfig,
    worker: Arc<Worker>,
    gov: Arc<Governance>,
    audit_refusal: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Dropped> {
    let fail = |problem: String| Error::Connect {
        addr: config.coordinator.clone(),
        problem,
    };
    let addr: SocketAddr = tokio::net::lookup_host(&config.coordinator)
        .await
        .map_err(|e| fail(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| fail("resolves to no address".into()))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| fail(format!("cannot open a UDP socket: {e}")))?;
    endpoint.set_default_client_config(client_config);
    let conn = endpoint
        .connect(addr, &config.server_name)
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(format!("handshake failed: {e}")))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: format!("fedstat-node {}", env!("CARGO_PKG_VERSION")),
        datasets: config.datasets.keys().cloned().collect(),
    };
    write_frame(&mut send, &hello).await?;
    match tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<CoordMsg>(&mut recv, "welcome"),
    )
    .await
    {
        Ok(Ok(Some(CoordMsg::Welcome { name, .. }))) => {
            tracing::info!(%addr, "connected to the coordinator as node `{name}`");
            println!("connected to {addr} as node `{name}`");
            gov.note(AuditEvent::Connected {
                coordinator: config.coordinator.clone(),
                address: addr.to_string(),
                as_name: name.to_string(),
            });
        }
        Ok(Ok(Some(CoordMsg::Refused { reason }))) => {
            if audit_refusal {
                gov.note(AuditEvent::ConnectRefused {
                    coordinator: config.coordinator.clone(),
                    reason: reason.clone(),
                });
            }
            return Err(fail(format!("refused: {reason}")));
        }
        Ok(Ok(other)) => return Err(fail(format!("unexpected first answer {other:?}"))),
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(fail("no welcome within 15 s".into())),
    }

    // Everything the node says on its control stream goes through one writer.
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<NodeMsg>();
    let writer = tokio::spawn(async move {
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            let msg = tokio::select! {
                m = ctl_rx.recv() => match m { Some(m) => m, None => break },
                _ = beat.tick() => NodeMsg::Heartbeat,
            };
            if let Err(e) = write_frame(&mut send, &msg).await {
                tracing::warn!("cannot write to the coordinator: {e}");
                break;
            }
        }
    });
    let reader = {
        let conn = conn.clone();
        async move {
            loop {
                match read_frame::<CoordMsg>(&mut recv, "coordinator message").await {
                    Ok(Some(CoordMsg::Rejected {
                        experiment,
                        round,
                        reason,
                    })) => {
                        tracing::warn!(
                            experiment,
                            round,
                            "the coordinator did not use our answer: {reason}"
                        )
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return "the coordinator closed the control stream".to_owned(),
                    Err(e) => {
                        conn.close(2u32.into(), b"malformed control message");
                        return e.to_string();
                    }
                }
            }
        }
    };
    let tasks = async {
        loop {
            match conn.accept_uni().await {
                Ok(stream) => {
                    let (worker, gov, conn, ctl) =
                        (worker.clone(), gov.clone(), conn.clone(), ctl_tx.clone());
                    tokio::spawn(task(stream, worker, gov, conn, ctl).in_current_span());
                }
                Err(e) => return e.to_string(),
            }
        }
    };
    let mut stop = stop;
    let (why, stopping) = tokio::select! {
        why = reader => (why, false),
        why = tasks => (why, false),
        _ = stop.changed() => ("the node is shutting down".to_owned(), true),
    };
    writer.abort();
    if stopping {
        conn.close(0u32.into(), b"node shutting down");
        // Wait until the coordinator has the close, so it drops us at once, not at a timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    } else {
        conn.close(0u32.into(), b"node session ended");
        endpoint.close(0u32.into(), b"");
    }
    Ok(Dropped(why))
}

/// What a task comes to, ready to send.
enum Step {
    Held(String),
    Stats(ColumnSums),
    Eval(EvalSums),
    Update {
        tensor: TensorMeta,
        bytes: Vec<u8>,
        num_examples: u64,
        train_loss: f64,
    },
}

/// Receive one task, run it on a blocking thread, send the answer.
async fn task(
    mut stream: quinn::RecvStream,
    worker: Arc<Worker>,
    gov: Arc<Governance>,
    conn: quinn::Connection,
    ctl: mpsc::UnboundedSender<NodeMsg>,
) {
    let received = async {
        let task =
            read_frame::<Task>(&mut stream, "task")
                .await?
                .ok_or_else(|| fedstat_proto::Error::Wire {
                    what: "task",
                    problem: "empty stream".into(),
                })?;
        // The spec and the policy's size rules are checked before the model's bytes are read,
        // so a padded spec or an oversized model costs the node nothing.
        if let Err(e) = precheck(&task, &gov) {
            return Ok(Err((task, e)));
        }
        let model = match task.model {
            Some(meta) => Some(read_tensor(&mut stream, meta, task.spec.num_params()).await?),
            None => None,
        };
        Ok::<_, fedstat_net::Error>(Ok((task, model)))
    };
    let (task, model) = match tokio::time::timeout(TASK_IDLE, received).await {
        Ok(Ok(Ok(x))) => x,
        Ok(Ok(Err((task, e)))) => {
            let hash = Manifest::new(&task.spec, &task.submitter).hash();
            gov.record_failure(&task, &hash, &e);
            return fail(&ctl, &task, &e);
        }
        Ok(Err(e)) => return tracing::warn!("cannot read a task: {e}"),
        Err(_) => return tracing::warn!("a task did not arrive within {TASK_IDLE:?}"),
    };
    let (experiment, round, phase) = (task.experiment, task.round, task.phase);
    let span = tracing::info_span!("task", experiment, round, %phase);
    async move {
        let spec_model = task.spec.model;
        let task = Arc::new(task);
        let t = task.clone();
        let step = tokio::task::spawn_blocking(move || prepare(&t, &worker, &gov, model)).await;
        let step = match step {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail(&ctl, &task, &e),
            Err(e) => {
                tracing::error!("the task crashed: {e}");
                return fail(
                    &ctl,
                    &task,
                    &Error::Core(fedstat_core::Error::Model("the task crashed at the node".into())),
                );
            }
        };
        let closed = |_| "control stream closed".to_owned();
        let sent = match step {
            Step::Held(manifest) => ctl
                .send(NodeMsg::Held {
                    experiment,
                    round,
                    phase,
                    manifest,
                })
                .map_err(closed),
            Step::Stats(sums) => ctl
                .send(NodeMsg::StatsReply {
                    experiment,
                    round,
                    sums,
                })
                .map_err(closed),
            Step::Eval(sums) => ctl
                .send(NodeMsg::EvalReply {
                    experiment,
                    round,
                    sums,
                })
                .map_err(closed),
            Step::Update {
                tensor,
                bytes,
                num_examples,
                train_loss,
            } => {
                let header = UpdateHeader {
                    experiment,
                    round,
                    num_examples,
                    train_loss,
                    tensor,
                };
                send_update(&conn, &header, &bytes).await
            }
        };
        match sent {
            Ok(()) => tracing::info!("{phase} done ({})", spec_model.as_str()),
            Err(e) => tracing::warn!("cannot send the {phase} answer: {e}"),
        }
    }
    .instrument(span)
    .await
}

/// What needs no data and no model: the spec is valid and the site policy allows it.
fn precheck(task: &Task, gov: &Governance) -> Result<()> {
    fedstat_core::spec::validate(&task.spec).map_err(Error::InvalidSpec)?;
    gov.policy().check_spec(&task.spec).map_err(Error::Policy)
}

/// SHA-256 of everything an answer is computed from besides the data: the global model and
/// the pooled standardisation. Two tasks with the same digest get the same answer.
fn input_digest(task: &Task, model: Option<&Values>) -> String {
    let mut h = Sha256::new();
    if let Some(st) = &task.standardization {
        h.update(serde_json::to_vec(st).unwrap_or_default());
    }
    h.update([0xff]);
    if let Some(m) = model {
        h.update(m.to_le_bytes());
    }
    fedstat_proto::manifest::hex(&h.finalize())
}

/// Everything before sending, on a blocking thread: validate, admit (policy, approval), check
/// the task against what the node agreed to (manifest, rounds, one answer per phase and round),
/// run next to the data, record the answer in the bindings and the audit log. A failure is
/// recorded too.
fn prepare(task: &Task, worker: &Worker, gov: &Governance, model: Option<Values>) -> Result<Step> {
    let manifest = Manifest::new(&task.spec, &task.submitter);
    let hash = manifest.hash();
    let result = (|| {
        precheck(task, gov)?;
        if gov.admit(task, &manifest)? == Admission::Held {
            return Ok(Step::Held(hash.clone()));
        }
        let inputs = input_digest(task, model.as_ref());
        gov.check_binding(task, &hash, &inputs)?;
        let blocked = |e: Error| {
            tracing::error!("cannot write the audit log, nothing is sent: {e}");
            Error::AuditUnavailable
        };
        let outcome = worker.run(task, &hash, model)?;
        gov.record_binding(task, &inputs).map_err(blocked)?;
        Ok(match outcome {
            Outcome::Stats(sums) => {
                gov.record_answer(task, &hash).map_err(blocked)?;
                Step::Stats(sums)
            }
            Outcome::Eval(sums) => {
                gov.record_answer(task, &hash).map_err(blocked)?;
                Step::Eval(sums)
            }
            Outcome::Update {
                values,
                num_examples,
                train_loss,
            } => {
                let bytes = values.to_le_bytes();
                gov.record_update(task, &hash, num_examples, &bytes)
                    .map_err(blocked)?;
                Step::Update {
                    tensor: TensorMeta {
                        dtype: values.dtype(),
                        len: values.len() as u64,
                    },
                    bytes,
                    num_examples,
                    train_loss,
                }
            }
        })
    })();
    if let Err(e) = &result {
        gov.record_failure(task, &hash, e);
    }
    result
}

/// Tell the coordinator a task was not done. Only the public form of the error leaves the
/// node (the rule or column); the detail (file, line) goes to the node's log.
fn fail(ctl: &mpsc::UnboundedSender<NodeMsg>, task: &Task, error: &Error) {
    tracing::error!("{} of experiment {} failed: {error}", task.phase, task.experiment);
    let _ = ctl.send(NodeMsg::TaskFailed {
        experiment: task.experiment,
        round: task.round,
        phase: task.phase,
        reason: error.public(&task.spec.dataset),
    });
}

async fn send_update(conn: &quinn::Connection, header: &UpdateHeader, bytes: &[u8]) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    write_frame(&mut s, header).await.map_err(|e| e.to_string())?;
    write_tensor(&mut s, bytes).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    // Wait until the coordinator has all bytes, or gave up on them.
    let _ = s.stopped().await;
    Ok(())
}
