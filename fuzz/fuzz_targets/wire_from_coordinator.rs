//! Bytes the coordinator sends its peers, as a node or the researcher CLI decodes them: the
//! node's control stream (`CoordMsg`), a task stream (`Task`, then the model's raw bytes) and a
//! response stream (`Response`, then a results tensor). A node must survive a hostile or broken
//! coordinator too: the task's spec and standardisation are checked before any work starts.
#![no_main]

use fedstat_core::aggregate::Staging;
use fedstat_core::data::StandardizationExt;
use fedstat_proto::manifest::Manifest;
use fedstat_proto::wire::{CoordMsg, Response, Task, TensorMeta};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

/// Largest tensor the target stages.
const MAX_LEN: u64 = 1 << 16;

fn stage(meta: TensorMeta, bytes: &[u8]) {
    let _ = meta.byte_len();
    if meta.len > MAX_LEN {
        return;
    }
    let mut staging = Staging::new(meta.dtype, meta.len as usize);
    if staging.push(bytes).is_ok() {
        let _ = staging.finish();
    }
}

fn check_task(task: &Task) {
    let manifest = Manifest::new(&task.spec, &task.submitter);
    let _ = manifest.hash();
    if fedstat_core::spec::validate(&task.spec).is_err() {
        return;
    }
    let _ = task.spec.num_params();
    if let (Some(schema), Some(st)) = (&task.spec.schema, &task.standardization) {
        let _ = st.validate(schema.design_columns().len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            common::frames::<CoordMsg>(rest, "coordinator message", |_| {});
        }
        1 => {
            if let Some((task, body)) = common::one::<Task>(rest, "task") {
                check_task(&task);
                if let Some(meta) = task.model {
                    stage(meta, body);
                }
            }
        }
        _ => {
            // A researcher reads one response per stream; a stream of several tests more frames.
            common::frames::<Response>(rest, "response", |_| {});
            if let Some((Response::Results(header), body)) = common::one::<Response>(rest, "response") {
                let _ = fedstat_core::spec::validate(&header.spec);
                if let Some(st) = &header.standardization {
                    let _ = st.validate(header.columns.len());
                }
                stage(header.tensor, body);
            }
        }
    }
});
