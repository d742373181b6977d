//! The wire protocol: the only types that cross the network, and their byte encoding.
//!
//! Every QUIC stream carries length-prefixed frames: a 4-byte big-endian length, then a postcard
//! (1.x: varint integers, no field names, explicit size limit checked here) payload. Model parameters never travel inside a
//! frame: a frame announces a tensor (`dtype`, `len`) and its little-endian bytes follow raw on
//! the same stream, so a receiver can fold them chunk by chunk.
//!
//! Streams:
//! - node -> coordinator, first bidirectional stream: the control stream. The node sends
//!   [`NodeMsg::Hello`], the coordinator answers [`CoordMsg::Welcome`] or [`CoordMsg::Refused`];
//!   then both sides send control messages on it for the life of the connection.
//! - coordinator -> node, one unidirectional stream per task: a [`Task`] frame, then the global
//!   model's bytes when the task carries one.
//! - node -> coordinator, one unidirectional stream per answer: an [`AnswerHeader`] frame, then
//!   the answer's bytes (every phase: statistics, training, evaluation).
//! - researcher -> coordinator, one bidirectional stream per request: a [`Request`] frame, then a
//!   [`Response`] frame (followed by a tensor's bytes for [`Response::Results`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::spec::{ExperimentSpec, ModelKind};
use crate::sums::{Metrics, Standardization};
use crate::Role;
use crate::{Error, Result};

/// Version of this protocol; both sides check it in the first exchange. Version 2: a node's
/// connection time is shown to admins only ([`NodeInfo::connected_secs`]); the list of
/// experiments comes in pages ([`Request::Status`]). Version 3: every answer is a vector on
/// its own stream ([`AnswerHeader`]); statistics and evaluation no longer travel on the
/// control stream. Version 5: secure aggregation ([`crate::secure`]): tasks say whether their
/// step is secure, answers travel as [`Upload`]s (plain or masked), nodes report the privacy
/// budget they spent.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest control frame payload. Evaluation sums (two 4096-bin histograms) and an experiment
/// spec fit comfortably; anything larger is an attack or a bug.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest encoded [`ExperimentStatus`] in a status answer ([`ExperimentStatus::fit`]): a
/// quarter of a frame, so one always fits in a page.
pub const STATUS_BUDGET: usize = MAX_FRAME / 4;

/// Largest encoded page of statuses: half a frame leaves room for the response around it.
pub const STATUS_PAGE_BUDGET: usize = MAX_FRAME / 2;

/// Most statuses in one page, whatever their size: bounds the coordinator's work per request.
pub const STATUS_PAGE_LEN: usize = 64;

/// Longest event text kept when a status must be cut to fit ([`ExperimentStatus::fit`]).
const MAX_EVENT_TEXT: usize = 4096;

/// Experiment identifier, assigned by the coordinator.
pub type ExperimentId = u64;

/// Element type of a tensor on the wire (little-endian IEEE 754).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Announces a tensor whose bytes follow the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    pub dtype: DType,
    pub len: u64,
}

impl TensorMeta {
    /// Byte length of the tensor body.
    pub fn byte_len(&self) -> Result<u64> {
        self.len
            .checked_mul(self.dtype.size() as u64)
            .ok_or_else(|| Error::Wire {
                what: "tensor header",
                problem: "length overflows".into(),
            })
    }
}

/// Phase of an experiment a task or a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Sums of n, x and x^2 over train rows, for pooled standardisation.
    Stats,
    /// Local training from the global model; answered by an update.
    Train,
    /// Scoring the global model on local test rows; answered by evaluation sums.
    Evaluate,
    /// One Newton/IRLS step of an exact GLM at the sent coefficients; answered by the sums
    /// XᵀWX, XᵀWz, the deviance and the other figures of `fedstat_core::algorithm::glm`.
    Glm,
    /// Cells of a federated table; answered by its counts and sums.
    Table,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Stats => "statistics",
            Phase::Train => "training",
            Phase::Evaluate => "evaluation",
            Phase::Glm => "GLM sums",
            Phase::Table => "table cells",
        })
    }
}

