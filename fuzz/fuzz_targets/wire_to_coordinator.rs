//! Bytes a peer sends the coordinator: a node's control stream (`NodeMsg` frames), an update
//! stream (`UpdateHeader` then raw tensor bytes) and a researcher's request stream (`Request`).
//! The first byte picks the stream kind; decoded messages go through the same checks the
//! coordinator applies before they reach the round state machine.
#![no_main]

use fedstat_core::aggregate::Staging;
use fedstat_core::data::ColumnSumsExt;
use fedstat_core::model::EvalSumsExt;
use fedstat_core::spec::ModelKind;
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{NodeMsg, Request, UpdateHeader};
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
            common::frames::<NodeMsg>(rest, "node message", |msg| match msg {
                NodeMsg::StatsReply { sums, .. } => {
                    let _ = sums.validate(sums.sum.len());
                    let _ = sums.validate(3);
                }
                NodeMsg::EvalReply { sums, .. } => {
                    for kind in [ModelKind::Linear, ModelKind::Logistic, ModelKind::Echo] {
                        let _ = sums.validate(kind);
                    }
                }
                _ => {}
            });
        }
        1 => {
            if let Some((header, body)) = common::one::<UpdateHeader>(rest, "update header") {
                let _ = header.tensor.byte_len();
                if header.tensor.len <= MAX_LEN {
                    let mut staging = Staging::new(header.tensor.dtype, header.tensor.len as usize);
                    if staging.push(body).is_ok() {
                        let _ = staging.finish();
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
