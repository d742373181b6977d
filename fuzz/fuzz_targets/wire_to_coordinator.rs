//! Bytes a peer sends the coordinator: a node's control stream (`NodeMsg` frames, secure
//! aggregation's messages included), an answer stream (`Upload`: an `AnswerHeader` then raw
//! tensor bytes, checked by the algorithms' answer rules, or a masked answer's header, whose
//! ring sum is pooled as the engine would) and a researcher's request stream (`Request`).
//! The first byte picks the stream kind; decoded messages go through the same checks the
//! coordinator applies before they reach the round state machine.
#![no_main]

use fedstat_core::aggregate::{pooled_from_ring, AggregatorKind, Staging, RING_BYTES};
use fedstat_core::algorithm::{evaluate, standardize, Answer};
use fedstat_core::spec::ModelKind;
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{DType, NodeMsg, Request, Upload};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// Largest tensor the target stages (a real coordinator caps it at `limits.max_params`).
const MAX_LEN: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            common::frames::<NodeMsg>(rest, "node message", |_| {});
        }
        1 => {
            let Some((upload, body)) = common::one::<Upload>(rest, "upload header") else {
                return;
            };
            if let Upload::Masked(m) = upload {
                // An unmasked sum is any bytes: pooling it must fail cleanly or succeed.
                let len = (m.len as usize).min(1 << 12);
                let take = body.len() / RING_BYTES * RING_BYTES;
                for kind in [AggregatorKind::Sum, AggregatorKind::Mean] {
                    for aux in 0..2 {
                        let values = (take / RING_BYTES).saturating_sub(1 + aux).min(len);
                        let _ = pooled_from_ring(kind, DType::F64, values, aux, &body[..take], 3);
                    }
                }
                return;
            }
            if let Upload::Answer(header) = upload {
                let _ = header.tensor.byte_len();
                if header.tensor.len <= MAX_LEN {
                    let (dtype, len) = (header.tensor.dtype, header.tensor.len as usize);
                    let mut staging = Staging::new(dtype, len);
                    if staging.push(body).is_err() {
                        return;
                    }
                    let Ok(values) = staging.finish() else { return };
                    let answer = Answer {
                        values: &values,
                        weight: header.weight,
                        aux: &header.aux,
                    };
                    let _ = standardize::check(answer);
                    for kind in [ModelKind::Linear, ModelKind::Logistic, ModelKind::Echo] {
                        let _ = evaluate::check(kind, answer);
                    }
                    for agg in [AggregatorKind::Sum, AggregatorKind::Mean, AggregatorKind::Median] {
                        let mut a = agg.start(dtype, len, header.aux.len());
                        if a.fold(&values, header.weight, &header.aux).is_ok() {
                            let _ = a.finish();
                        }
                    }
                }
            }
        }
        _ => {
            common::frames::<Request>(rest, "request", |req| {
                if let Request::Submit { spec } = req {
                    let _ = Manifest::new(spec, "researcher `fuzz`").hash();
                    if fedstat_core::spec::validate(&spec).is_ok() {
                        let _ = spec.num_params();
                        if let Some(schema) = &spec.schema {
                            let _ = schema.design_columns();
                        }
                    }
                }
            });
        }
    }
});