/// Work the coordinator gives a node. Self-contained: a node keeps no experiment state between
/// tasks, so a restarted node can take part in the next round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub experiment: ExperimentId,
    pub round: u32,
    pub phase: Phase,
    /// Who submitted the experiment (`researcher `name``): part of its manifest.
    pub submitter: String,
    pub spec: ExperimentSpec,
    /// Pooled standardisation, from the statistics phase (absent in it and for `echo`).
    pub standardization: Option<Standardization>,
    /// The global model, whose bytes follow the frame (Train and Evaluate).
    pub model: Option<TensorMeta>,
    /// Present when the step is a secure sum: the answer is masked, not sent in clear.
    pub secure: Option<crate::secure::SecureTask>,
}

/// A node's answer to a task: one vector, summed exactly over the nodes by the coordinator's
/// engine. Its bytes follow the frame on a unidirectional stream of its own. Every phase
/// answers this way (statistics, training, evaluation, and what later algorithms ask), so one
/// path carries, bounds and folds them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerHeader {
    pub experiment: ExperimentId,
    pub round: u32,
    pub phase: Phase,
    /// The answer's weight in a weighted mean (training rows, rounded by the node's policy);
    /// 1 for answers that are plain sums.
    pub weight: u64,
    /// A few side figures summed with the same weight (training: the mean local loss).
    pub aux: Vec<f64>,
    pub tensor: TensorMeta,
}

/// What opens a node's unidirectional stream to the coordinator: an answer in clear, or a
/// masked answer of a secure step (its ring elements follow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Upload {
    Answer(AnswerHeader),
    Masked(crate::secure::MaskedHeader),
}

/// Most side figures an answer may carry ([`AnswerHeader::aux`]).
pub const MAX_AUX: usize = 16;

/// Messages from a node on its control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    Hello {
        protocol: u32,
        software: String,
        /// Names of the datasets the node offers; never anything about their content.
        datasets: Vec<String>,
    },
    Heartbeat,
    /// The node holds the task until its data custodian approves the experiment's manifest
    /// (see [`crate::manifest`]). It can take part once approved.
    Held {
        experiment: ExperimentId,
        round: u32,
        phase: Phase,
        /// SHA-256 of the manifest awaiting approval.
        manifest: String,
    },
    /// The node could not do a task. `reason` is written for the researcher and carries no
    /// data values (file, line and column at most).
    TaskFailed {
        experiment: ExperimentId,
        round: u32,
        phase: Phase,
        reason: String,
    },
    /// A step of secure aggregation ([`crate::secure`]).
    Secure(crate::secure::SecureUp),
    /// The record-level privacy this node's ledger charged the experiment so far, in ε at
    /// the experiment's δ; `remaining` only if the node's policy lets researchers see it.
    PrivacySpent {
        experiment: ExperimentId,
        round: u32,
        epsilon: f64,
        remaining: Option<f64>,
    },
}

/// Messages from the coordinator on a node's control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    Welcome {
        protocol: u32,
        name: String,
    },
    Refused {
        reason: String,
    },
    Heartbeat,
    /// The coordinator dropped this node's update or answer (validation, late, duplicate).
    Rejected {
        experiment: ExperimentId,
        round: u32,
        reason: String,
    },
    /// A step of secure aggregation ([`crate::secure`]).
    Secure(crate::secure::SecureDown),
}

/// A researcher's (or admin's) request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Hello {
        protocol: u32,
    },
    Submit {
        spec: Box<ExperimentSpec>,
    },
    /// One experiment (`Some`), or a page of the experiments the caller may see, in id order
    /// from the first after `after` (`experiment: None`); `after` is ignored for one experiment.
    Status {
        experiment: Option<ExperimentId>,
        after: Option<ExperimentId>,
    },
    Nodes,
    /// The model after round `round` (default: the latest).
    Results {
        experiment: ExperimentId,
        round: Option<u32>,
    },
    /// Stop an experiment: its submitter, or an admin.
    Cancel {
        experiment: ExperimentId,
    },
    /// Close a node's connection (admin only); the node reconnects unless stopped or revoked.
    Disconnect {
        node: String,
    },
}

/// State of an experiment as researchers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExperimentState {
    /// Waiting until `min_nodes` nodes offering the dataset are connected.
    Waiting,
    Running {
        phase: Phase,
    },
    Completed,
    Failed {
        reason: String,
    },
    Cancelled {
        by: String,
    },
}

