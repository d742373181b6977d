//! The tamper-evident audit log of a node or of the coordinator: an append-only file of JSON
//! lines, each record chained to the one before it by SHA-256, fsynced as it is written.
//!
//! A record is one line:
//!
//! ```text
//! {"seq":1,"time":"2025-01-02T03:04:05.678Z","kind":"connected","details":{..},"prev":"00..00","hash":"9f.."}
//! ```
//!
//! `seq` counts from 1; `prev` is the `hash` of the previous record (64 zeros for the first);
//! `hash` is the lower-case hex SHA-256 of the record's canonical bytes: the line as written,
//! without its `,"hash":"…"` member (`{"seq":..,"time":..,"kind":..,"details":..,"prev":".."}`).
//! Editing any byte of a record breaks its hash; deleting, inserting or moving a record breaks
//! the sequence and the chain after it. [`verify`] names the first bad record.
//!
//! What a hash chain cannot show alone: the removal of the newest records, or a whole log
//! rewritten with fresh hashes. [`VerifyReport::last_hash`] is printed by `audit verify` so the
//! head can be noted somewhere else (a ticket, the coordinator's own log) and compared later.
//!
//! Records carry names, counts and hashes, never data values. Each kind has a fixed set of
//! fields ([`AuditEvent`]); [`verify`] checks only the layout and the chain, so logs written
//! before the kinds were typed (the same layout) still verify.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::manifest::hex;
use crate::wire::ExperimentId;
use crate::{Error, Result};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex digits + `"}`: how every record line ends.
const HASH_MEMBER: &str = ",\"hash\":\"";
const SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;
/// A longer line is not something this module wrote.
const MAX_LINE: usize = 1 << 20;

/// The canonical bytes of a record: everything but its hash, in this field order (the
/// event contributes `kind` and `details`).
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: &'a str,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

/// Every kind of audit record, node and coordinator, with its fixed fields: the schema of the
/// log. Written as `"kind":"<snake_case name>","details":{<fields in this order>}`; the field
/// names are what operators' scripts and the tests read, so renaming one is a format change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "details", rename_all = "snake_case")]
pub enum AuditEvent {
    // The node's records.
    /// The node process started with this policy.
    NodeStarted {
        node: String,
        software: String,
        datasets: Vec<String>,
        /// The site policy as its own JSON document.
        policy: Value,
    },
    /// The node process stopped.
    NodeStopped {},
    /// Connected to the coordinator; `as` is the node's certificate name.
    Connected {
        coordinator: String,
        address: String,
        #[serde(rename = "as")]
        as_name: String,
    },
    /// The coordinator refused the node's hello.
    ConnectRefused { coordinator: String, reason: String },
    /// The coordinator could not be reached (recorded once per outage).
    ConnectFailed { coordinator: String, reason: String },
    /// A session with the coordinator ended.
    Disconnected { coordinator: String, reason: String },
    /// A manifest first seen by this process.
    ManifestSeen {
        manifest: String,
        experiment: ExperimentId,
        submitter: String,
        name: String,
        model: String,
        dataset: String,
        rounds: u32,
    },
    /// A custodian's decision on a manifest, first applied by this process.
    DecisionApplied {
        manifest: String,
        decision: Decision,
        reason: String,
        decided_at: String,
    },
    /// A task held for the custodian's decision.
    Held {
        manifest: String,
        experiment: ExperimentId,
        round: u32,
        phase: String,
        newly_held: bool,
        /// The experiment that used this manifest's one approval, for a re-run.
        approval_used_by: Option<ExperimentId>,
    },
    /// Row sets an experiment releases, added to the release ledger.
    RowSetsRecorded {
        experiment: ExperimentId,
        dataset: String,
        sets: Vec<RowSetRecord>,
    },
    /// A task the site policy refused.
    PolicyRefused(TaskNotDone),
    /// A task outside what the node agreed to answer (its bindings).
    TaskRefused(TaskNotDone),
    /// A task whose manifest the custodian rejected.
    CustodianRejected(TaskNotDone),
    /// A task that failed (data, model or state errors).
    TaskFailed(TaskNotDone),
    /// A model update, recorded before it is sent.
    UpdateSent {
        experiment: ExperimentId,
        round: u32,
        manifest: String,
        rows: u64,
        bytes: u64,
        sha256: String,
    },
    /// A statistics or evaluation answer, recorded before it is sent; `kind` is its phase.
    AnswerReleased {
        experiment: ExperimentId,
        round: u32,
        kind: String,
        manifest: String,
    },
    /// A differentially private answer charged to its dataset's privacy budget, recorded
    /// before it is sent: the round's cost (`steps` of the Gaussian mechanism with noise
    /// multiplier `noise_multiplier` on a Poisson sample of rate `sampling_rate`), then ε
    /// spent, at the dataset's δ, by the experiment and by the dataset in all. `repeated`: the
    /// same noisy answer was charged before and is sent again (a retry), at no further cost.
    PrivacyCharge {
        experiment: ExperimentId,
        round: u32,
        phase: String,
        manifest: String,
        dataset: String,
        sampling_rate: f64,
        noise_multiplier: f64,
        steps: u64,
        delta: f64,
        experiment_epsilon: f64,
        dataset_epsilon: f64,
        #[serde(default)]
        repeated: bool,
    },

