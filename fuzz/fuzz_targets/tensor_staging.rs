//! Raw tensor bytes as QUIC delivers them: `Staging` fed the same bytes in arbitrary pieces
//! must reach the same verdict and the same values as when fed them in one piece, and accept
//! them exactly when they are the announced number of in-range values.
#![no_main]

use fedstat_core::aggregate::{Staging, Values};
use fedstat_proto::wire::{tensor_to_f64, DType};
use libfuzzer_sys::fuzz_target;

/// The input: a dtype flag, the announced number of values, up to 15 piece sizes (the last
/// piece takes what is left), then the bytes.
#[derive(Debug)]
struct Input<'a> {
    f64: bool,
    len: u8,
    splits: &'a [u8],
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[flags, len], rest) = data.split_first_chunk::<2>()?;
        let n = usize::from(flags >> 4).min(rest.len());
        Some(Input {
            f64: flags & 1 == 1,
            len,
            splits: &rest[..n],
            bytes: &rest[n..],
        })
    }
}

fn stage(dtype: DType, len: usize, pieces: &[&[u8]]) -> Result<Values, String> {
    let mut s = Staging::new(dtype, len);
    for p in pieces {
        s.push(p).map_err(|e| e.to_string())?;
    }
    s.finish().map_err(|e| e.to_string())
}

fn bits(v: &Values) -> Vec<u64> {
    match v {
        Values::F32(v) => v.iter().map(|x| u64::from(x.to_bits())).collect(),
        Values::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let dtype = if input.f64 { DType::F64 } else { DType::F32 };
    let len = usize::from(input.len);

    let mut pieces = Vec::new();
    let mut rest = input.bytes;
    for &s in input.splits {
        let take = usize::from(s).min(rest.len());
        pieces.push(&rest[..take]);
        rest = &rest[take..];
    }
    pieces.push(rest);

    let whole = stage(dtype, len, &[input.bytes]);
    let split = stage(dtype, len, &pieces);
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert_eq!(bits(a), bits(b), "values depend on how the bytes were split"),
        (Err(_), Err(_)) => {}
        _ => panic!("verdict depends on the split: {whole:?} vs {split:?}"),
    }

    // Accepted exactly when the bytes are `len` whole values, all finite and in range.
    let expected_ok = input.bytes.len() == len * dtype.size()
        && tensor_to_f64(input.bytes, dtype)
            .expect("whole values")
            .iter()
            .all(|x| x.abs() < fedstat_core::aggregate::MAX_ABS_VALUE);
    assert_eq!(whole.is_ok(), expected_ok, "{whole:?}");
    if let Ok(values) = whole {
        assert_eq!(values.len(), len);
        assert_eq!(values.dtype(), dtype);
        let decoded = tensor_to_f64(input.bytes, dtype).expect("whole values");
        assert_eq!(values.to_f64(), decoded);
        let _ = fedstat_core::aggregate::validate(&values, fedstat_core::aggregate::MAX_ABS_PARAM);
    }
});
