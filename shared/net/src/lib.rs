//! fedstat's network layer: one session interface over QUIC or TLS-over-TCP ([`session`],
//! [`tcp`], [`dial`]), streams carrying the protocol's frames and tensors
//! ([`transport`]), the rustls configuration of both ends with certificate revocation
//! ([`tls`]), who a peer is from its certificate ([`identity`]), the federation's PKI
//! ([`pki`]), signatures by certificate keys over application statements ([`attest`]) and
//! what every binary does at its edges ([`process`]).
#![forbid(unsafe_code)]

pub mod attest;
pub mod dial;
pub mod error;
pub mod identity;
pub mod pki;
pub mod process;
pub mod session;
pub mod tcp;
pub mod tls;
pub mod transport;

pub use error::{Error, Result};

/// A throw-away federation CA for unit tests: its folder holds `ca.pem`, the CA key, the CRL
/// and a coordinator certificate for `localhost` and `127.0.0.1`. Test modules add their own
/// methods to it.
#[cfg(test)]
pub(crate) mod test_ca {
    use std::path::PathBuf;

    pub struct TestCa {
        _tmp: tempfile::TempDir,
        pub dir: PathBuf,
    }

    impl TestCa {
        pub fn new(federation: &str) -> TestCa {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().to_path_buf();
            crate::pki::init(
                &crate::pki::CaDir::new(&dir),
                federation,
                &["localhost".into(), "127.0.0.1".into()],
            )
            .expect("init");
            TestCa { _tmp: tmp, dir }
        }
    }
}
