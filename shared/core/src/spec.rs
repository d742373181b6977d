//! Validation of the experiment form ([`fedstat_proto::spec`], re-exported here): everything
//! that can be checked without data, with the bounds both sides enforce.

use std::path::Path;

pub use fedstat_proto::spec::*;

use crate::{Error, Result};

/// Largest model the federation accepts, in parameters (a guard against typos, not a design
/// limit of the aggregator). Coordinators and nodes set tighter limits in their configs.
pub const MAX_PARAMS: u64 = 100_000_000;
/// Most levels one categorical feature may declare. Checked before any node allocates a design
/// matrix, so a spec padded with unused levels is refused from its text alone; a node's policy
/// (`max_levels`) is usually much tighter.
pub const MAX_LEVELS: usize = 1_000;
pub use fedstat_proto::design::MAX_DESIGN_COLUMNS;
pub use fedstat_proto::formula::MAX_FORMULA_CHARS;
/// Longest experiment name and purpose, in characters.
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_PURPOSE_CHARS: usize = 4_000;
/// Longest column name, level or dataset name, in characters.
pub const MAX_IDENT_CHARS: usize = 128;
/// Bounds on the round settings: a phase waits at most a day, a round is retried at most 10
/// times, and local training makes at most 1000 passes (node policies bound these further).
pub const MAX_ROUND_TIMEOUT_SECS: u64 = 86_400;
pub const MAX_ROUND_RETRIES: u32 = 10;
pub const MAX_LOCAL_EPOCHS: u32 = 1_000;
/// Most Newton/IRLS iterations an exact fit may ask for.
pub const MAX_ITERATIONS: u32 = 1_000;
/// Most offices an `office_effects` experiment may list.
pub const MAX_OFFICES: usize = 1_000;

const WHAT: &str = "experiment";

/// Researchers' text: at most `max` characters, nothing unprintable (see [`crate::text`]).
fn check_text(key: &str, text: &str, max: usize) -> Result<()> {
    if text.chars().count() > max {
        return Err(Error::config(
            WHAT,
            key,
            format!("must be at most {max} characters"),
        ));
    }
    if text.chars().any(crate::text::is_unprintable) {
        return Err(Error::config(
            WHAT,
            key,
            "contains a control or invisible formatting character; use printable text only",
        ));
    }
    Ok(())
}

