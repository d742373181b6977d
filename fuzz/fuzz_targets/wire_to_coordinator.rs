//! Bytes a peer sends the coordinator: a node's control stream (`NodeMsg` frames), an answer
//! stream (`AnswerHeader` then raw tensor bytes, checked by the algorithms' answer rules) and a
//! researcher's request stream (`Request`).
//! The first byte picks the stream kind; decoded messages go through the same checks the
//! coordinator applies before they reach the round state machine.
#![no_main]

use fedstat_core::aggregate::{AggregatorKind, Staging};
use fedstat_core::algorithm::{evaluate, standardize, Answer};
use fedstat_core::spec::ModelKind;
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{AnswerHeader, NodeMsg, Request};
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
            if let Some((header, body)) = common::one::<AnswerHeader>(rest, "answer header") {
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
