//! The node crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a task breaks the experiment it claims to belong to (a coordinator that misbehaves,
/// or one whose store was lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// The experiment id was first used with another manifest.
    OtherManifest,
    /// The round number is outside the experiment's rounds (or the policy's).
    RoundOutOfRange { round: u32, rounds: u32 },
    /// A second answer for the same phase and round, on different inputs.
    SecondAnswer { phase: Phase, round: u32 },
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Binding::OtherManifest => f.write_str(
                "this experiment id belongs to another manifest at this node (rule: one manifest per experiment)",
            ),
            Binding::RoundOutOfRange { round, rounds } => write!(
                f,
                "round {round} is outside the experiment's {rounds} rounds (rule: rounds of the approved manifest)"
            ),
            Binding::SecondAnswer { phase, round } => write!(
                f,
                "a {phase} answer for round {round} was already given on other inputs \
                 (rule: one answer per phase and round)"
            ),
        }
    }
}
use fedstat_proto::wire::Phase;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Config, PKI, wire, data or model errors from the shared crate.
    #[error(transparent)]
    Core(#[from] fedstat_core::Error),

    #[error(transparent)]
    Net(#[from] fedstat_net::Error),

    #[error(transparent)]
    Proto(#[from] fedstat_proto::Error),

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The coordinator could not be reached or refused us.
    #[error("coordinator {addr}: {problem}")]
    Connect { addr: String, problem: String },

    /// A task names a dataset this node does not offer.
    #[error("this node offers no dataset named `{}`", fedstat_core::text::printable(.0))]
    UnknownDataset(String),

    /// The experiment breaks the site policy; the text names the rule, never a data value.
    #[error("refused by site policy: {0}")]
    Policy(crate::policy::Refusal),

    /// A task is not consistent with the experiment the node agreed to answer.
    #[error("refused: {0}")]
    Binding(Binding),

    /// The record of released row sets cannot be read or written (details for the custodian).
    #[error("release ledger: {0}")]
    Ledger(String),

    /// The privacy-budget ledger cannot be read or written (details for the custodian); no
    /// differentially private answer is given until it can.
    #[error(transparent)]
    PrivacyLedger(#[from] crate::ledger::LedgerError),

    /// The data custodian rejected the experiment's manifest, with their reason.
    #[error("rejected by the data custodian: {0}")]
    CustodianRejected(String),

    /// The task's experiment spec does not validate.
    #[error("the experiment spec is invalid: {0}")]
    InvalidSpec(fedstat_core::Error),

    /// An answer could not be recorded in the audit log, so it was not sent.
    #[error(
        "the node cannot write its audit log, so it sends nothing; its operators must check the node's log"
    )]
    AuditUnavailable,

    /// A pending/approve/reject command or the approval store failed.
    #[error("{0}")]
    Approval(String),

    /// Secure aggregation failed at this node (a member's keys did not verify, a share did
    /// not open, the coordinator broke the protocol).
    #[error(transparent)]
    Secure(#[from] fedstat_secagg::Error),

    /// The coordinator broke secure aggregation's protocol; the text names the rule.
    #[error("secure aggregation: {0}")]
    SecureProtocol(&'static str),

    /// The audit log is damaged (named by `audit verify`).
    #[error("audit log {path}: {report}")]
    Tampered { path: PathBuf, report: String },
}

impl Error {
    /// The error as it may leave the node (to the coordinator and the researcher): the rule or
    /// the column that failed, never a path, a line number, a count or a value. The full text
    /// goes to the node's log and audit log, for the custodian. `dataset` names the dataset
    /// the task was about.
    pub fn public(&self, dataset: &str) -> String {
        let dataset = fedstat_core::text::printable(dataset);
        match self {
            Error::Core(e @ (fedstat_core::Error::Csv { .. } | fedstat_core::Error::Dataset { .. })) => {
                format!("dataset `{dataset}`: {}", e.public())
            }
            Error::Core(e) => e.public(),
            Error::Proto(e) => fedstat_core::Error::Proto(e.clone()).public(),
            Error::Net(_) => "certificate or connection problem on the node".to_owned(),
            Error::InvalidSpec(e) => format!("the experiment spec is invalid: {}", e.public()),
            Error::UnknownDataset(_) | Error::Policy(_) | Error::Binding(_) | Error::CustodianRejected(_) => {
                self.to_string()
            }
            Error::AuditUnavailable => self.to_string(),
            Error::Io { .. } | Error::Ledger(_) | Error::Approval(_) | Error::Tampered { .. } => {
                "the node cannot use its own state; its custodian must check the node's log".to_owned()
            }
            Error::Connect { .. } => "the node lost its connection".to_owned(),
            Error::PrivacyLedger(_) => {
                "the node cannot use its privacy ledger; its custodian must check the node's log".to_owned()
            }
            Error::Secure(e) => e.to_string(),
            Error::SecureProtocol(_) => self.to_string(),
        }
    }
}