    // The coordinator's records.
    /// The coordinator started with this many experiments in its store.
    CoordinatorStarted { experiments: u64 },
    /// A node joined with these datasets.
    NodeConnected { node: String, datasets: Vec<String> },
    /// A node's connection ended.
    NodeDisconnected { node: String },
    /// A node's answer to a step arrived (`phase`: statistics, training, evaluation); its
    /// weight (training rows, or 1 for plain sums) and number of values; `reason` says why it
    /// was not used.
    AnswerReceived {
        node: String,
        experiment: ExperimentId,
        round: u32,
        phase: String,
        weight: u64,
        values: u64,
        accepted: bool,
        reason: Option<String>,
    },
    /// A connection refused: during the handshake (only `peer_address` is known) or at the
    /// hello (`peer`, the certificate identity).
    ConnectionRefused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_address: Option<String>,
        reason: String,
    },
    /// Refused handshakes not recorded one by one in the last window (rate limit).
    ConnectionsRefusedUnlogged { count: u64, window_secs: u64 },
    /// A researcher's or admin's request refused; `request` is absent when it could not be read.
    RequestRefused {
        peer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        reason: String,
    },
    /// Results handed to a researcher.
    ResultsReleased {
        peer: String,
        experiment: ExperimentId,
        rounds: u64,
    },
    /// An experiment submitted, with the hash of the manifest custodians approve.
    ExperimentSubmitted {
        peer: String,
        experiment: ExperimentId,
        manifest: Option<String>,
    },
    /// An admin action carried out.
    AdminAction {
        peer: String,
        request: String,
        result: String,
    },
    /// A connected peer disconnected because its certificate was revoked.
    PeerRevoked { peer: String },
}

/// The fields of a task a node did not do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskNotDone {
    pub experiment: ExperimentId,
    pub round: u32,
    pub phase: String,
    pub manifest: String,
    /// The full reason, for the custodian.
    pub reason: String,
    /// The text that was sent back to the coordinator.
    pub sent: String,
}

/// One row set added to the release ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowSetRecord {
    pub set: String,
    pub rows: u64,
    pub sha256: String,
}

/// A custodian's decision as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approved,
    Rejected,
}

