//! The node's network edge: dial out to the coordinator (offices allow outbound traffic only;
//! QUIC, or TLS-over-TCP where UDP is blocked, see `fedstat_net::dial`),
//! keep one connection, redial with exponential backoff and jitter when it drops, and serve
//! the tasks the coordinator pushes: each one admitted by [`crate::governance`], run by the
//! [`crate::worker`], recorded in the audit log, then answered.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedstat_core::aggregate::{encode_ring, AggregatorKind, Values};
use fedstat_core::audit::AuditEvent;
use fedstat_net::dial::Dialer;
use fedstat_net::session::{close, Connection, RecvStream};
use fedstat_net::transport::{read_frame, read_tensor, write_frame, write_tensor};
use fedstat_proto::manifest::Manifest;
use fedstat_proto::secure::{Ring, SecureRound};
use fedstat_proto::wire::{
    AnswerHeader, CoordMsg, NodeMsg, Phase, Task, TensorMeta, Upload, PROTOCOL_VERSION,
};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::NodeConfig;
use crate::governance::{Admission, Governance};
use crate::secure::Secure;
use crate::worker::Worker;
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
    let dialer = Dialer::new(
        &config.tls,
        config.crl.as_deref(),
        config.transport,
        &config.server_name,
    )?;
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
            &dialer,
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
    dialer: &Dialer,
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
    let conn = dialer.dial(addr).await.map_err(|e| fail(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: format!("fedstat-node {}", env!("CARGO_PKG_VERSION")),
        datasets: config.datasets.keys().cloned().collect(),
    };
    write_frame(&mut send, &hello).await?;
    let me;
    match tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<CoordMsg>(&mut recv, "welcome"),
    )
    .await
    {
        Ok(Ok(Some(CoordMsg::Welcome { name, .. }))) => {
            me = name.clone();
            let transport = conn.transport_name();
            tracing::info!(%addr, transport, "connected to the coordinator as node `{name}`");
            println!("connected to {addr} as node `{name}` over {transport}");
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

    let secure = Arc::new(Secure::load(config)?);
    let me: Arc<str> = me.into();
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
        let secure = secure.clone();
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
                    Ok(Some(CoordMsg::Secure(msg))) => secure.deliver(msg),
                    Ok(Some(_)) => {}
                    Ok(None) => return "the coordinator closed the control stream".to_owned(),
                    Err(e) => {
                        conn.close(close::PROTOCOL, b"malformed control message");
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
                    let secure = (secure.clone(), me.clone());
                    tokio::spawn(task(stream, worker, gov, conn, ctl, secure).in_current_span());
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
    // The control stream may end a moment before the connection reports why it closed.
    let why = match conn.close_reason() {
        Some(reason) if !stopping && !why.contains(&reason) => format!("{why} ({reason})"),
        _ => why,
    };
    if stopping {
        // Wait until the coordinator has the close, so it drops us at once, not at a timeout.
        conn.close_and_wait(close::SHUTDOWN, b"node shutting down").await;
    } else {
        conn.close(close::SHUTDOWN, b"node session ended");
    }
    Ok(Dropped(why))
}

/// What a task comes to, ready to send.
enum Step {
    Held(String),
    Answer {
        tensor: TensorMeta,
        bytes: Vec<u8>,
        weight: u64,
        aux: Vec<f64>,
        /// The privacy ledger's notice, for an answer it charged.
        spent: Option<Box<NodeMsg>>,
    },
    /// The answer as ring elements, to be masked (a secure step).
    Masked {
        encoded: Vec<u8>,
        /// The privacy ledger's notice, for an answer it charged.
        spent: Option<Box<NodeMsg>>,
    },
}

/// Receive one task, run it on a blocking thread, send the answer (masked, for a secure step).
async fn task(
    mut stream: RecvStream,
    worker: Arc<Worker>,
    gov: Arc<Governance>,
    conn: Connection,
    ctl: mpsc::UnboundedSender<NodeMsg>,
    (secure, me): (Arc<Secure>, Arc<str>),
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
            Some(meta) => Some(read_tensor(&mut stream, meta, task.spec.model_len()).await?),
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
        let g = gov.clone();
        let step = tokio::task::spawn_blocking(move || prepare(&t, &worker, &g, model)).await;
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
        let mut answer_bytes = None;
        let sent = match step {
            Step::Held(manifest) => ctl
                .send(NodeMsg::Held {
                    experiment,
                    round,
                    phase,
                    manifest,
                })
                .map_err(closed),
            Step::Answer {
                tensor,
                bytes,
                weight,
                aux,
                spent,
            } => {
                let header = AnswerHeader {
                    experiment,
                    round,
                    phase,
                    weight,
                    aux,
                    tensor,
                };
                answer_bytes = Some((bytes.len() + 8 * header.aux.len()) as u64);
                let sent = send_answer(&conn, &header, &bytes).await;
                // The charge is on disk whether or not the answer arrived.
                if let Some(notice) = spent {
                    let _ = ctl.send(*notice);
                }
                sent
            }
            Step::Masked { encoded, spent } => {
                // The charge is on disk before the secure exchange starts.
                if let Some(notice) = spent {
                    let _ = ctl.send(*notice);
                }
                answer_bytes = Some(encoded.len() as u64);
                let Some(st) = task.secure else {
                    return;
                };
                let at = SecureRound {
                    experiment,
                    round,
                    phase,
                    attempt: st.attempt,
                };
                // Each exchange may wait for the slowest member's answer.
                let wait = Duration::from_secs(task.spec.round_timeout_secs.saturating_add(30));
                match secure.run(at, st, &me, encoded, &conn, &ctl, wait).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        gov.record_failure(&task, &Manifest::new(&task.spec, &task.submitter).hash(), &e);
                        return fail(&ctl, &task, &e);
                    }
                }
            }
        };
        match sent {
            // What the answer carried and what the connection has sent in all, for the
            // benchmarks' traffic figures.
            Ok(()) => tracing::info!(
                answer_bytes,
                sent_bytes = conn.bytes_sent(),
                "{phase} done ({})",
                spec_model.as_str()
            ),
            Err(e) => tracing::warn!("cannot send the {phase} answer: {e}"),
        }
    }
    .instrument(span)
    .await
}