impl ExperimentState {
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            ExperimentState::Completed | ExperimentState::Failed { .. } | ExperimentState::Cancelled { .. }
        )
    }
}

impl std::fmt::Display for ExperimentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExperimentState::Waiting => f.write_str("waiting for nodes"),
            ExperimentState::Running { phase } => write!(f, "running ({phase})"),
            ExperimentState::Completed => f.write_str("completed"),
            ExperimentState::Failed { reason } => write!(f, "failed: {reason}"),
            ExperimentState::Cancelled { by } => write!(f, "cancelled by {by}"),
        }
    }
}

/// What one completed round produced. Pooled figures only: per-node metrics are never kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    /// Names of the nodes whose update is in the aggregate, sorted.
    pub participants: Vec<String>,
    pub total_examples: u64,
    /// Example-weighted mean of the nodes' local training losses.
    pub train_loss: f64,
    /// Pooled test metrics of the aggregated model (None for `echo`, or if no node answered).
    pub metrics: Option<Metrics>,
    /// Wall time of the training phase (broadcast, local training, upload, aggregation).
    pub train_ms: u64,
    /// Wall time of the whole round including evaluation.
    pub round_ms: u64,
    /// How many times this round was tried again after missing its quorum.
    pub retries: u32,
}

/// One line of an experiment's event log (drop-outs, rejections, retries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Milliseconds since the experiment was submitted.
    pub at_ms: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentStatus {
    pub id: ExperimentId,
    pub name: String,
    pub model: ModelKind,
    pub submitter: String,
    pub state: ExperimentState,
    /// Rounds completed so far.
    pub rounds_done: u32,
    pub rounds: u32,
    /// Nodes taking part in the current phase.
    pub participants: Vec<String>,
    pub history: Vec<RoundRecord>,
    pub events: Vec<EventRecord>,
    /// Secure aggregation, differential privacy and each node's ε spent.
    pub privacy: crate::privacy::PrivacyView,
}

impl ExperimentStatus {
    /// Cut this status so that it encodes to at most `budget` bytes (when the fixed fields
    /// allow: names are bounded by spec validation). Nothing is cut from a status that fits.
    /// Otherwise long event texts are shortened, the current participants dropped if even
    /// the rest is too large, and the newest events and rounds kept, up to half the room
    /// each and what the other leaves over; `rounds_done` still counts every round, and the
    /// whole history is in `results`.
    pub fn fit(&mut self, budget: usize) {
        if encoded_len(self).is_ok_and(|n| n <= budget) {
            return;
        }
        let history = std::mem::take(&mut self.history);
        let mut events = std::mem::take(&mut self.events);
        for e in &mut events {
            cut_text(&mut e.message, MAX_EVENT_TEXT);
        }
        // Two sequence lengths (varints of at most 10 bytes each) come back with the lists.
        let fixed = |s: &Self| encoded_len(s).map_or(usize::MAX, |n| n.saturating_add(20));
        if fixed(self) > budget {
            self.participants.clear();
        }
        let room = budget.saturating_sub(fixed(self));
        let (event_sizes, round_sizes) = (element_sizes(&events), element_sizes(&history));
        let (_, half_events) = newest_within(&event_sizes, room / 2);
        let (rounds, used_rounds) = newest_within(&round_sizes, room - half_events);
        let (kept_events, _) = newest_within(&event_sizes, room - used_rounds);
        self.events = events.split_off(events.len() - kept_events);
        self.history = history[history.len() - rounds..].to_vec();
    }
}

/// The encoded size of each element: a sequence encodes as its length, then its elements one
/// after the other, so the parts add up.
fn element_sizes<T: Serialize>(items: &[T]) -> Vec<usize> {
    items
        .iter()
        .map(|i| encoded_len(i).unwrap_or(usize::MAX))
        .collect()
}

/// How many of the last `sizes` fit in `room` together, and their total size.
fn newest_within(sizes: &[usize], room: usize) -> (usize, usize) {
    let mut used = 0usize;
    let mut count = 0;
    for &size in sizes.iter().rev() {
        match used.checked_add(size) {
            Some(total) if total <= room => {
                used = total;
                count += 1;
            }
            _ => break,
        }
    }
    (count, used)
}