impl AuditEvent {
    /// The record's `kind`, as written.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::NodeStarted { .. } => "node_started",
            AuditEvent::NodeStopped {} => "node_stopped",
            AuditEvent::Connected { .. } => "connected",
            AuditEvent::ConnectRefused { .. } => "connect_refused",
            AuditEvent::ConnectFailed { .. } => "connect_failed",
            AuditEvent::Disconnected { .. } => "disconnected",
            AuditEvent::ManifestSeen { .. } => "manifest_seen",
            AuditEvent::DecisionApplied { .. } => "decision_applied",
            AuditEvent::Held { .. } => "held",
            AuditEvent::RowSetsRecorded { .. } => "row_sets_recorded",
            AuditEvent::PolicyRefused(_) => "policy_refused",
            AuditEvent::TaskRefused(_) => "task_refused",
            AuditEvent::CustodianRejected(_) => "custodian_rejected",
            AuditEvent::TaskFailed(_) => "task_failed",
            AuditEvent::UpdateSent { .. } => "update_sent",
            AuditEvent::AnswerReleased { .. } => "answer_released",
            AuditEvent::PrivacyCharge { .. } => "privacy_charge",
            AuditEvent::CoordinatorStarted { .. } => "coordinator_started",
            AuditEvent::NodeConnected { .. } => "node_connected",
            AuditEvent::NodeDisconnected { .. } => "node_disconnected",
            AuditEvent::AnswerReceived { .. } => "answer_received",
            AuditEvent::ConnectionRefused { .. } => "connection_refused",
            AuditEvent::ConnectionsRefusedUnlogged { .. } => "connections_refused_unlogged",
            AuditEvent::RequestRefused { .. } => "request_refused",
            AuditEvent::ResultsReleased { .. } => "results_released",
            AuditEvent::ExperimentSubmitted { .. } => "experiment_submitted",
            AuditEvent::AdminAction { .. } => "admin_action",
            AuditEvent::PeerRevoked { .. } => "peer_revoked",
        }
    }
}

/// A parsed body, for checking: no other members allowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParsedBody {
    seq: u64,
    #[allow(dead_code)]
    time: String,
    kind: String,
    details: Value,
    prev: String,
}

/// An open audit log, positioned to append. One writer per file: the node process, or the
/// coordinator's federation task.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
    last_hash: String,
    /// Set when a write failed half-way: appending more would hide the damage.
    broken: bool,
}

impl AuditLog {
    /// Open (or create, with its folder) the log at `path`. The last record is checked and
    /// the chain continues from it; an incomplete or invalid last line is an error, since
    /// appending after it would bury the damage (run `audit verify`, keep the file as evidence
    /// and move it aside to start a new log).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| Error::io("cannot open the audit log", path, e))?;
        // One writer per log: two would both continue from the same last record and fork the
        // chain. Checked before reading, so a refused second writer changes nothing.
        crate::files::lock_file(&file, "audit log", path, path)?;
        let (next_seq, last_hash) = match last_line(&mut file)
            .map_err(|e| Error::io("cannot read", path, e))?
        {
            None => (1, GENESIS.to_owned()),
            Some(line) => {
                let bad = |problem: String| {
                    Error::io(
                        "cannot continue the audit log",
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "{problem}; run `audit verify`, keep the file as evidence and move it aside to start a new log"
                            ),
                        ),
                    )
                };
                if !line.ends_with(b"\n") {
                    return Err(bad("the last line is incomplete".into()));
                }
                let record =
                    check_line(&line[..line.len() - 1]).map_err(|p| bad(format!("the last record: {p}")))?;
                (record.seq.saturating_add(1), record.hash)
            }
        };
        Ok(AuditLog {
            path: path.to_owned(),
            file,
            next_seq,
            last_hash,
            broken: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence number the next record gets (1 for an empty log).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Hash of the newest record ([`GENESIS`] for an empty log).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Append one record and fsync it: once this returns, the record survives a crash.
    pub fn append(&mut self, event: &AuditEvent) -> Result<()> {
        let invalid = |problem: String| {
            Error::io(
                "cannot append to",
                &self.path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, problem),
            )
        };
        if self.broken {
            return Err(invalid(
                "an earlier write failed; the log needs `audit verify`".into(),
            ));
        }
        let line = encode(self.next_seq, &now_rfc3339(), event, &self.last_hash)
            .map_err(|e| invalid(format!("cannot encode the record: {e}")))?;
        if line.len() > MAX_LINE {
            return Err(invalid(format!("record of {} bytes is too large", line.len())));
        }
        let hash = line[line.len() - 2 - 64..line.len() - 2].to_owned();
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        let before = self.file.metadata().map(|m| m.len());
        let written = self.file.write_all(&bytes).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A full disk can leave part of the line behind; cut it off (best effort) so the
            // log on disk stays a valid chain a restarted process can continue.
            if let Ok(len) = before {
                let _ = self.file.set_len(len).and_then(|()| self.file.sync_data());
            }
            self.broken = true;
            return Err(Error::io("cannot write to", &self.path, e));
        }
        self.next_seq += 1;
        self.last_hash = hash;
        Ok(())
    }
}

