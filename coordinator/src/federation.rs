//! The one task that owns all federation state: connected nodes, experiments (each a round
//! state machine from `fedstat_core::round`) and their results. Connection tasks only send it
//! [`Event`]s; it answers through channels. No locks around round state.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use fedstat_core::aggregate::Values;
use fedstat_core::engine::{Experiment, Progress, Rejection, Transmit};
use fedstat_core::spec::ExperimentSpec;
use fedstat_net::identity::{PeerIdentity, Role};
use fedstat_proto::secure::MaskedHeader;
use fedstat_proto::wire::{
    encoded_len, AnswerHeader, CoordMsg, ExperimentId, ExperimentStatus, NodeInfo, NodeMsg, Request,
    Response, ResultsHeader, Task, TensorMeta, PROTOCOL_VERSION, STATUS_BUDGET, STATUS_PAGE_BUDGET,
    STATUS_PAGE_LEN,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::Limits;
use crate::store::Store;
use fedstat_core::audit::{AuditEvent, AuditLog};

/// What connection tasks tell the federation.
#[derive(Debug)]
pub enum Event {
    NodeUp {
        conn: u64,
        name: String,
        datasets: Vec<String>,
        tx: mpsc::UnboundedSender<NodeCmd>,
    },
    NodeDown {
        conn: u64,
        name: String,
    },
    FromNode {
        name: String,
        msg: NodeMsg,
    },
    /// An answer's header arrived; the reply says whether to read its bytes.
    AnswerBegin {
        name: String,
        header: AnswerHeader,
        reply: oneshot::Sender<Result<TensorMeta, String>>,
    },
    /// An answer's bytes were read (or failed to be).
    AnswerDone {
        name: String,
        header: AnswerHeader,
        values: Result<Values, String>,
        /// The staging slot, released after the fold: read, queued and folding updates
        /// together stay within `limits.max_concurrent_updates`.
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// A masked answer's header arrived; the reply says how many bytes to read, if any.
    MaskedBegin {
        name: String,
        header: MaskedHeader,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// A masked answer's bytes were read (or failed to be).
    MaskedDone {
        name: String,
        header: MaskedHeader,
        bytes: Result<Vec<u8>, String>,
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    Request {
        who: PeerIdentity,
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    /// Something for the audit log seen at the network edge (connections, refusals).
    Audit(AuditEvent),
}

/// What the federation tells a node's connection task.
#[derive(Debug)]
pub enum NodeCmd {
    Task {
        task: Box<Task>,
        model: Option<Arc<Vec<u8>>>,
    },
    Send(CoordMsg),
    Close(String),
}

/// A response to a researcher, with a tensor body for results.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub tensor: Option<Arc<Vec<u8>>>,
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Reply {
            response,
            tensor: None,
        }
    }
}

#[derive(Debug)]
struct NodeEntry {
    conn: u64,
    datasets: Vec<String>,
    since: Instant,
    tx: mpsc::UnboundedSender<NodeCmd>,
}

/// All state of the federation.
#[derive(Debug)]
pub struct Federation {
    nodes: BTreeMap<String, NodeEntry>,
    experiments: BTreeMap<ExperimentId, Experiment>,
    next_id: ExperimentId,
    max_params: u64,
    /// Unfinished experiments one submitter may have at once (`limits.max_experiments_per_researcher`).
    max_per_researcher: usize,
    store: Store,
    audit: Option<AuditLog>,
    /// Why the audit log cannot be written, once it could not: from then on nothing it would
    /// record happens (fail closed, as at the nodes).
    audit_down: Option<String>,
}

impl Federation {
    /// The federation as the store left it: finished experiments for `status` and `results`,
    /// running ones resumed after their last completed round as soon as nodes connect.
    pub fn new(store: Store, audit: Option<AuditLog>, limits: &Limits, now: Instant) -> crate::Result<Self> {
        let mut experiments = BTreeMap::new();
        for (id, restored) in store.load_all()? {
            let exp = Experiment::restore(id, restored, now, &[]);
            if !exp.is_finished() {
                tracing::info!(experiment = id, "resuming after round {}", exp.history().len());
            }
            experiments.insert(id, exp);
        }
        let mut fed = Federation {
            nodes: BTreeMap::new(),
            next_id: store.next_experiment_id()?,
            experiments,
            max_params: limits.max_params,
            max_per_researcher: limits.max_experiments_per_researcher,
            store,
            audit,
            audit_down: None,
        };
        let started = AuditEvent::CoordinatorStarted {
            experiments: fed.experiments.len() as u64,
        };
        if !fed.audit(now, started) {
            return Err(crate::Error::Store(format!(
                "cannot start: {}",
                fed.audit_down.unwrap_or_default()
            )));
        }
        fed.flush(now);
        Ok(fed)
    }

    /// Append to the audit log; false when the record could not be written. The log fails
    /// closed: the first failed write stops every running experiment, and the caller must not
    /// carry out the action the record was for (connections, submissions, releases).
    fn audit(&mut self, now: Instant, event: AuditEvent) -> bool {
        if self.audit_down.is_some() {
            return false;
        }
        let Some(log) = self.audit.as_mut() else {
            return true;
        };
        match tokio::task::block_in_place(|| log.append(&event)) {
            Ok(()) => true,
            Err(e) => {
                let reason = format!("the coordinator cannot write its audit log: {e}");
                tracing::error!("{reason}; stopping every running experiment and refusing new work");
                for exp in self.experiments.values_mut() {
                    exp.abort(now, reason.clone());
                }
                self.audit_down = Some(reason);
                false
            }
        }
    }

    /// Apply one event, then send whatever the experiments want sent.
    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::NodeUp {
                conn,
                name,
                datasets,
                tx,
            } => {
                if let Some(old) = self.nodes.remove(&name) {
                    // Same certificate, new connection: the node restarted or its network
                    // came back before the old connection timed out.
                    let _ = old
                        .tx
                        .send(NodeCmd::Close("replaced by a newer connection".into()));
                    self.experiments
                        .values_mut()
                        .for_each(|e| e.node_gone(now, &name));
                }
                let connected = AuditEvent::NodeConnected {
                    node: name.clone(),
                    datasets: datasets.clone(),
                };
                if !self.audit(now, connected) {
                    let _ = tx.send(NodeCmd::Close(
                        "the coordinator cannot write its audit log".into(),
                    ));
                    self.flush(now);
                    return;
                }
                tracing::info!(node = %name, datasets = ?datasets, "node connected");
                self.experiments
                    .values_mut()
                    .filter(|e| !e.is_finished())
                    .for_each(|e| e.node_available(now, &name, &datasets));
                self.nodes.insert(
                    name,
                    NodeEntry {
                        conn,
                        datasets,
                        since: now,
                        tx,
                    },
                );
            }
            Event::NodeDown { conn, name } => {
                if self.nodes.get(&name).is_some_and(|n| n.conn == conn) {
                    self.nodes.remove(&name);
                    tracing::info!(node = %name, "node disconnected");
                    self.audit(now, AuditEvent::NodeDisconnected { node: name.clone() });
                    self.experiments
                        .values_mut()
                        .for_each(|e| e.node_gone(now, &name));
                }
            }
            Event::FromNode { name, msg } => self.node_message(now, &name, msg),
            Event::AnswerBegin { name, header, reply } => {
                let answer = match self.experiments.get_mut(&header.experiment) {
                    Some(exp) => exp.begin_answer(now, &name, &header),
                    None => Err(Rejection::UnknownExperiment {
                        experiment: header.experiment,
                    }),
                };
                if let Err(rej) = &answer {
                    tracing::warn!(node = %name, round = header.round, "update refused before reading: {rej}");
                    // The state machine tells the node about the failures it records itself.
                    if rej.is_stale() {
                        self.tell(&name, header.experiment, header.round, rej.to_string());
                    }
                }
                let _ = reply.send(answer.map_err(|r| r.to_string()));
            }
            Event::AnswerDone {
                name,
                header,
                values,
                permit,
            } => {
                let result = match self.experiments.get_mut(&header.experiment) {
                    Some(exp) => exp.handle_answer(now, &name, &header, values),
                    None => Err(Rejection::UnknownExperiment {
                        experiment: header.experiment,
                    }),
                }
                .map_err(|r| r.to_string());
                drop(permit);
                if let Err(r) = &result {
                    tracing::warn!(node = %name, round = header.round, "update not used: {r}");
                }
                let received = AuditEvent::AnswerReceived {
                    node: name,
                    experiment: header.experiment,
                    round: header.round,
                    phase: header.phase.to_string(),
                    weight: header.weight,
                    values: header.tensor.len,
                    accepted: result.is_ok(),
                    reason: result.err(),
                };
                self.audit(now, received);
            }
            Event::MaskedBegin { name, header, reply } => {
                let at = header.at;
                let answer = match self.experiments.get_mut(&at.experiment) {
                    Some(exp) => exp.begin_masked(now, &name, &header),
                    None => Err(Rejection::UnknownExperiment {
                        experiment: at.experiment,
                    }),
                };
                if let Err(rej) = &answer {
                    tracing::warn!(node = %name, round = at.round, "masked answer refused before reading: {rej}");
                    if rej.is_stale() {
                        self.tell(&name, at.experiment, at.round, rej.to_string());
                    }
                }
                let _ = reply.send(answer.map_err(|r| r.to_string()));
            }
            Event::MaskedDone {
                name,
                header,
                bytes,
                permit,
            } => {
                let at = header.at;
                let result = match self.experiments.get_mut(&at.experiment) {
                    Some(exp) => exp.handle_masked(now, &name, &header, bytes),
                    None => Err(Rejection::UnknownExperiment {
                        experiment: at.experiment,
                    }),
                }
                .map_err(|r| r.to_string());
                drop(permit);
                if let Err(r) = &result {
                    tracing::warn!(node = %name, round = at.round, "masked answer not used: {r}");
                }
                let received = AuditEvent::AnswerReceived {
                    node: name,
                    experiment: at.experiment,
                    round: at.round,
                    phase: format!("{} (masked, attempt {})", at.phase, at.attempt),
                    weight: 0,
                    values: header.len,
                    accepted: result.is_ok(),
                    reason: result.err(),
                };
                self.audit(now, received);
            }
            Event::Audit(event) => {
                self.audit(now, event);
            }
            Event::Request { who, request, reply } => {
                let what = request_name(&request);
                // With the audit log down, nothing that it would record is done; reading
                // status and the node list stays possible, so operators can see why.
                let audited = !matches!(
                    request,
                    Request::Hello { .. } | Request::Status { .. } | Request::Nodes
                );
                if let (true, Some(reason)) = (audited, &self.audit_down) {
                    let message = format!("{reason}; request refused until it is repaired");
                    let _ = reply.send(Reply::from(Response::Error { message }));
                    self.flush(now);
                    return;
                }
                let mut reply_msg = self.request(now, &who, request);
                let recorded = match &reply_msg.response {
                    Response::Error { message } => {
                        let refused = AuditEvent::RequestRefused {
                            peer: who.to_string(),
                            request: Some(what.to_owned()),
                            reason: message.clone(),
                        };
                        self.audit(now, refused)
                    }
                    Response::Results(h) => {
                        let released = AuditEvent::ResultsReleased {
                            peer: who.to_string(),
                            experiment: h.status.id,
                            rounds: h.status.history.len() as u64,
                        };
                        self.audit(now, released)
                    }
                    Response::Submitted { experiment } => {
                        let hash = self
                            .experiments
                            .get(experiment)
                            .map(|e| fedstat_proto::manifest::Manifest::new(e.spec(), e.submitter()).hash());
                        let submitted = AuditEvent::ExperimentSubmitted {
                            peer: who.to_string(),
                            experiment: *experiment,
                            manifest: hash,
                        };
                        self.audit(now, submitted)
                    }
                    Response::Done { message } => {
                        let action = AuditEvent::AdminAction {
                            peer: who.to_string(),
                            request: what.to_owned(),
                            result: message.clone(),
                        };
                        self.audit(now, action)
                    }
                    _ => true,
                };
                if !recorded {
                    // Results are not released, a submission was stopped with every other
                    // experiment by `audit`; the requester learns why.
                    let message = self
                        .audit_down
                        .clone()
                        .unwrap_or_else(|| "the coordinator cannot write its audit log".into());
                    reply_msg = Reply::from(Response::Error { message });
                }
                let _ = reply.send(reply_msg);
            }
        }
        self.flush(now);
    }

    fn node_message(&mut self, now: Instant, name: &str, msg: NodeMsg) {
        match msg {
            NodeMsg::Heartbeat | NodeMsg::Hello { .. } => {}
            NodeMsg::Secure(up) => {
                let at = up.at();
                if let Some(e) = self.experiments.get_mut(&at.experiment) {
                    if let Err(rej) = e.handle_secure(now, name, up) {
                        tracing::warn!(node = %name, round = at.round, "secure aggregation message not used: {rej}");
                    }
                }
            }
            NodeMsg::PrivacySpent {
                experiment,
                round,
                epsilon,
                remaining,
            } => {
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    e.note_privacy_spent(now, name, round, epsilon, remaining);
                }
            }
            NodeMsg::Held {
                experiment,
                round,
                phase,
                manifest,
            } => {
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    e.handle_held(now, name, round, phase, &manifest);
                }
            }
            NodeMsg::TaskFailed {
                experiment,
                round,
                phase,
                reason,
            } => {
                tracing::warn!(node = %name, experiment, round, "{phase} failed at the node: {reason}");
                if let Some(e) = self.experiments.get_mut(&experiment) {
                    e.handle_failure(now, name, round, phase, &reason);
                }
            }
        }
    }

    fn tell(&self, node: &str, experiment: ExperimentId, round: u32, reason: String) {
        if let Some(n) = self.nodes.get(node) {
            let _ = n.tx.send(NodeCmd::Send(CoordMsg::Rejected {
                experiment,
                round,
                reason,
            }));
        }
    }

    /// Record what the experiments concluded, then send what they produced.
    fn flush(&mut self, now: Instant) {
        for exp in self.experiments.values_mut() {
            // Set once a write for this experiment failed: later facts are not written, so
            // the store keeps a consistent prefix (a round row never without its model, no
            // event after a missing round) and a restart resumes from what is on disk.
            let mut store_failed = false;
            while let Some(p) = exp.poll_progress() {
                let id = exp.id();
                if store_failed {
                    // Nothing after a failed write: the store keeps a consistent prefix and
                    // still says `running`, so a restart resumes after the last recorded round.
                    continue;
                }
                // Writes are synchronous: when `status` shows a round, it is on disk.
                let written = tokio::task::block_in_place(|| match &p {
                    Progress::Standardized(st) => self.store.set_standardization(id, st),
                    Progress::RoundCompleted { record, model } => self.store.record_round(id, record, model),
                    Progress::Finished(state) => self.store.set_state(id, state),
                    Progress::Event(e) => self.store.append_event(id, e),
                    Progress::Output(o) => self.store.set_output(id, o),
                });
                if let Err(e) = written {
                    // Fail safe: never carry on in memory with progress that is not on disk.
                    let reason = format!("the store cannot record progress ({e}); stopped so that nothing runs that is not on disk");
                    tracing::error!(experiment = id, "{reason}");
                    exp.abort(now, reason);
                    store_failed = true;
                }
            }
            while let Some(t) = exp.poll_transmit() {
                match t {
                    Transmit::Task { to, task, model } => {
                        if let Some(n) = self.nodes.get(&to) {
                            let _ = n.tx.send(NodeCmd::Task { task, model });
                        }
                    }
                    Transmit::Secure { to, msg } => {
                        if let Some(n) = self.nodes.get(&to) {
                            let _ = n.tx.send(NodeCmd::Send(CoordMsg::Secure(msg)));
                        }
                    }
                    Transmit::Reject {
                        to,
                        experiment,
                        round,
                        reason,
                    } => {
                        if let Some(n) = self.nodes.get(&to) {
                            let _ = n.tx.send(NodeCmd::Send(CoordMsg::Rejected {
                                experiment,
                                round,
                                reason,
                            }));
                        }
                    }
                }
            }
        }
    }

    /// The earliest deadline of any experiment.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.experiments.values().filter_map(|e| e.poll_timeout()).min()
    }

    pub fn on_timeout(&mut self, now: Instant) {
        for exp in self.experiments.values_mut() {
            if exp.poll_timeout().is_some_and(|t| t <= now) {
                exp.handle_timeout(now);
            }
        }
        self.flush(now);
    }

    fn request(&mut self, now: Instant, who: &PeerIdentity, request: Request) -> Reply {
        let refuse = |message: String| Reply::from(Response::Error { message });
        if let Err(message) = permission(who, &request) {
            return refuse(message);
        }
        match request {
            Request::Hello { .. } => Response::Welcome {
                protocol: PROTOCOL_VERSION,
                name: who.name.clone(),
                role: who.role,
            }
            .into(),
            Request::Submit { spec } => match self.submit(now, who, *spec) {
                Ok(id) => Response::Submitted { experiment: id }.into(),
                Err(message) => refuse(message),
            },
            Request::Status {
                experiment: Some(id), ..
            } => match self.visible(who, id) {
                Ok(e) => {
                    let mut status = e.status();
                    status.fit(STATUS_BUDGET);
                    Response::Status {
                        experiments: vec![status],
                        next: None,
                    }
                    .into()
                }
                Err(message) => refuse(message),
            },
            Request::Status {
                experiment: None,
                after,
            } => {
                let (experiments, next) = self.status_page(who, after);
                Response::Status { experiments, next }.into()
            }
            Request::Nodes => Response::Nodes {
                nodes: self
                    .nodes
                    .iter()
                    .map(|(name, n)| NodeInfo {
                        name: name.clone(),
                        datasets: n.datasets.clone(),
                        // When an office's node comes and goes says something about that
                        // office; researchers need only names and datasets to plan.
                        connected_secs: (who.role == Role::Admin)
                            .then(|| now.saturating_duration_since(n.since).as_secs()),
                    })
                    .collect(),
            }
            .into(),
            Request::Results { experiment, round } => match self.results(who, experiment, round) {
                Ok(reply) => reply,
                Err(message) => refuse(message),
            },
            Request::Cancel { experiment } => {
                let e = match self.experiments.get_mut(&experiment) {
                    Some(e) if may_see(who, e.submitter()) => e,
                    _ => return refuse(not_visible(who, experiment)),
                };
                if e.is_finished() {
                    return refuse(format!(
                        "experiment {experiment} has already ended: {}",
                        e.state()
                    ));
                }
                e.cancel(now, &who.to_string());
                Response::Done {
                    message: format!("experiment {experiment} cancelled"),
                }
                .into()
            }
            Request::Disconnect { node } => {
                let Some(n) = self.nodes.get(&node) else {
                    return refuse(format!("no node `{node}` is connected"));
                };
                let _ = n.tx.send(NodeCmd::Close(format!("disconnected by {who}")));
                Response::Done {
                    message: format!("node `{node}` disconnected"),
                }
                .into()
            }
        }
    }

    /// The statuses of the experiments `who` may see after `after`, in id order, and the `after`
    /// of the next page if one follows. A page holds at most `STATUS_PAGE_LEN` statuses, each
    /// cut to `STATUS_BUDGET`, within `STATUS_PAGE_BUDGET` encoded bytes, so any number of
    /// experiments with any history can be listed in frames of `MAX_FRAME`. The filter comes
    /// first, so `next` is always one of `who`'s own experiments.
    fn status_page(
        &self,
        who: &PeerIdentity,
        after: Option<ExperimentId>,
    ) -> (Vec<ExperimentStatus>, Option<ExperimentId>) {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut visible = self
            .experiments
            .range((from, Bound::Unbounded))
            .map(|(_, e)| e)
            .filter(|e| may_see(who, e.submitter()))
            .peekable();
        let (mut page, mut used) = (Vec::new(), 0usize);
        while let Some(e) = visible.peek() {
            if page.len() >= STATUS_PAGE_LEN {
                break;
            }
            let mut status = e.status();
            status.fit(STATUS_BUDGET);
            let size = encoded_len(&status).unwrap_or(usize::MAX);
            // The first always goes in (it fits its budget), so every page advances.
            if !page.is_empty() && used.saturating_add(size) > STATUS_PAGE_BUDGET {
                break;
            }
            used = used.saturating_add(size);
            page.push(status);
            visible.next();
        }
        let next = match visible.peek() {
            Some(_) => page.last().map(|s| s.id),
            None => None,
        };
        (page, next)
    }

    /// The experiment `id` if `who` may see it. Someone else's experiment is refused with the
    /// same words as a missing one, so a researcher cannot learn that it exists.
    fn visible(&self, who: &PeerIdentity, id: ExperimentId) -> Result<&Experiment, String> {
        self.experiments
            .get(&id)
            .filter(|e| may_see(who, e.submitter()))
            .ok_or_else(|| not_visible(who, id))
    }

    fn results(
        &self,
        who: &PeerIdentity,
        experiment: ExperimentId,
        round: Option<u32>,
    ) -> Result<Reply, String> {
        let e = self.visible(who, experiment)?;
        let last = e.history().last().map(|r| r.round);
        let Some(last) = last else {
            return Err(format!("experiment {experiment} has no completed round yet"));
        };
        let mut status = e.status();
        let values = match round {
            None => e.global_shared(),
            Some(k) if k == last => e.global_shared(),
            Some(k) if k == 0 || k > last => {
                return Err(format!(
                    "experiment {experiment} has completed rounds 1 to {last}; round {k} is not among them"
                ))
            }
            Some(k) => {
                let stored = tokio::task::block_in_place(|| self.store.load_model(experiment, k))
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("round {k} of experiment {experiment} is not in the store (the coordinator runs without one)"))?;
                status.history.truncate(k as usize);
                Arc::new(stored)
            }
        };
        Ok(Reply {
            response: Response::Results(Box::new(ResultsHeader {
                status,
                spec: e.spec().clone(),
                columns: e.spec().design_columns(),
                standardization: e.standardization().cloned(),
                tensor: TensorMeta {
                    dtype: values.dtype(),
                    len: values.len() as u64,
                },
                output: e.output().cloned(),
            })),
            tensor: Some(Arc::new(values.to_le_bytes())),
        })
    }

    fn submit(
        &mut self,
        now: Instant,
        who: &PeerIdentity,
        mut spec: ExperimentSpec,
    ) -> Result<ExperimentId, String> {
        if spec.office_effects && spec.offices.is_empty() {
            // One indicator per office: the offices connected now that offer the dataset, in
            // name order (the first is the reference). Part of the manifest custodians approve.
            spec.offices = self
                .nodes
                .iter()
                .filter(|(_, n)| n.datasets.contains(&spec.dataset))
                .map(|(name, _)| name.clone())
                .collect();
            if spec.offices.len() < 2 {
                return Err(format!(
                    "office_effects needs at least two connected offices offering dataset `{}`; \
                     list them in `offices` or submit when they are connected",
                    fedstat_core::text::printable(&spec.dataset)
                ));
            }
        }
        fedstat_core::spec::validate(&spec).map_err(|e| e.to_string())?;
        if spec.num_params() > self.max_params {
            return Err(format!(
                "the model has {} parameters; this coordinator accepts at most {}",
                spec.num_params(),
                self.max_params
            ));
        }
        let submitter = who.to_string();
        let running = self
            .experiments
            .values()
            .filter(|e| !e.is_finished() && e.submitter() == submitter)
            .count();
        check_quota(running, self.max_per_researcher)?;
        let id = self.next_id;
        tokio::task::block_in_place(|| self.store.insert_experiment(id, &spec, &who.to_string()))
            .map_err(|e| format!("the coordinator cannot record the experiment: {e}"))?;
        self.next_id += 1;
        let connected: Vec<(String, Vec<String>)> = self
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.datasets.clone()))
            .collect();
        let exp = Experiment::new(id, spec, who.to_string(), now, &connected);
        tracing::info!(experiment = id, submitter = %who, name = %exp.spec().name, "experiment submitted");
        self.experiments.insert(id, exp);
        Ok(id)
    }
}