/// Shorten `text` to at most `max` bytes at a character boundary, marking the cut.
fn cut_text(text: &mut String, max: usize) {
    const MARK: &str = " [...]";
    if text.len() <= max {
        return;
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub datasets: Vec<String>,
    /// Seconds since the node connected; only admins are told (`None` for researchers).
    pub connected_secs: Option<u64>,
}

/// Everything needed to use a finished model; its parameters follow as a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsHeader {
    pub status: ExperimentStatus,
    pub spec: ExperimentSpec,
    /// Design column names, in parameter order (empty for `echo`).
    pub columns: Vec<String>,
    pub standardization: Option<Standardization>,
    pub tensor: TensorMeta,
    /// GLM inference or a pooled table, once the experiment completed.
    pub output: Option<crate::output::Output>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        protocol: u32,
        name: String,
        role: Role,
    },
    Submitted {
        experiment: ExperimentId,
    },
    /// Statuses, each cut to [`STATUS_BUDGET`]; a list page holds at most [`STATUS_PAGE_LEN`]
    /// of them within [`STATUS_PAGE_BUDGET`]. `next` is the `after` of the next page, `None`
    /// on the last one (and for a single experiment).
    Status {
        experiments: Vec<ExperimentStatus>,
        next: Option<ExperimentId>,
    },
    Nodes {
        nodes: Vec<NodeInfo>,
    },
    Results(Box<ResultsHeader>),
    /// A request that changes something was carried out.
    Done {
        message: String,
    },
    Error {
        message: String,
    },
}

/// Encode a message as one frame: 4-byte big-endian length, then the payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let out = postcard::to_extend(msg, vec![0u8; 4]).map_err(|e| Error::Wire {
        what: "outgoing message",
        problem: e.to_string(),
    })?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::TooLarge {
            what: "outgoing frame",
            size: len as u64,
            limit: MAX_FRAME as u64,
        });
    }
    let mut out = out;
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The size of `msg`'s frame payload, without encoding it anywhere.
pub fn encoded_len<T: Serialize>(msg: &T) -> Result<usize> {
    postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default()).map_err(|e| Error::Wire {
        what: "outgoing message",
        problem: e.to_string(),
    })
}

/// Check a frame's length prefix before reading its payload.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(Error::TooLarge {
            what: "frame",
            size: len as u64,
            limit: MAX_FRAME as u64,
        });
    }
    Ok(len)
}

/// Decode a frame payload (without its length prefix). Trailing bytes are an error.
///
/// The payload is at most [`MAX_FRAME`] bytes (checked from the prefix before it is read), and
/// postcard allocates no more than the bytes it is given justify: collection lengths only
/// pre-allocate through serde's capped size hint, and every element must actually be present.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8], what: &'static str) -> Result<T> {
    if payload.len() > MAX_FRAME {
        return Err(Error::TooLarge {
            what: "frame",
            size: payload.len() as u64,
            limit: MAX_FRAME as u64,
        });
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| Error::Wire {
        what,
        problem: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::Wire {
            what,
            problem: format!("{} trailing bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

/// Decode one frame from the front of `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the message and how many bytes it used. Never panics, whatever the bytes.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8], what: &'static str) -> Result<Option<(T, usize)>> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut p = [0u8; 4];
    p.copy_from_slice(prefix);
    let len = frame_len(p)?;
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload, what)?, 4 + len)))
}