/// What needs no data and no model: the spec is valid and the site policy allows it.
fn precheck(task: &Task, gov: &Governance) -> Result<()> {
    fedstat_core::spec::validate(&task.spec).map_err(Error::InvalidSpec)?;
    if task.spec.secure_aggregation != task.secure.is_some() {
        // The spec the custodian approved decides; a coordinator cannot switch masking off.
        return Err(Error::SecureProtocol(
            "the task's masking does not match the experiment's secure_aggregation",
        ));
    }
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

/// SHA-256 of an answer as released: values, weight and side figures.
fn answer_digest(answer: &crate::worker::Answer) -> String {
    let mut h = Sha256::new();
    h.update(answer.values.to_le_bytes());
    h.update(answer.weight.to_le_bytes());
    for a in &answer.aux {
        h.update(a.to_le_bytes());
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
        let answer = worker.run(task, &hash, model)?;
        // A noised answer is charged to its dataset's privacy budget before anything of it is
        // recorded as given or leaves the node (a refusal here sends nothing).
        let spent = gov
            .charge_privacy(task, &hash, &answer_digest(&answer))?
            .map(Box::new);
        gov.record_binding(task, &inputs).map_err(blocked)?;
        if let Some(st) = &task.secure {
            // Only the masked form leaves the node; the coordinator never sees the answer.
            let encoded = encode_ring(
                AggregatorKind::of_phase(task.phase),
                &answer.values,
                answer.weight,
                &answer.aux,
            )
            .map_err(Error::Core)?;
            if encoded.len() as u64 != st.len.saturating_mul(st.ring.width() as u64) || st.ring != Ring::Z128
            {
                return Err(Error::SecureProtocol(
                    "the task's ring or length is not the answer's",
                ));
            }
            if task.phase == Phase::Train {
                gov.record_update(task, &hash, answer.weight, &answer.values.to_le_bytes())
                    .map_err(blocked)?;
            } else {
                gov.record_answer(task, &hash).map_err(blocked)?;
            }
            return Ok(Step::Masked { encoded, spent });
        }
        let bytes = answer.values.to_le_bytes();
        if task.phase == Phase::Train {
            gov.record_update(task, &hash, answer.weight, &bytes)
                .map_err(blocked)?;
        } else {
            gov.record_answer(task, &hash).map_err(blocked)?;
        }
        Ok(Step::Answer {
            tensor: TensorMeta {
                dtype: answer.values.dtype(),
                len: answer.values.len() as u64,
            },
            bytes,
            weight: answer.weight,
            aux: answer.aux,
            spent,
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

async fn send_answer(conn: &Connection, header: &AnswerHeader, bytes: &[u8]) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    write_frame(&mut s, &Upload::Answer(header.clone()))
        .await
        .map_err(|e| e.to_string())?;
    write_tensor(&mut s, bytes).await.map_err(|e| e.to_string())?;
    s.finish().await.map_err(|e| e.to_string())?;
    // Wait until the coordinator has all bytes, or gave up on them.
    s.stopped().await;
    Ok(())
}
