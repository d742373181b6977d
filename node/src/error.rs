//! The node crate's one error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Config, PKI, wire, data or model errors from the shared crate.
    #[error(transparent)]
    Shared(#[from] fedstat_shared::Error),

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
    #[error("this node offers no dataset named `{0}`")]
    UnknownDataset(String),

    /// The experiment breaks the site policy; the text names the rule, never a data value.
    #[error("refused by site policy: {0}")]
    Policy(String),

    /// The data custodian rejected the experiment's manifest, with their reason.
    #[error("rejected by the data custodian: {0}")]
    CustodianRejected(String),

    /// The task's experiment spec does not validate.
    #[error("the experiment spec is invalid: {0}")]
    InvalidSpec(fedstat_shared::Error),

    /// An answer could not be recorded in the audit log, so it was not sent.
    #[error(
        "the node cannot write its audit log, so it sends nothing; its operators must check the node's log"
    )]
    AuditUnavailable,

    /// A pending/approve/reject command or the approval store failed.
    #[error("{0}")]
    Approval(String),

    /// The audit log is damaged (named by `audit verify`).
    #[error("audit log {path}: {report}")]
    Tampered { path: PathBuf, report: String },
}