/// Encode one record line (without its newline).
fn encode(seq: u64, time: &str, event: &AuditEvent, prev: &str) -> serde_json::Result<String> {
    let body = serde_json::to_string(&Body {
        seq,
        time,
        event,
        prev,
    })?;
    let hash = hex(&Sha256::digest(body.as_bytes()));
    // The body ends with `}`: replace it by the hash member and close again.
    let mut line = body;
    line.pop();
    line.push_str(HASH_MEMBER);
    line.push_str(&hash);
    line.push_str("\"}");
    Ok(line)
}

/// A record whose own hash checks out.
#[derive(Debug)]
struct Checked {
    seq: u64,
    prev: String,
    hash: String,
}

/// Check one line (without its newline) on its own: layout, hash, fields.
fn check_line(line: &[u8]) -> std::result::Result<Checked, String> {
    if line.is_empty() {
        return Err("empty line".into());
    }
    if line.len() > MAX_LINE {
        return Err(format!("line of {} bytes is longer than any record", line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8 text".to_owned())?;
    let split = text
        .len()
        .checked_sub(SUFFIX_LEN)
        .filter(|&at| text.is_char_boundary(at));
    let Some(at) = split else {
        return Err("not an audit record (no hash)".into());
    };
    let (head, suffix) = text.split_at(at);
    let stated = suffix
        .strip_prefix(HASH_MEMBER)
        .and_then(|s| s.strip_suffix("\"}"))
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| "not an audit record (no hash at the end of the line)".to_owned())?;
    let mut body = String::with_capacity(head.len() + 1);
    body.push_str(head);
    body.push('}');
    let actual = hex(&Sha256::digest(body.as_bytes()));
    if actual != stated {
        return Err("its hash does not match its content (the record was edited)".into());
    }
    let parsed: ParsedBody =
        serde_json::from_str(&body).map_err(|e| format!("not a valid audit record: {e}"))?;
    if !parsed.details.is_object() || parsed.kind.is_empty() {
        return Err("not a valid audit record (kind or details)".into());
    }
    Ok(Checked {
        seq: parsed.seq,
        prev: parsed.prev,
        hash: stated.to_owned(),
    })
}

/// The first record that breaks the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Line number in the file, from 1.
    pub line: u64,
    /// The sequence number the line claims, when it can be read.
    pub seq: Option<u64>,
    pub problem: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Intact records before the first bad one (all of them when the log is intact).
    pub records: u64,
    /// Hash of the last intact record ([`GENESIS`] when there is none).
    pub last_hash: String,
    pub first_bad: Option<BadRecord>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_bad.is_none()
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.first_bad {
            None => write!(f, "OK: {} records, last hash {}", self.records, self.last_hash),
            Some(bad) => {
                write!(f, "TAMPERED: line {}", bad.line)?;
                if let Some(seq) = bad.seq {
                    write!(f, " (seq {seq})")?;
                }
                write!(
                    f,
                    ": {}; the {} records before it are intact (last good hash {})",
                    bad.problem, self.records, self.last_hash
                )
            }
        }
    }
}

/// Checks records in order; stops at the first bad one.
#[derive(Debug)]
struct Verifier {
    line: u64,
    report: VerifyReport,
}

impl Verifier {
    fn new() -> Self {
        Verifier {
            line: 0,
            report: VerifyReport {
                records: 0,
                last_hash: GENESIS.to_owned(),
                first_bad: None,
            },
        }
    }