/// Parse and validate an experiment TOML file.
pub fn from_toml_file(path: &Path) -> Result<ExperimentSpec> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    let spec: ExperimentSpec = toml::from_str(&text).map_err(|e| Error::Toml {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    validate(&spec)?;
    Ok(spec)
}

/// Check everything that can be checked without data. Researchers' text (name, purpose,
/// dataset, columns, levels) must be printable: it is shown to custodians and logged.
pub fn validate(spec: &ExperimentSpec) -> Result<()> {
    if spec.name.trim().is_empty() {
        return Err(Error::config(WHAT, "name", "must not be empty"));
    }
    check_text("name", &spec.name, MAX_NAME_CHARS)?;
    check_text("purpose", &spec.purpose, MAX_PURPOSE_CHARS)?;
    check_text("dataset", &spec.dataset, MAX_IDENT_CHARS)?;
    if spec.rounds == 0 || spec.rounds > 100_000 {
        return Err(Error::config(WHAT, "rounds", "must be between 1 and 100000"));
    }
    if spec.min_nodes == 0 {
        return Err(Error::config(WHAT, "min_nodes", "must be at least 1"));
    }
    if spec.round_timeout_secs == 0 || spec.round_timeout_secs > MAX_ROUND_TIMEOUT_SECS {
        return Err(Error::config(
            WHAT,
            "round_timeout_secs",
            format!("must be between 1 and {MAX_ROUND_TIMEOUT_SECS}"),
        ));
    }
    if spec.max_round_retries > MAX_ROUND_RETRIES {
        return Err(Error::config(
            WHAT,
            "max_round_retries",
            format!("must be at most {MAX_ROUND_RETRIES}"),
        ));
    }
    let t = &spec.training;
    if t.local_epochs == 0 || t.local_epochs > MAX_LOCAL_EPOCHS {
        return Err(Error::config(
            WHAT,
            "training.local_epochs",
            format!("must be between 1 and {MAX_LOCAL_EPOCHS}"),
        ));
    }
    if t.batch_size == 0 {
        return Err(Error::config(WHAT, "training.batch_size", "must be at least 1"));
    }
    if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
        return Err(Error::config(
            WHAT,
            "training.learning_rate",
            "must be a positive number",
        ));
    }
    if !(t.l2.is_finite() && t.l2 >= 0.0) {
        return Err(Error::config(WHAT, "training.l2", "must be zero or positive"));
    }
    match spec.model {
        ModelKind::Echo => {
            let echo = spec
                .echo
                .as_ref()
                .ok_or_else(|| Error::config(WHAT, "echo", "required when model = \"echo\""))?;
            if echo.params == 0 || echo.params > MAX_PARAMS {
                return Err(Error::config(
                    WHAT,
                    "echo.params",
                    format!("must be between 1 and {MAX_PARAMS}"),
                ));
            }
        }
        ModelKind::Table => {
            if spec.dataset.trim().is_empty() {
                return Err(Error::config(
                    WHAT,
                    "dataset",
                    "must name a dataset the nodes offer",
                ));
            }
            if spec.table.is_none() {
                return Err(Error::config(WHAT, "table", "required when model = \"table\""));
            }
            if spec.schema.is_none() {
                return Err(Error::config(
                    WHAT,
                    "schema",
                    "required for tables: it declares the split column and the categorical levels",
                ));
            }
            validate_table(spec)?;
        }
        ModelKind::Linear | ModelKind::Logistic | ModelKind::Poisson | ModelKind::Gamma => {
            if spec.dataset.trim().is_empty() {
                return Err(Error::config(
                    WHAT,
                    "dataset",
                    "must name a dataset the nodes offer",
                ));
            }
            let schema = spec
                .schema
                .as_ref()
                .ok_or_else(|| Error::config(WHAT, "schema", "required for linear and logistic models"))?;
            validate_schema(schema, spec.model, spec.formula.as_deref())?;
            validate_design(spec)?;
        }
    }
    validate_method(spec)?;
    validate_secure(spec)
}

/// Most offices a secure step serves: shares and keys grow with the square of the members.
pub const MAX_SECURE_NODES: u32 = 100;

/// Secure aggregation needs at least two offices in every sum (one office's "sum" is its
/// answer), and a threshold that a federation of at most [`MAX_SECURE_NODES`] can meet.
fn validate_secure(spec: &ExperimentSpec) -> Result<()> {
    if let Some(t) = spec.secure_threshold {
        if !spec.secure_aggregation {
            return Err(Error::config(
                WHAT,
                "secure_threshold",
                "needs secure_aggregation = true",
            ));
        }
        if !(2..=MAX_SECURE_NODES).contains(&t) {
            return Err(Error::config(
                WHAT,
                "secure_threshold",
                format!("must be between 2 and {MAX_SECURE_NODES}"),
            ));
        }
    }
    if spec.secure_aggregation && spec.min_nodes < 2 {
        return Err(Error::config(
            WHAT,
            "min_nodes",
            "must be at least 2 with secure_aggregation: the sum of one office is its answer",
        ));
    }
    Ok(())
}

/// The `[table]` form: `by` columns declared in `[schema]` with their levels, numeric columns
/// with finite bounds and covering bins, the rules' parameters, and sizes (at most
/// [`crate::tabulate::MAX_CELLS`] cells) checked before anything is allocated.
fn validate_table(spec: &ExperimentSpec) -> Result<()> {
    if let Some(t) = &spec.table {
        for col in t.by.iter().chain(t.numeric.iter().map(|n| &n.column)) {
            check_text("table", col, MAX_IDENT_CHARS)?;
        }
    }
    crate::tabulate::validate(spec).map_err(|e| match e {
        crate::tabulate::TableError::Spec { key, problem } => Error::config(WHAT, key, problem),
        other => Error::config(WHAT, "table", other.to_string()),
    })
}

