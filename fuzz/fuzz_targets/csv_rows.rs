//! A node's CSV file: header, quoting, BOM, CRLF, numbers and levels, the split column, against
//! a few fixed schemas shaped like the demo data (the first byte picks one). Whatever the bytes,
//! the reader returns data of the schema's shape or an error; it never panics.
#![no_main]

use fedstat_core::data::{load_csv_from_reader, LoadLimits};
use fedstat_core::spec::{CategoricalFeature, DataSchema, ModelKind, NumericFeature, TargetSpec};
use libfuzzer_sys::fuzz_target;

fn target(column: &str) -> TargetSpec {
    TargetSpec {
        column: column.into(),
        log: false,
        threshold: None,
        positive_level: None,
    }
}

fn numeric(column: &str, squared: bool) -> NumericFeature {
    NumericFeature {
        column: column.into(),
        squared,
    }
}

fn categorical(column: &str, levels: &[&str]) -> CategoricalFeature {
    CategoricalFeature {
        column: column.into(),
        levels: levels.iter().map(|l| (*l).to_owned()).collect(),
        reference: levels[0].to_owned(),
    }
}

fn schema(pick: u8) -> (DataSchema, ModelKind) {
    let region = || categorical("region", &["northeast", "midwest", "south", "west"]);
    let (schema, kind) = match pick % 4 {
        0 => (
            DataSchema {
                split_column: "split".into(),
                target: Some(TargetSpec {
                    log: true,
                    ..target("wage")
                }),
                numeric: vec![numeric("experience", true), numeric("education", false)],
                categorical: vec![region(), categorical("parttime", &["no", "yes"])],
            },
            ModelKind::Linear,
        ),
        1 => (
            DataSchema {
                split_column: "split".into(),
                target: Some(TargetSpec {
                    threshold: Some(600.0),
                    ..target("wage")
                }),
                numeric: vec![numeric("education", false)],
                categorical: vec![],
            },
            ModelKind::Logistic,
        ),
        2 => (
            DataSchema {
                split_column: "split".into(),
                target: Some(TargetSpec {
                    positive_level: Some("yes".into()),
                    ..target("smsa")
                }),
                numeric: vec![numeric("experience", false)],
                categorical: vec![region()],
            },
            ModelKind::Logistic,
        ),
        _ => (
            DataSchema {
                split_column: "split".into(),
                target: Some(target("wage")),
                numeric: vec![],
                categorical: vec![categorical("ethnicity", &["cauc", "afam"])],
            },
            ModelKind::Linear,
        ),
    };
    (schema, kind)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, csv)) = data.split_first() else {
        return;
    };
    let (schema, model) = schema(pick);
    let p = schema.design_columns().len();
    if let Ok(local) =
        load_csv_from_reader("fuzz.csv", csv, &schema, model, LoadLimits { max_cells: 1 << 20 })
    {
        let lines = csv.iter().filter(|&&b| b == b'\n').count() + 1;
        for d in [&local.train, &local.test] {
            assert_eq!(d.x.ncols(), p, "design width");
            assert_eq!(d.x.nrows(), d.y.len(), "rows of x and y");
            assert_eq!(d.ids.len(), d.y.len(), "one fingerprint per row");
            assert!(
                d.x.iter().chain(d.y.iter()).all(|v| v.is_finite()),
                "non-finite value accepted"
            );
        }
        assert!(
            local.train.rows() + local.test.rows() < lines,
            "more rows than lines"
        );
    }
});
