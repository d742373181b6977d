//! The crate's one error type.

/// What went wrong in an attempt of secure aggregation. Messages name the rule broken and the
/// node concerned, never a secret, a share or a value.
///
/// Every refusal by a [`crate::Client`] ends its attempt: the step is not retried with the same
/// keys (a retry is a new attempt with fresh keys), so a coordinator cannot probe a node.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Kept from the interface skeleton for callers; this crate does not return it.
    #[error("secure aggregation: {0}")]
    Protocol(String),

    /// A name that is not in the roster (or, for a client, its own name missing from it).
    #[error("secure aggregation: `{node}` is not a member of the roster")]
    NotMember { node: String },

    /// A name twice in the roster, or a second message of one kind from one node.
    #[error("secure aggregation: `{node}` appears twice in the {what}")]
    Duplicate { node: String, what: &'static str },

    /// Two members advertised the same public key (a copied or replayed key).
    #[error("secure aggregation: `{node}` advertised a public key another member also advertised")]
    DuplicateKey { node: String },

    /// The roster carries other keys under my name than the ones I advertised.
    #[error("secure aggregation: the roster's keys for me (`{node}`) are not the keys I advertised")]
    NotMyKeys { node: String },

    /// A public key whose Diffie-Hellman result is all zeros (a low-order point).
    #[error("secure aggregation: `{node}` advertised a weak public key (low order)")]
    WeakKey { node: String },

    /// The threshold breaks a rule: at least 2, at least the step's, at most the members.
    #[error("secure aggregation: threshold {threshold} is not allowed with {members} members: {rule}")]
    BadThreshold {
        threshold: u32,
        members: usize,
        rule: &'static str,
    },

    /// The threshold is not a strict majority of the roster, so a coordinator could unmask two
    /// disjoint halves separately.
    #[error(
        "secure aggregation: threshold {threshold} is not a strict majority of the {members} members \
         (2 x threshold must exceed the members)"
    )]
    NotMajority { threshold: u32, members: usize },

    /// Fewer nodes than the threshold took part in a step.
    #[error("secure aggregation: {have} {what}, fewer than the threshold {need}")]
    BelowThreshold {
        have: usize,
        need: u32,
        what: &'static str,
    },

    /// A sealed share that does not open, or a share that is not well formed.
    #[error("secure aggregation: the share from `{from}` is invalid ({problem})")]
    BadShare { from: String, problem: &'static str },

    /// A byte string of the wrong length.
    #[error("secure aggregation: {what} has {got} bytes, expected {expected}")]
    WrongLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },

    /// Vectors of `len` elements of the ring do not fit this machine or the mask generator.
    #[error("secure aggregation: {len} elements are too many for one masked vector")]
    TooLarge { len: u64 },

    /// A step called a second time.
    #[error("secure aggregation: {step} was already done in this attempt")]
    Replay { step: &'static str },

    /// A step called before the step it needs.
    #[error("secure aggregation: {step} called before {needs}")]
    OutOfOrder { step: &'static str, needs: &'static str },

    /// A step called after an earlier step of this attempt was refused.
    #[error("secure aggregation: {step} refused: an earlier step of this attempt failed")]
    Ended { step: &'static str },

    /// Survivors and dropped nodes are not a split of the nodes that sent shares.
    #[error("secure aggregation: `{node}` {problem}")]
    NotSplit { node: String, problem: &'static str },

    /// A survivor was expected (to unmask, or to reveal).
    #[error("secure aggregation: `{node}` is not a survivor of this attempt")]
    NotSurvivor { node: String },

    /// A node sent a masked answer but no shares.
    #[error("secure aggregation: `{node}` sent a masked answer but no shares")]
    NoShares { node: String },

    /// A message after the sets it would change were fixed.
    #[error("secure aggregation: `{node}` is too late: the {what} are already fixed")]
    Late { node: String, what: &'static str },

    /// The revealed shares of one node's secret do not lie on one polynomial: a survivor lied
    /// or its shares were corrupted; the sum is not released.
    #[error("secure aggregation: the revealed shares of `{owner}`'s {secret} disagree")]
    SharesDisagree { owner: String, secret: &'static str },

    /// The mask key rebuilt from the shares is not the one `owner` advertised.
    #[error("secure aggregation: the mask key rebuilt for `{owner}` does not match its public key")]
    WrongSecret { owner: String },

    /// Sealing a share failed (cannot happen with well-formed sizes).
    #[error("secure aggregation: cannot seal the share for `{to}`")]
    Seal { to: String },
}

pub type Result<T> = std::result::Result<T, Error>;
