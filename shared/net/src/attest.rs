//! TEMPORARY STUB (replaced by the secagg branch): certificate-key signatures of secure
//! aggregation's keys.
use std::path::Path;

use crate::Result;

pub struct Signer {
    cert: Vec<u8>,
}

impl Signer {
    pub fn load(_key: &Path, _cert: &Path) -> Result<Signer> {
        Ok(Signer { cert: Vec::new() })
    }
    pub fn sign(&self, _msg: &[u8]) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert
    }
}

pub struct Verifier;

impl Verifier {
    pub fn load(_ca: &Path, _crl: Option<&Path>) -> Result<Verifier> {
        Ok(Verifier)
    }
    pub fn verify(&self, _cert: &[u8], _name: &str, _msg: &[u8], _sig: &[u8]) -> Result<()> {
        Ok(())
    }
}