/// Whether `who` may make `request` at all, from its role and the kind of request alone: only
/// researchers and admins make requests, and only admins disconnect nodes. Requests about one
/// experiment (status, results, cancel) are further limited to the experiments [`may_see`]
/// allows, and the list of statuses to those; that needs the experiment, so it is checked
/// where the experiment is looked up.
fn permission(who: &PeerIdentity, request: &Request) -> Result<(), String> {
    match (who.role, request) {
        (Role::Node | Role::Coordinator, _) => Err(format!("{who} may not make researcher requests")),
        (Role::Researcher, Request::Disconnect { .. }) => {
            Err(format!("only an admin may disconnect nodes; {who} is not one"))
        }
        (Role::Researcher | Role::Admin, _) => Ok(()),
    }
}

/// Whether `who` may see (status, watch, events, results) and cancel an experiment submitted by
/// `submitter`: its submitter may, an admin may, nobody else. `submitter` is the identity's
/// display form (`researcher `alice``), so a researcher and an admin of the same name differ.
fn may_see(who: &PeerIdentity, submitter: &str) -> bool {
    match who.role {
        Role::Admin => true,
        Role::Researcher => submitter == who.to_string(),
        Role::Node | Role::Coordinator => false,
    }
}

/// The refusal for an experiment that is missing or not `who`'s: one text for both.
fn not_visible(who: &PeerIdentity, id: ExperimentId) -> String {
    format!("no experiment {id} visible to {who}")
}