/// The settings of exact fits: which models they apply to, and the options only they take.
fn validate_method(spec: &ExperimentSpec) -> Result<()> {
    let exact = spec.is_exact_glm();
    match (spec.method, spec.model) {
        (Method::FedAvg, ModelKind::Poisson | ModelKind::Gamma) => {
            return Err(Error::config(
                WHAT,
                "method",
                "poisson and gamma models are fitted exactly only; set method = \"exact\"",
            ))
        }
        (Method::Exact, ModelKind::Echo | ModelKind::Table) => {
            return Err(Error::config(
                WHAT,
                "method",
                "\"exact\" applies to the linear, logistic, poisson and gamma models",
            ))
        }
        _ => {}
    }
    let only_exact = [
        ("weights", spec.weights.is_some()),
        ("offset", spec.offset.is_some()),
        ("office_effects", spec.office_effects),
        ("offices", !spec.offices.is_empty()),
    ];
    for (key, set) in only_exact {
        if set && !exact {
            return Err(Error::config(
                WHAT,
                key,
                "applies to exact fits only (method = \"exact\")",
            ));
        }
    }
    if let Some(col) = &spec.weights {
        check_text("weights", col, MAX_IDENT_CHARS)?;
        if col.trim().is_empty() {
            return Err(Error::config(WHAT, "weights", "column name must not be empty"));
        }
    }
    if let Some(expr) = &spec.offset {
        check_text("offset", expr, MAX_IDENT_CHARS + 5)?;
        if expr.trim().is_empty() {
            return Err(Error::config(
                WHAT,
                "offset",
                "must name a column, or log(column)",
            ));
        }
    }
    if (exact || spec.model == ModelKind::Table) && spec.rounds != 1 {
        return Err(Error::config(
            WHAT,
            "rounds",
            "exact fits and tables take no rounds: an exact fit runs until it converges (see max_iterations)",
        ));
    }
    if spec.max_iterations == 0 || spec.max_iterations > MAX_ITERATIONS {
        return Err(Error::config(
            WHAT,
            "max_iterations",
            format!("must be between 1 and {MAX_ITERATIONS}"),
        ));
    }
    if spec.offices.len() > MAX_OFFICES {
        return Err(Error::config(
            WHAT,
            "offices",
            format!("lists more than {MAX_OFFICES} offices"),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for office in &spec.offices {
        check_text("offices", office, MAX_IDENT_CHARS)?;
        if office.trim().is_empty() || !seen.insert(office) {
            return Err(Error::config(
                WHAT,
                "offices",
                "lists an empty name or an office twice",
            ));
        }
    }
    if spec.office_effects && spec.offices.len() == 1 {
        return Err(Error::config(
            WHAT,
            "offices",
            "office effects need at least two offices",
        ));
    }
    Ok(())
}

/// The design the spec implies: the formula parses, its columns are named well, and the plan
/// is within bounds (see [`fedstat_proto::design`]).
fn validate_design(spec: &ExperimentSpec) -> Result<()> {
    if let Some(text) = &spec.formula {
        check_text("formula", text, MAX_FORMULA_CHARS)?;
    }
    let plan = spec.design().map_err(crate::data::design_error)?;
    let mut columns: Vec<&str> = vec![plan.response.column()];
    for c in &plan.columns {
        for f in &c.factors {
            if let fedstat_proto::design::Factor::Numeric { column, .. } = f {
                columns.push(column);
            }
        }
    }
    for col in columns {
        if col.trim().is_empty() {
            return Err(Error::config(WHAT, "formula", "a column name is empty"));
        }
        check_text("formula", col, MAX_IDENT_CHARS)?;
    }
    if let Some(o) = &plan.offset {
        check_text("offset", &o.column, MAX_IDENT_CHARS)?;
    }
    if !plan.intercept && spec.method != Method::Exact {
        return Err(Error::config(
            WHAT,
            "formula",
            "a model without intercept (`- 1`, `+ 0`) is fitted exactly only; set method = \"exact\"",
        ));
    }
    if plan.columns.len() < 2 && plan.intercept && spec.method != Method::Exact {
        return Err(Error::config(
            WHAT,
            "formula",
            "federated averaging needs at least one term besides the intercept",
        ));
    }
    Ok(())
}

fn validate_schema(schema: &DataSchema, model: ModelKind, formula: Option<&str>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let mut check_col = |key: &str, col: &str| -> Result<()> {
        if col.trim().is_empty() {
            return Err(Error::config(WHAT, key, "column name must not be empty"));
        }
        check_text(key, col, MAX_IDENT_CHARS)?;
        if !seen.insert(col.to_owned()) {
            return Err(Error::config(WHAT, key, format!("column `{col}` is used twice")));
        }
        Ok(())
    };
    check_col("schema.split_column", &schema.split_column)?;
    if let Some(t) = &schema.target {
        check_col("schema.target.column", &t.column)?;
    }
    match (formula, &schema.target) {
        (None, None) => {
            return Err(Error::config(
                WHAT,
                "schema.target",
                "required unless the experiment has a formula",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(Error::config(
                WHAT,
                "schema.target",
                "give the response in the formula or in [schema].target, not both",
            ))
        }
        _ => {}
    }
    if formula.is_some() && !schema.numeric.is_empty() {
        return Err(Error::config(
            WHAT,
            "schema.numeric",
            "the formula names the numeric columns; leave [schema].numeric out",
        ));
    }
    for f in &schema.numeric {
        check_col("schema.numeric.column", &f.column)?;
    }
    for f in &schema.categorical {
        check_col("schema.categorical.column", &f.column)?;
        if f.levels.len() > MAX_LEVELS {
            return Err(Error::config(
                WHAT,
                "schema.categorical.levels",
                format!("column `{}` lists more than {MAX_LEVELS} levels", f.column),
            ));
        }
        for level in &f.levels {
            check_text("schema.categorical.levels", level, MAX_IDENT_CHARS)?;
        }
        if f.levels.len() < 2 {
            return Err(Error::config(
                WHAT,
                "schema.categorical.levels",
                format!("column `{}` needs at least two levels", f.column),
            ));
        }
        let distinct: std::collections::BTreeSet<_> = f.levels.iter().collect();
        if distinct.len() != f.levels.len() {
            return Err(Error::config(
                WHAT,
                "schema.categorical.levels",
                format!("column `{}` lists a level twice", f.column),
            ));
        }
        if !f.levels.contains(&f.reference) {
            return Err(Error::config(
                WHAT,
                "schema.categorical.reference",
                format!("reference level of column `{}` is not among its levels", f.column),
            ));
        }
    }
    if formula.is_none() && schema.numeric.is_empty() && schema.categorical.is_empty() {
        return Err(Error::config(
            WHAT,
            "schema",
            "needs at least one numeric or categorical feature",
        ));
    }
    if schema.design_width() > MAX_DESIGN_COLUMNS {
        return Err(Error::config(
            WHAT,
            "schema",
            format!("the design would have more than {MAX_DESIGN_COLUMNS} columns"),
        ));
    }
    let Some(t) = &schema.target else {
        return Ok(());
    };
    if let Some(level) = &t.positive_level {
        check_text("schema.target.positive_level", level, MAX_IDENT_CHARS)?;
    }
    match model {
        ModelKind::Linear | ModelKind::Poisson | ModelKind::Gamma => {
            if t.threshold.is_some() || t.positive_level.is_some() {
                return Err(Error::config(
                    WHAT,
                    "schema.target",
                    "threshold and positive_level apply to logistic models only",
                ));
            }
            if t.log && model != ModelKind::Linear {
                return Err(Error::config(
                    WHAT,
                    "schema.target.log",
                    "applies to linear models only (poisson and gamma models have a log link)",
                ));
            }
        }
        ModelKind::Logistic => {
            if t.log {
                return Err(Error::config(
                    WHAT,
                    "schema.target.log",
                    "applies to linear models only",
                ));
            }
            match (&t.threshold, &t.positive_level) {
                (Some(th), None) if th.is_finite() => {}
                (Some(_), None) => {
                    return Err(Error::config(
                        WHAT,
                        "schema.target.threshold",
                        "must be a finite number",
                    ))
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(Error::config(
                        WHAT,
                        "schema.target",
                        "a logistic target needs exactly one of `threshold` or `positive_level`",
                    ))
                }
            }
        }
        ModelKind::Echo | ModelKind::Table => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logit_toml() -> &'static str {
        r#"
name = "high wage"
dataset = "cps1988"
model = "logistic"
rounds = 5
[schema]
target = { column = "wage", threshold = 522.32 }
numeric = [{ column = "education" }, { column = "experience", squared = true }]
categorical = [
  { column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" },
  { column = "smsa", levels = ["no", "yes"], reference = "no" },
]
"#
    }

    #[test]
    fn secure_aggregation_needs_two_offices_and_a_sane_threshold() {
        let mut spec: ExperimentSpec = toml::from_str(logit_toml()).expect("parse");
        spec.secure_aggregation = true;
        let err = validate(&spec).expect_err("min_nodes 1").to_string();
        assert!(
            err.contains("min_nodes") && err.contains("secure_aggregation"),
            "{err}"
        );
        spec.min_nodes = 3;
        validate(&spec).expect("valid");
        spec.secure_threshold = Some(1);
        assert!(validate(&spec)
            .expect_err("threshold 1")
            .to_string()
            .contains("secure_threshold"));
        spec.secure_threshold = Some(3);
        validate(&spec).expect("valid");
        spec.secure_aggregation = false;
        assert!(validate(&spec)
            .expect_err("threshold without masking")
            .to_string()
            .contains("needs secure_aggregation"));
    }

    #[test]
    fn design_columns_follow_the_reference_order() {
        let spec: ExperimentSpec = toml::from_str(logit_toml()).expect("parse");
        validate(&spec).expect("valid");
        let cols = spec
            .schema
            .as_ref()
            .map(|s| s.design_columns())
            .unwrap_or_default();
        assert_eq!(
            cols,
            [
                "const",
                "education",
                "experience",
                "experience^2",
                "ethnicity=afam",
                "smsa=yes"
            ]
        );
        assert_eq!(spec.num_params(), 6);
    }

    #[test]
    fn invalid_specs_name_the_key() {
        let check = |edit: &dyn Fn(&mut ExperimentSpec), key: &str| {
            let mut spec: ExperimentSpec = toml::from_str(logit_toml()).expect("parse");
            edit(&mut spec);
            let err = validate(&spec).expect_err("must be invalid").to_string();
            assert!(err.contains(key), "{err} should name {key}");
        };
        check(&|s| s.rounds = 0, "rounds");
        check(&|s| s.training.learning_rate = f64::NAN, "training.learning_rate");
        check(
            &|s| {
                if let Some(schema) = s.schema.as_mut() {
                    if let Some(t) = schema.target.as_mut() {
                        t.threshold = None;
                    }
                }
            },
            "schema.target",
        );
        check(
            &|s| {
                if let Some(schema) = s.schema.as_mut() {
                    schema.categorical[0].reference = "other".into();
                }
            },
            "schema.categorical.reference",
        );
        check(&|s| s.model = ModelKind::Echo, "echo");
        check(&|s| s.name = "a\u{1b}[2Jname".into(), "name");
        check(&|s| s.purpose = "why\u{202E}".into(), "purpose");
        check(&|s| s.max_round_retries = 11, "max_round_retries");
        check(&|s| s.round_timeout_secs = 86_401, "round_timeout_secs");
        check(&|s| s.training.local_epochs = 1_001, "training.local_epochs");
        check(
            &|s| {
                if let Some(schema) = s.schema.as_mut() {
                    let f = &mut schema.categorical[0];
                    f.levels.extend((0..1_000).map(|i| format!("pad{i}")));
                }
            },
            "schema.categorical.levels",
        );
        check(
            &|s| {
                if let Some(schema) = s.schema.as_mut() {
                    schema.categorical[1].levels[1] = "y\nes".into();
                }
            },
            "schema.categorical.levels",
        );
    }

    #[test]
    fn design_width_matches_the_column_names() {
        let spec: ExperimentSpec = toml::from_str(logit_toml()).expect("parse");
        let schema = spec.schema.as_ref().expect("schema");
        assert_eq!(schema.design_width(), schema.design_columns().len());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!(
            "{}\nlearning_rat = 0.1\n",
            logit_toml().replace("[schema]", "bogus = 1\n[schema]")
        );
        assert!(toml::from_str::<ExperimentSpec>(&text).is_err());
    }

    fn formula_toml(formula: &str, extra: &str) -> String {
        format!(
            "name = \"wages\"\ndataset = \"cps1988\"\nmodel = \"linear\"\n{extra}\nformula = '{formula}'\n\
             [schema]\ncategorical = [\
             {{ column = \"ethnicity\", levels = [\"cauc\", \"afam\"], reference = \"cauc\" }}, \
             {{ column = \"smsa\", levels = [\"no\", \"yes\"], reference = \"no\" }}]\n"
        )
    }

    #[test]
    fn formulas_are_validated_with_the_key_that_is_wrong() {
        let ok = |text: &str| {
            let spec: ExperimentSpec = toml::from_str(text).expect("parse");
            validate(&spec).unwrap_or_else(|e| panic!("{text}: {e}"));
            spec
        };
        let spec = ok(&formula_toml(
            "log(wage) ~ education + I(experience^2) + ethnicity*smsa",
            "",
        ));
        assert_eq!(
            spec.design_columns(),
            [
                "const",
                "education",
                "experience^2",
                "ethnicity=afam",
                "smsa=yes",
                "ethnicity=afam:smsa=yes"
            ]
        );
        assert_eq!(spec.num_params(), 6);
        ok(&formula_toml("wage ~ education - 1", "method = \"exact\""));
        let fails = |text: &str, key: &str, words: &str| {
            let spec: ExperimentSpec = toml::from_str(text).expect("parse");
            let e = validate(&spec).expect_err(text).to_string();
            assert!(
                e.contains(&format!("key `{key}`")) && e.contains(words),
                "{text}: {e}"
            );
        };
        fails(&formula_toml("wage ~ education +", ""), "formula", "character 19");
        fails(
            &formula_toml("wage ~ education - 1", ""),
            "formula",
            "method = \"exact\"",
        );
        fails(
            &formula_toml("wage ~ I(ethnicity^2)", ""),
            "formula",
            "categorical",
        );
        fails(&formula_toml("wage ~ `a\u{202E}b`", ""), "formula", "control");
        fails(
            &formula_toml("wage ~ education", "")
                .replace("[schema]", "[schema]\ntarget = { column = \"wage\" }"),
            "schema.target",
            "not both",
        );
        fails(
            &formula_toml("wage ~ education", "")
                .replace("[schema]", "[schema]\nnumeric = [{ column = \"education\" }]"),
            "schema.numeric",
            "formula",
        );
        fails(
            &formula_toml("wage ~ education", "").replace("formula = 'wage ~ education'", ""),
            "schema.target",
            "unless the experiment has a formula",
        );
        fails(
            &formula_toml("I(wage > 500) ~ education", ""),
            "formula",
            "logistic",
        );
    }

    /// The shipped formula example is the linear example written as a formula.
    #[test]
    fn the_formula_example_has_the_design_of_the_linear_example() {
        let formula: ExperimentSpec =
            toml::from_str(include_str!("../../../configs/experiment-formula.toml"))
                .expect("formula example");
        let lists: ExperimentSpec =
            toml::from_str(include_str!("../../../configs/experiment-linear.toml")).expect("linear example");
        validate(&formula).expect("valid");
        assert_eq!(formula.design_columns(), lists.design_columns());
        let (f, l) = (formula.design().expect("plan"), lists.design().expect("plan"));
        assert_eq!((f.response, f.columns), (l.response, l.columns));
    }
}