    /// Feed the next line (without its newline); `complete` says whether a newline ended it.
    /// Returns false once a bad record was found.
    fn feed(&mut self, line: &[u8], complete: bool) -> bool {
        self.line += 1;
        let expected = self.report.records + 1;
        let problem = match check_line(line) {
            Err(problem) => Err((claimed_seq(line), problem)),
            Ok(_) if !complete => Err((claimed_seq(line), "the last line is incomplete (the log was cut)".into())),
            Ok(r) if r.seq != expected => Err((
                Some(r.seq),
                if r.seq > expected {
                    format!("expected seq {expected}: a record is missing (deleted) or the records were reordered")
                } else {
                    format!("expected seq {expected}: a record was inserted, repeated or reordered")
                },
            )),
            Ok(r) if r.prev != self.report.last_hash => Err((
                Some(r.seq),
                "does not follow the previous record (its `prev` hash differs): a record before it was replaced"
                    .into(),
            )),
            Ok(r) => Ok(r),
        };
        match problem {
            Ok(r) => {
                self.report.records = r.seq;
                self.report.last_hash = r.hash;
                true
            }
            Err((seq, problem)) => {
                self.report.first_bad = Some(BadRecord {
                    line: self.line,
                    seq,
                    problem,
                });
                false
            }
        }
    }
}

/// The `seq` a damaged line claims, if it still starts like a record.
fn claimed_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits: Vec<u8> = rest.iter().copied().take_while(u8::is_ascii_digit).collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Check a whole log from bytes.
pub fn verify_bytes(bytes: &[u8]) -> VerifyReport {
    let mut v = Verifier::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, complete, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        if !v.feed(line, complete) {
            break;
        }
        rest = next;
    }
    v.report
}

/// Check the log at `path`, streaming it. `Err` only when the file cannot be read; tampering
/// is reported in [`VerifyReport::first_bad`].
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let file = File::open(path).map_err(|e| Error::io("cannot open the audit log", path, e))?;
    let mut reader = BufReader::new(file);
    let mut v = Verifier::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("cannot read", path, e))?;
        if n == 0 {
            break;
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        if !v.feed(&line, complete) {
            break;
        }
    }
    Ok(v.report)
}

/// The last line of the file including its newline, if the file is not empty.
fn last_line(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    // Read backwards in growing chunks until the newline before the last line shows up.
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let body = match buf.last() {
            Some(b'\n') => &buf[..buf.len() - 1],
            _ => &buf[..],
        };
        if let Some(i) = body.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(buf[i + 1..].to_vec()));
        }
        if start == 0 || chunk > (MAX_LINE as u64) * 2 {
            return Ok(Some(buf));
        }
        chunk *= 4;
    }
}

/// The current time as RFC 3339 UTC with milliseconds, e.g. `2025-01-02T03:04:05.678Z`.
pub fn now_rfc3339() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    rfc3339_from_unix_ms(ms)
}