/// Refuse a submission when the submitter already has `limit` unfinished experiments: one
/// researcher must not be able to occupy the federation's nodes alone.
fn check_quota(unfinished: usize, limit: usize) -> Result<(), String> {
    if unfinished >= limit {
        return Err(format!(
            "you already have {unfinished} unfinished experiment(s); this coordinator allows {limit} at once \
             (limits.max_experiments_per_researcher): wait for one to end or cancel one"
        ));
    }
    Ok(())
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "hello",
        Request::Submit { .. } => "submit",
        Request::Status { .. } => "status",
        Request::Nodes => "nodes",
        Request::Results { .. } => "results",
        Request::Cancel { .. } => "cancel",
        Request::Disconnect { .. } => "disconnect",
    }
}

/// Run the federation until every sender of `rx` is gone.
pub async fn run(mut fed: Federation, mut rx: mpsc::Receiver<Event>) {
    loop {
        let deadline = fed.next_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => fed.handle(Instant::now(), event),
                None => break,
            },
            () = sleep => fed.on_timeout(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every role against every kind of request: who may ask at all.
    #[test]
    fn request_permissions_by_role() {
        let requests = [
            Request::Hello { protocol: 3 },
            Request::Submit { spec: echo() },
            Request::Status {
                experiment: Some(1),
                after: None,
            },
            Request::Status {
                experiment: None,
                after: None,
            },
            Request::Nodes,
            Request::Results {
                experiment: 1,
                round: None,
            },
            Request::Cancel { experiment: 1 },
            Request::Disconnect { node: "n".into() },
        ];
        // (role, requests allowed, by name); everything else is refused.
        let table: [(Role, &[&str]); 4] = [
            (
                Role::Admin,
                &[
                    "hello",
                    "submit",
                    "status",
                    "nodes",
                    "results",
                    "cancel",
                    "disconnect",
                ],
            ),
            (
                Role::Researcher,
                &["hello", "submit", "status", "nodes", "results", "cancel"],
            ),
            (Role::Node, &[]),
            (Role::Coordinator, &[]),
        ];
        for (role, allowed) in table {
            let who = peer(role, "x");
            for r in &requests {
                let got = permission(&who, r);
                let want = allowed.contains(&request_name(r));
                assert_eq!(got.is_ok(), want, "{role} {}: {got:?}", request_name(r));
                if let Err(e) = got {
                    assert!(e.contains(&who.to_string()), "{e}");
                }
            }
        }
    }

    fn peer(role: Role, name: &str) -> PeerIdentity {
        PeerIdentity {
            role,
            name: name.into(),
        }
    }

    #[test]
    fn who_may_see_an_experiment() {
        use Role::*;
        // (asking role, asking name, submitter, allowed)
        let cases = [
            (Researcher, "alice", "researcher `alice`", true),
            (Researcher, "bob", "researcher `alice`", false),
            (Researcher, "alice", "admin `alice`", false),
            (Researcher, "alic", "researcher `alice`", false),
            (Admin, "root", "researcher `alice`", true),
            (Admin, "root", "admin `other`", true),
            (Node, "alice", "researcher `alice`", false),
            (Node, "n1", "node `n1`", false),
            (Coordinator, "c", "coordinator `c`", false),
        ];
        for (role, name, submitter, want) in cases {
            assert_eq!(
                may_see(&peer(role, name), submitter),
                want,
                "{role} {name} on {submitter}"
            );
        }
    }

    #[test]
    fn quota_counts_unfinished_experiments() {
        // (unfinished, limit, allowed)
        for (unfinished, limit, ok) in [
            (0, 1, true),
            (0, 4, true),
            (3, 4, true),
            (4, 4, false),
            (1, 1, false),
            (9, 4, false),
        ] {
            let got = check_quota(unfinished, limit);
            assert_eq!(got.is_ok(), ok, "{unfinished} of {limit}");
            if let Err(m) = got {
                assert!(m.contains("limits.max_experiments_per_researcher"), "{m}");
            }
        }
    }

    fn federation(max_per_researcher: usize) -> Federation {
        let limits = Limits {
            max_connections: 10,
            max_handshakes: 10,
            max_handshakes_per_address: 10,
            retry_above_handshakes: 10,
            max_connections_per_address: 10,
            max_connections_per_identity: 10,
            max_concurrent_updates: 1,
            max_params: 1000,
            handshake_timeout: std::time::Duration::from_secs(1),
            max_experiments_per_researcher: max_per_researcher,
        };
        Federation::new(Store::in_memory(), None, &limits, Instant::now()).expect("federation")
    }

    fn echo() -> Box<ExperimentSpec> {
        let text = "name = \"echo\"\nmodel = \"echo\"\nrounds = 2\nmin_nodes = 1\n[echo]\nparams = 4\n";
        Box::new(toml::from_str(text).expect("echo spec"))
    }

    fn submit(fed: &mut Federation, who: &PeerIdentity) -> Response {
        fed.request(Instant::now(), who, Request::Submit { spec: echo() })
            .response
    }

    fn ask(fed: &mut Federation, who: &PeerIdentity, request: Request) -> Response {
        fed.request(Instant::now(), who, request).response
    }

    fn refusal(r: Response) -> String {
        match r {
            Response::Error { message } => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn ids(r: Response) -> Vec<ExperimentId> {
        match r {
            Response::Status { experiments, .. } => experiments.iter().map(|s| s.id).collect(),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    /// The ids in `who`'s (first page of) status of `experiment`, or of every experiment.
    fn status_ids(
        fed: &mut Federation,
        who: &PeerIdentity,
        experiment: Option<ExperimentId>,
    ) -> Vec<ExperimentId> {
        ids(ask(
            fed,
            who,
            Request::Status {
                experiment,
                after: None,
            },
        ))
    }

    // block_in_place (store writes) needs the multi-threaded runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn researchers_see_only_their_own_experiments() {
        let mut fed = federation(4);
        let (alice, bob, root) = (
            peer(Role::Researcher, "alice"),
            peer(Role::Researcher, "bob"),
            peer(Role::Admin, "root"),
        );
        assert_eq!(submit(&mut fed, &alice), Response::Submitted { experiment: 1 });
        assert_eq!(submit(&mut fed, &root), Response::Submitted { experiment: 2 });

        // Bob cannot tell alice's experiment 1 from the missing experiment 9.
        let missing = refusal(ask(
            &mut fed,
            &bob,
            Request::Status {
                experiment: Some(9),
                after: None,
            },
        ));
        assert_eq!(missing, "no experiment 9 visible to researcher `bob`");
        for request in [
            Request::Status {
                experiment: Some(1),
                after: None,
            },
            Request::Results {
                experiment: 1,
                round: None,
            },
            Request::Results {
                experiment: 1,
                round: Some(1),
            },
            Request::Cancel { experiment: 1 },
        ] {
            let what = format!("{request:?}");
            assert_eq!(
                refusal(ask(&mut fed, &bob, request)),
                missing.replace('9', "1"),
                "{what}"
            );
        }
        assert_eq!(status_ids(&mut fed, &bob, None), Vec::<u64>::new());
        assert_eq!(status_ids(&mut fed, &alice, None), [1]);
        assert_eq!(status_ids(&mut fed, &root, None), [1, 2]);
        assert_eq!(status_ids(&mut fed, &alice, Some(1)), [1]);
        assert_eq!(status_ids(&mut fed, &root, Some(1)), [1]);
        // Alice may not see the admin's experiment either.
        assert_eq!(
            refusal(ask(
                &mut fed,
                &alice,
                Request::Status {
                    experiment: Some(2),
                    after: None
                }
            )),
            "no experiment 2 visible to researcher `alice`"
        );
        // Results for the owner get past the permission check (no round has completed yet).
        let early = refusal(ask(
            &mut fed,
            &alice,
            Request::Results {
                experiment: 1,
                round: None,
            },
        ));
        assert!(early.contains("no completed round"), "{early}");
        // The admin may cancel anyone's experiment.
        assert!(matches!(
            ask(&mut fed, &root, Request::Cancel { experiment: 1 }),
            Response::Done { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn only_admins_see_how_long_nodes_are_connected() {
        let mut fed = federation(4);
        let (tx, _rx) = mpsc::unbounded_channel();
        fed.handle(
            Instant::now(),
            Event::NodeUp {
                conn: 1,
                name: "west".into(),
                datasets: vec!["cps1988".into()],
                tx,
            },
        );
        let nodes = |fed: &mut Federation, who: &PeerIdentity| match ask(fed, who, Request::Nodes) {
            Response::Nodes { nodes } => nodes,
            other => panic!("expected nodes, got {other:?}"),
        };
        let seen = nodes(&mut fed, &peer(Role::Researcher, "bob"));
        assert_eq!(
            seen,
            [NodeInfo {
                name: "west".into(),
                datasets: vec!["cps1988".into()],
                connected_secs: None,
            }]
        );
        let seen = nodes(&mut fed, &peer(Role::Admin, "root"));
        assert_eq!(seen.len(), 1);
        assert!(seen[0].connected_secs.is_some(), "{seen:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn unfinished_experiments_per_researcher_are_limited() {
        let mut fed = federation(2);
        let (alice, bob, root) = (
            peer(Role::Researcher, "alice"),
            peer(Role::Researcher, "bob"),
            peer(Role::Admin, "root"),
        );
        // No node is connected: every experiment waits, unfinished.
        assert!(matches!(submit(&mut fed, &alice), Response::Submitted { .. }));
        assert!(matches!(submit(&mut fed, &alice), Response::Submitted { .. }));
        let refused = refusal(submit(&mut fed, &alice));
        assert!(
            refused.contains("limits.max_experiments_per_researcher"),
            "{refused}"
        );
        assert!(refused.contains("allows 2"), "{refused}");
        // Others have their own allowance; admins are limited too.
        assert!(matches!(submit(&mut fed, &bob), Response::Submitted { .. }));
        assert!(matches!(submit(&mut fed, &root), Response::Submitted { .. }));
        assert!(matches!(submit(&mut fed, &root), Response::Submitted { .. }));
        assert!(refusal(submit(&mut fed, &root)).contains("limits.max_experiments_per_researcher"));
        // A finished experiment no longer counts.
        assert!(matches!(
            ask(&mut fed, &alice, Request::Cancel { experiment: 1 }),
            Response::Done { .. }
        ));
        assert!(matches!(submit(&mut fed, &alice), Response::Submitted { .. }));
        assert!(refusal(submit(&mut fed, &alice)).contains("limits.max_experiments_per_researcher"));
    }

    /// Every page of the list as `who`: (ids, encoded frame size) per page.
    fn pages(fed: &mut Federation, who: &PeerIdentity) -> Vec<(Vec<ExperimentId>, usize)> {
        let mut after = None;
        let mut out = Vec::new();
        loop {
            let response = ask(
                fed,
                who,
                Request::Status {
                    experiment: None,
                    after,
                },
            );
            let size = fedstat_proto::wire::encode_frame(&response)
                .expect("a page fits a frame")
                .len();
            let Response::Status { experiments, next } = response else {
                panic!("expected a status, got {response:?}");
            };
            out.push((experiments.iter().map(|s| s.id).collect(), size));
            match next {
                Some(n) => {
                    assert_eq!(
                        Some(n),
                        experiments.last().map(|s| s.id),
                        "next is the page's last"
                    );
                    after = Some(n);
                }
                None => return out,
            }
            assert!(out.len() < 1000, "pages do not end");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_experiment_list_comes_in_pages_of_ones_own() {
        let mut fed = federation(1000);
        let (alice, bob, root) = (
            peer(Role::Researcher, "alice"),
            peer(Role::Researcher, "bob"),
            peer(Role::Admin, "root"),
        );
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for i in 0..200 {
            let (who, ids) = if i % 7 == 3 {
                (&bob, &mut theirs)
            } else {
                (&alice, &mut mine)
            };
            match submit(&mut fed, who) {
                Response::Submitted { experiment } => ids.push(experiment),
                other => panic!("expected a submission, got {other:?}"),
            }
        }
        for (who, want) in [(&alice, &mine), (&bob, &theirs)] {
            let got = pages(&mut fed, who);
            assert_eq!(got.concat_ids(), *want, "{who}");
            for (ids, size) in &got {
                assert!(ids.len() <= STATUS_PAGE_LEN, "{who}: {}", ids.len());
                assert!(*size <= STATUS_PAGE_BUDGET + 64, "{who}: {size}");
            }
        }
        let all = pages(&mut fed, &root);
        assert_eq!(all.len(), 200_usize.div_ceil(STATUS_PAGE_LEN));
        assert_eq!(all.concat_ids(), (1..=200).collect::<Vec<_>>());
        // A page after the last experiment is empty and final.
        assert_eq!(
            ask(
                &mut fed,
                &alice,
                Request::Status {
                    experiment: None,
                    after: Some(10_000)
                }
            ),
            Response::Status {
                experiments: vec![],
                next: None
            }
        );
    }

    trait ConcatIds {
        fn concat_ids(&self) -> Vec<ExperimentId>;
    }

    impl ConcatIds for Vec<(Vec<ExperimentId>, usize)> {
        fn concat_ids(&self) -> Vec<ExperimentId> {
            self.iter().flat_map(|(ids, _)| ids.iter().copied()).collect()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn status_answers_stay_under_the_frame_limit() {
        let mut fed = federation(100);
        let alice = peer(Role::Researcher, "alice");
        // 250 nodes each fail with a reason of 5 kB (a node's frame may hold 1 MiB): the event
        // log of each experiment alone is more than a frame.
        let mut links = Vec::new();
        for n in 0..250 {
            let (tx, rx) = mpsc::unbounded_channel();
            links.push(rx);
            fed.handle(
                Instant::now(),
                Event::NodeUp {
                    conn: n,
                    name: format!("office-{n}"),
                    datasets: vec![],
                    tx,
                },
            );
        }
        for _ in 0..3 {
            let Response::Submitted { experiment } = submit(&mut fed, &alice) else {
                panic!("not submitted");
            };
            for n in 0..250 {
                fed.handle(
                    Instant::now(),
                    Event::FromNode {
                        name: format!("office-{n}"),
                        msg: NodeMsg::TaskFailed {
                            experiment,
                            round: 1,
                            phase: fedstat_proto::wire::Phase::Train,
                            reason: "x".repeat(5000),
                        },
                    },
                );
            }
        }
        let whole = fed.experiments[&1].status();
        assert!(
            fedstat_proto::wire::encode_frame(&whole).is_err(),
            "the test needs a status too large for a frame"
        );
        let one = ask(
            &mut fed,
            &alice,
            Request::Status {
                experiment: Some(1),
                after: None,
            },
        );
        let frame = fedstat_proto::wire::encode_frame(&one).expect("one status fits a frame");
        assert!(frame.len() <= STATUS_BUDGET + 64, "{}", frame.len());
        let Response::Status { experiments, next } = one else {
            panic!("expected a status");
        };
        assert_eq!(next, None);
        let events = &experiments[0].events;
        let (last, newest) = (
            events.last().expect("events are kept"),
            whole.events.last().expect("events"),
        );
        assert_eq!(last.at_ms, newest.at_ms, "the newest event is kept");
        assert!(newest
            .message
            .starts_with(last.message.trim_end_matches(" [...]")));
        assert!(
            events
                .iter()
                .any(|e| e.message.contains("could not do training: xxx") && e.message.ends_with("[...]")),
            "{:?}",
            events
                .iter()
                .map(|e| &e.message[..e.message.len().min(80)])
                .collect::<Vec<_>>()
        );
        // The list pages them: three statuses of about a quarter frame do not share one page.
        let got = pages(&mut fed, &alice);
        assert_eq!(got.concat_ids(), [1, 2, 3]);
        assert!(got.len() >= 2, "{:?}", got);
        for (_, size) in &got {
            assert!(*size <= STATUS_PAGE_BUDGET + 64, "{size}");
        }
    }
}
