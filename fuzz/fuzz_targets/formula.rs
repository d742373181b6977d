//! Formulas from the network: any text parses to a bounded plan or a positioned error, and a
//! plan that is made has `num_params` distinct columns, never more than the design limit.
#![no_main]

use fedstat_proto::design::MAX_DESIGN_COLUMNS;
use fedstat_proto::formula::parse;
use fedstat_proto::spec::ExperimentSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse(text) {
        assert!(e.position >= 1, "{e}");
    }
    let form = "name = \"fuzz\"\nmodel = \"linear\"\nmethod = \"exact\"\n[schema]\ncategorical = [\
                { column = \"f\", levels = [\"a\", \"b\", \"c\"], reference = \"a\" }, \
                { column = \"g\", levels = [\"u\", \"v\"], reference = \"u\" }]\n";
    let Ok(mut spec) = toml::from_str::<ExperimentSpec>(form) else {
        return;
    };
    spec.formula = Some(text.to_owned());
    if let Ok(plan) = spec.design() {
        assert!(plan.columns.len() <= MAX_DESIGN_COLUMNS + 1);
        assert_eq!(plan.columns.len() as u64, spec.num_params());
        let names: std::collections::BTreeSet<&str> = plan.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), plan.columns.len());
    }
});