/// Format Unix milliseconds as RFC 3339 UTC.
pub fn rfc3339_from_unix_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        for i in 0..n {
            log.append(&update_sent(i, 100 + i, "ü \"q\"")).expect("append");
        }
        (dir, path)
    }

    fn update_sent(round: u64, rows: u64, sha256: &str) -> AuditEvent {
        AuditEvent::UpdateSent {
            experiment: 1,
            round: round as u32,
            manifest: "m".into(),
            rows,
            bytes: 8,
            sha256: sha256.into(),
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).expect("write");
    }

    fn first_bad(path: &Path) -> BadRecord {
        let report = verify(path).expect("verify");
        assert_eq!(report, verify_bytes(&std::fs::read(path).expect("read")));
        report.first_bad.expect("tampering detected")
    }

    #[test]
    fn appended_records_verify_and_reopening_continues_the_chain() {
        let (_dir, path) = log_with(3);
        let report = verify(&path).expect("verify");
        assert!(report.is_intact(), "{report}");
        assert_eq!(report.records, 3);
        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.next_seq(), 4);
        assert_eq!(log.last_hash(), report.last_hash);
        log.append(&AuditEvent::Connected {
            coordinator: "x:1".into(),
            address: "127.0.0.1:1".into(),
            as_name: "ons".into(),
        })
        .expect("append");
        log.append(&AuditEvent::NodeStopped {}).expect("append");
        let report = verify(&path).expect("verify");
        assert!(report.is_intact(), "{report}");
        assert_eq!(report.records, 5);
        assert!(report.to_string().starts_with("OK: 5 records"), "{report}");
        let first: Value = serde_json::from_str(&lines(&path)[0]).expect("json line");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["kind"], "update_sent");
        assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        let last: Value = serde_json::from_str(&lines(&path)[4]).expect("json line");
        assert_eq!(
            last["details"],
            json!({}),
            "a kind without fields still has details"
        );
    }

    /// The line of `event` as the log writes it, and the same record as the untyped
    /// `append(kind, json!(..))` of earlier versions wrote it.
    fn same_layout(event: AuditEvent, old_kind: &str, old_details: Value) {
        let time = "2025-01-02T03:04:05.678Z";
        let typed = encode(7, time, &event, GENESIS).expect("encode");
        let old_body = format!(
            "{{\"seq\":7,\"time\":\"{time}\",\"kind\":\"{old_kind}\",\"details\":{old_details},\"prev\":\"{GENESIS}\"}}"
        );
        let old = format!(
            "{}{HASH_MEMBER}{}\"}}",
            &old_body[..old_body.len() - 1],
            hex(&Sha256::digest(old_body.as_bytes()))
        );
        assert_eq!(typed, old, "{old_kind}");
        assert_eq!(event.kind(), old_kind);
        // And it reads back as the same typed event.
        let v: Value = serde_json::from_str(&typed).expect("json");
        let back: AuditEvent =
            serde_json::from_value(json!({ "kind": v["kind"], "details": v["details"] })).expect("typed");
        assert_eq!(back, event);
    }

    #[test]
    fn typed_records_keep_the_layout_of_untyped_ones() {
        same_layout(
            AuditEvent::AnswerReceived {
                node: "a".into(),
                experiment: 3,
                round: 2,
                phase: "training".into(),
                weight: 10,
                values: 7,
                accepted: false,
                reason: None,
            },
            "answer_received",
            json!({ "node": "a", "experiment": 3, "round": 2, "phase": "training", "weight": 10, "values": 7, "accepted": false, "reason": null }),
        );
        same_layout(
            AuditEvent::ConnectionRefused {
                peer: None,
                peer_address: Some("10.0.0.1:5".into()),
                reason: "too many".into(),
            },
            "connection_refused",
            json!({ "peer_address": "10.0.0.1:5", "reason": "too many" }),
        );
        same_layout(
            AuditEvent::TaskRefused(TaskNotDone {
                experiment: 1,
                round: 3,
                phase: "training".into(),
                manifest: "h".into(),
                reason: "r".into(),
                sent: "s".into(),
            }),
            "task_refused",
            json!({ "experiment": 1, "round": 3, "phase": "training", "manifest": "h", "reason": "r", "sent": "s" }),
        );
        same_layout(
            AuditEvent::DecisionApplied {
                manifest: "h".into(),
                decision: Decision::Approved,
                reason: "ok".into(),
                decided_at: "t".into(),
            },
            "decision_applied",
            json!({ "manifest": "h", "decision": "approved", "reason": "ok", "decided_at": "t" }),
        );
        same_layout(
            AuditEvent::Connected {
                coordinator: "c:1".into(),
                address: "127.0.0.1:1".into(),
                as_name: "n".into(),
            },
            "connected",
            json!({ "coordinator": "c:1", "address": "127.0.0.1:1", "as": "n" }),
        );
        same_layout(AuditEvent::NodeStopped {}, "node_stopped", json!({}));
    }

    #[test]
    fn a_log_of_the_previous_version_verifies_and_continues() {
        // Records of kinds and fields this version does not know: only layout and chain count.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let body = format!(
            "{{\"seq\":1,\"time\":\"2025-01-02T03:04:05.678Z\",\"kind\":\"retired_kind\",\"details\":{{\"value\":5}},\"prev\":\"{GENESIS}\"}}"
        );
        let hash = hex(&Sha256::digest(body.as_bytes()));
        let line = format!("{}{HASH_MEMBER}{hash}\"}}\n", &body[..body.len() - 1]);
        std::fs::write(&path, line).expect("write");
        assert!(verify(&path).expect("verify").is_intact());
        let mut log = AuditLog::open(&path).expect("continue");
        assert_eq!(log.last_hash(), hash);
        log.append(&AuditEvent::NodeStopped {}).expect("append");
        let report = verify(&path).expect("verify");
        assert!(report.is_intact() && report.records == 2, "{report}");
    }

    #[test]
    fn an_empty_log_is_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        AuditLog::open(&path).expect("create");
        let report = verify(&path).expect("verify");
        assert!(report.is_intact());
        assert_eq!(report.records, 0);
        assert_eq!(report.last_hash, GENESIS);
    }

    #[test]
    fn an_edited_record_is_named() {
        let (_dir, path) = log_with(5);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"rows\":102", "\"rows\":999");
        write_lines(&path, &l);
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(3)), "{bad:?}");
        assert!(bad.problem.contains("edited"), "{bad:?}");
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
        let (_dir, path) = log_with(5);
        let mut l = lines(&path);
        let v: Value = serde_json::from_str(&l[1]).expect("json");
        l[1] = encode(
            2,
            v["time"].as_str().expect("time"),
            &update_sent(1, 5, "forged"),
            v["prev"].as_str().expect("prev"),
        )
        .expect("encode");
        write_lines(&path, &l);
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(3)), "{bad:?}");
        assert!(bad.problem.contains("prev"), "{bad:?}");
    }

    #[test]
    fn a_deleted_record_is_named() {
        let (_dir, path) = log_with(5);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (2, Some(3)), "{bad:?}");
        assert!(bad.problem.contains("missing"), "{bad:?}");
    }

    #[test]
    fn swapped_records_are_named() {
        let (_dir, path) = log_with(5);
        let mut l = lines(&path);
        l.swap(2, 3);
        write_lines(&path, &l);
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(4)), "{bad:?}");
        let report = verify(&path).expect("verify");
        assert_eq!(report.records, 2);
        assert!(
            report.to_string().starts_with("TAMPERED: line 3 (seq 4)"),
            "{report}"
        );
    }

    #[test]
    fn an_inserted_copy_is_named() {
        let (_dir, path) = log_with(4);
        let mut l = lines(&path);
        let copy = l[1].clone();
        l.insert(2, copy);
        write_lines(&path, &l);
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(2)), "{bad:?}");
        assert!(bad.problem.contains("inserted"), "{bad:?}");
    }

    #[test]
    fn a_truncated_last_line_is_reported_and_blocks_appending() {
        let (_dir, path) = log_with(3);
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 20]).expect("truncate");
        let bad = first_bad(&path);
        assert_eq!((bad.line, bad.seq), (3, Some(3)), "{bad:?}");
        let err = AuditLog::open(&path).expect_err("cannot continue").to_string();
        assert!(err.contains("incomplete"), "{err}");
        // A complete record missing only its newline is also a cut log.
        std::fs::write(&path, &text[..text.len() - 1]).expect("truncate");
        let bad = first_bad(&path);
        assert_eq!(bad.line, 3);
        assert!(bad.problem.contains("incomplete"), "{bad:?}");
    }

    #[test]
    fn garbage_and_blank_lines_are_named() {
        let (_dir, path) = log_with(2);
        let mut l = lines(&path);
        l.insert(1, String::new());
        write_lines(&path, &l);
        assert_eq!(first_bad(&path).line, 2);
        assert_eq!(verify_bytes(b"hello\n").first_bad.map(|b| b.line), Some(1));
        assert_eq!(
            verify_bytes(&[0xff, 0xfe, b'\n']).first_bad.map(|b| b.line),
            Some(1)
        );
        assert!(verify_bytes(b"").is_intact());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_from_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_from_unix_ms(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
        assert_eq!(rfc3339_from_unix_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