/// Decode a whole little-endian tensor into f64 (for small models and results).
pub fn tensor_to_f64(bytes: &[u8], dtype: DType) -> Result<Vec<f64>> {
    if !bytes.len().is_multiple_of(dtype.size()) {
        return Err(Error::Wire {
            what: "tensor",
            problem: format!("{} bytes is not a whole number of {dtype:?} values", bytes.len()),
        });
    }
    Ok(match dtype {
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{EchoSpec, TrainingSpec};
    use proptest::prelude::*;

    fn echo_spec(params: u64, name: String) -> ExperimentSpec {
        ExperimentSpec {
            name,
            purpose: String::new(),
            dataset: String::new(),
            model: ModelKind::Echo,
            rounds: 3,
            min_nodes: 1,
            round_timeout_secs: 10,
            max_round_retries: 1,
            schema: None,
            training: TrainingSpec::default(),
            echo: Some(EchoSpec { params }),
            method: Default::default(),
            formula: None,
            weights: None,
            offset: None,
            office_effects: false,
            offices: Vec::new(),
            max_iterations: 25,
            table: None,
            secure_aggregation: false,
            secure_threshold: None,
            privacy: None,
        }
    }

    fn arb_node_msg() -> impl Strategy<Value = NodeMsg> {
        prop_oneof![
            (any::<u32>(), ".{0,20}", prop::collection::vec("[a-z]{1,8}", 0..4)).prop_map(
                |(protocol, software, datasets)| NodeMsg::Hello {
                    protocol,
                    software,
                    datasets
                }
            ),
            Just(NodeMsg::Heartbeat),
            (any::<u64>(), any::<u32>(), "[0-9a-f]{64}").prop_map(|(experiment, round, manifest)| {
                NodeMsg::Held {
                    experiment,
                    round,
                    phase: Phase::Stats,
                    manifest,
                }
            }),
            (any::<u64>(), any::<u32>(), ".{0,40}").prop_map(|(experiment, round, reason)| {
                NodeMsg::TaskFailed {
                    experiment,
                    round,
                    phase: Phase::Train,
                    reason,
                }
            }),
        ]
    }

    fn same_bits(a: &NodeMsg, b: &NodeMsg) -> bool {
        // NaN != NaN, so compare encodings, which are canonical.
        encode_frame(a).ok() == encode_frame(b).ok()
    }

    proptest! {
        #[test]
        fn node_messages_round_trip(msg in arb_node_msg()) {
            let bytes = encode_frame(&msg).expect("encode");
            let (back, used) = decode_frame::<NodeMsg>(&bytes, "node message").expect("decode").expect("whole");
            prop_assert_eq!(used, bytes.len());
            prop_assert!(same_bits(&msg, &back));
        }

        #[test]
        fn tasks_round_trip(round in any::<u32>(), params in 1u64..1_000_000, name in ".{1,30}", len in any::<u64>()) {
            let task = Task {
                experiment: 7,
                round,
                phase: Phase::Evaluate,
                submitter: "researcher `r`".into(),
                spec: echo_spec(params, name),
                standardization: Some(Standardization { mean: vec![1.0, 2.5], sd: vec![0.5, 3.0] }),
                model: Some(TensorMeta { dtype: DType::F32, len }),
                secure: Some(crate::secure::SecureTask { attempt: 1, ring: crate::secure::Ring::Z128, len, threshold: Some(3) }),
            };
            let bytes = encode_frame(&task).expect("encode");
            let (back, _) = decode_frame::<Task>(&bytes, "task").expect("decode").expect("whole");
            prop_assert_eq!(task, back);
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<NodeMsg>(&bytes, "node message");
            let _ = decode_frame::<CoordMsg>(&bytes, "coordinator message");
            let _ = decode_frame::<Task>(&bytes, "task");
            let _ = decode_frame::<AnswerHeader>(&bytes, "answer header");
            let _ = decode_frame::<Request>(&bytes, "request");
            let _ = decode_frame::<Response>(&bytes, "response");
            let _ = decode_payload::<Task>(&bytes, "task");
            let _ = tensor_to_f64(&bytes, DType::F64);
        }

        #[test]
        fn tensors_round_trip(values in prop::collection::vec(-1e12f64..1e12, 0..64)) {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            prop_assert_eq!(tensor_to_f64(&bytes, DType::F64).expect("decode"), values);
        }
    }

    fn status(events: usize, event_text: usize, rounds: u32) -> ExperimentStatus {
        ExperimentStatus {
            id: 1,
            name: "big".into(),
            model: ModelKind::Echo,
            submitter: "researcher `r`".into(),
            state: ExperimentState::Running { phase: Phase::Train },
            rounds_done: rounds,
            rounds: rounds + 1,
            privacy: Default::default(),
            participants: vec!["a".into(), "b".into()],
            history: (1..=rounds)
                .map(|round| RoundRecord {
                    round,
                    participants: (0..20).map(|i| format!("office-{i:03}")).collect(),
                    total_examples: 1000,
                    train_loss: 0.5,
                    metrics: None,
                    train_ms: 10,
                    round_ms: 20,
                    retries: 0,
                })
                .collect(),
            events: (0..events)
                .map(|i| EventRecord {
                    at_ms: i as u64,
                    message: format!("{i} {}", "é".repeat(event_text / 2)),
                })
                .collect(),
        }
    }

    #[test]
    fn a_status_that_fits_is_not_cut() {
        let small = status(30, 100, 5);
        let mut fitted = small.clone();
        fitted.fit(STATUS_BUDGET);
        assert_eq!(fitted, small);
    }

    #[test]
    fn a_large_status_is_cut_to_its_budget_keeping_the_newest() {
        // (events, bytes per event, rounds): many events, long events, a long history, all.
        for (events, text, rounds) in [
            (3000, 1000, 3),
            (2, 900_000, 3),
            (10, 100, 5000),
            (500, 4000, 3000),
        ] {
            let whole = status(events, text, rounds);
            assert!(encoded_len(&whole).expect("size") > STATUS_BUDGET);
            let mut cut = whole.clone();
            cut.fit(STATUS_BUDGET);
            let size = encoded_len(&cut).expect("size");
            assert!(size <= STATUS_BUDGET, "{events} x {text}, {rounds}: {size}");
            assert!(encode_frame(&cut).is_ok());
            let what = format!("{events} x {text}, {rounds} rounds");
            assert!(!cut.events.is_empty(), "{what}");
            assert_eq!(
                cut.events.last().map(|e| e.at_ms),
                whole.events.last().map(|e| e.at_ms),
                "{what}"
            );
            assert!(
                cut.events.iter().all(|e| e.message.len() <= MAX_EVENT_TEXT),
                "{what}"
            );
            assert_eq!(cut.history.last(), whole.history.last(), "{what}");
            assert_eq!(cut.rounds_done, rounds, "{what}");
            // What is left of it is a suffix: the newest, in order.
            let first = cut.history.first().map_or(0, |r| r.round);
            assert_eq!(cut.history, whole.history[(first - 1) as usize..], "{what}");
        }
    }

    #[test]
    fn long_texts_are_cut_at_a_character() {
        let mut text = "é".repeat(10);
        cut_text(&mut text, 13);
        assert_eq!(text, "ééé [...]");
        let mut short = "abc".to_owned();
        cut_text(&mut short, 3);
        assert_eq!(short, "abc");
    }

    #[test]
    fn truncated_frames_need_more_bytes() {
        let bytes = encode_frame(&NodeMsg::Heartbeat).expect("encode");
        for cut in 0..bytes.len() {
            assert!(
                matches!(decode_frame::<NodeMsg>(&bytes[..cut], "m"), Ok(None)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn lengths_beyond_the_frame_are_invalid_without_allocating_them() {
        // A sequence that claims 2^32 - 1 elements in a 5-byte payload: postcard must refuse it
        // for the missing bytes, not reserve memory for the claim.
        let claim = [0xff, 0xff, 0xff, 0xff, 0x0f];
        let err = decode_payload::<Vec<u64>>(&claim, "m").expect_err("short");
        assert!(matches!(err, Error::Wire { .. }), "{err}");
        let mut frame = (claim.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&claim);
        assert!(matches!(
            decode_frame::<Vec<String>>(&frame, "m"),
            Err(Error::Wire { .. })
        ));
    }

    #[test]
    fn oversized_and_trailing_frames_are_invalid() {
        let huge = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            decode_frame::<NodeMsg>(&huge, "m"),
            Err(Error::TooLarge { .. })
        ));
        let mut bytes = encode_frame(&NodeMsg::Heartbeat).expect("encode");
        bytes.push(0);
        let len = (bytes.len() - 4) as u32;
        bytes[..4].copy_from_slice(&len.to_be_bytes());
        let err = decode_frame::<NodeMsg>(&bytes, "m").expect_err("trailing byte");
        assert!(err.to_string().contains("trailing"), "{err}");
    }
}
