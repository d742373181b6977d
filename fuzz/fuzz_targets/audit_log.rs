//! An audit log as `audit verify` reads it: any bytes, possibly edited, cut or reordered. The
//! verifier names the first bad record or counts intact ones; it never panics.
#![no_main]

use fedstat_core::audit::verify_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = verify_bytes(data);
    let lines = data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
    assert!(report.records <= lines, "more records than lines");
    if let Some(bad) = &report.first_bad {
        assert!(
            bad.line >= 1 && bad.line > report.records,
            "bad line before the intact ones"
        );
    }
    let _ = report.to_string();
});
