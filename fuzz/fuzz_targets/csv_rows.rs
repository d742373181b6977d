//! A node's CSV file: header, quoting, BOM, CRLF, numbers and levels, the split column, against
//! a few fixed schemas (the first byte picks one). Whatever the bytes, the reader returns data
//! of the schema's shape or an error; it never panics.
#![no_main]

use fedstat_shared::data::load_csv_from_reader;
use fedstat_shared::spec::{CategoricalFeature, DataSchema, ModelKind, NumericFeature, TargetSpec};
use libfuzzer_sys::fuzz_target;

fn schema(pick: u8) -> (DataSchema, ModelKind) {
    let target = |column: &str| TargetSpec {
        column: column.into(),
        log: false,
        threshold: None,
        positive_level: None,
    };
    let numeric = |column: &str, squared: bool| NumericFeature {
        column: column.into(),
        squared,
    };
    let region = CategoricalFeature {
        column: "region".into(),
        levels: vec!["north".into(), "south".into(), "\"east\"".into()],
        reference: "north".into(),
    };
    match pick % 4 {
        0 => (
            DataSchema {
                split_column: "split".into(),
                target: TargetSpec {
                    log: true,
                    ..target("wage")
                },
                numeric: vec![numeric("age", true), numeric("edu", false)],
                categorical: vec![region],
            },
            ModelKind::Linear,
        ),
        1 => (
            DataSchema {
                split_column: "split".into(),
                target: TargetSpec {
                    threshold: Some(0.5),
                    ..target("wage")
                },
                numeric: vec![numeric("age", false)],
                categorical: vec![],
            },
            ModelKind::Logistic,
        ),
        2 => (
            DataSchema {
                split_column: "s".into(),
                target: TargetSpec {
                    positive_level: Some("south".into()),
                    ..target("region")
                },
                numeric: vec![numeric("a", false), numeric("b", true)],
                categorical: vec![],
            },
            ModelKind::Logistic,
        ),
        _ => (
            DataSchema {
                split_column: "split".into(),
                target: target("y"),
                numeric: vec![],
                categorical: vec![region],
            },
            ModelKind::Linear,
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, csv)) = data.split_first() else {
        return;
    };
    let (schema, model) = schema(pick);
    let p = schema.design_columns().len();
    if let Ok(local) = load_csv_from_reader("fuzz.csv", csv, &schema, model) {
        let lines = csv.iter().filter(|&&b| b == b'\n').count() + 1;
        for d in [&local.train, &local.test] {
            assert_eq!(d.x.ncols(), p, "design width");
            assert_eq!(d.x.nrows(), d.y.len(), "rows of x and y");
            assert!(d.x.iter().chain(d.y.iter()).all(|v| v.is_finite()), "non-finite value accepted");
        }
        assert!(local.train.rows() + local.test.rows() < lines, "more rows than lines");
    }
});
