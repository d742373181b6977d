//! The design plan: one description of the design matrix, response, weights and offset that
//! the coordinator and every node compute alike, from either the `[schema]` lists or the
//! formula, plus the office columns. Nodes build their matrices from it
//! (`fedstat_core::data::load_design`), custodians approve its column names, and the disclosure
//! rules read which factors (and which factor × factor cells) it uses.
//!
//! Coding: a name is a categorical factor iff it is declared in `[schema].categorical` (with its
//! levels and reference); otherwise it is numeric. Factors use treatment contrasts: one column
//! per level but the reference. In an interaction every factor drops its reference too, so
//! `f:x` without the main effect `f` has one column fewer than R's `model.matrix`, which codes
//! a factor whose main effect is absent with all its levels; the model then constrains the
//! reference level's slope to zero instead (add `f` or write `f*x` for R's fit). Without an
//! intercept, the first factor main effect gets all its levels, as in R.
//!
//! Column names: `const`, `education`, `experience^2`, `ethnicity=afam`, interactions joined by
//! `:` (`ethnicity=afam:education`), and `office=NAME`. Interaction columns vary the first factor
//! fastest, as R's do.

use serde::{Deserialize, Serialize};

use crate::formula::{self, FormulaError, Var};
use crate::spec::{CategoricalFeature, DataSchema, ExperimentSpec, ModelKind};

/// Most design columns a model may have (node policies set `max_params` far lower).
pub const MAX_DESIGN_COLUMNS: usize = 10_000;

/// The response of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The column's value, or its natural logarithm (the column must then be positive).
    Value { column: String, log: bool },
    /// 1 when the column's value is above `threshold`, else 0 (logistic).
    Above { column: String, threshold: f64 },
    /// 1 when the column's value is `level`, else 0 (logistic).
    Level { column: String, level: String },
}

impl Response {
    /// The column the response is read from.
    pub fn column(&self) -> &str {
        match self {
            Response::Value { column, .. }
            | Response::Above { column, .. }
            | Response::Level { column, .. } => column,
        }
    }

    /// Whether the response is 0/1.
    pub fn is_binary(&self) -> bool {
        !matches!(self, Response::Value { .. })
    }
}

/// One factor of a design column; the column is the product of its factors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Factor {
    /// A numeric column raised to `power` (1 to 4).
    Numeric { column: String, power: u8 },
    /// 1 when the categorical column has this level, else 0.
    Level { column: String, level: String },
    /// 1 at the office of this name, else 0.
    Office { name: String },
}

/// A design column: its name and the factors whose product it is (none: the constant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesignColumn {
    pub name: String,
    pub factors: Vec<Factor>,
}

/// The offset of a GLM's linear predictor: a column, or its logarithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offset {
    pub column: String,
    pub log: bool,
}

/// Everything a node needs to turn its CSV into a design.
#[derive(Debug, Clone, PartialEq)]
pub struct DesignPlan {
    pub response: Response,
    /// Whether `columns[0]` is the constant.
    pub intercept: bool,
    pub columns: Vec<DesignColumn>,
    /// Column of prior weights (finite, non-negative).
    pub weights: Option<String>,
    pub offset: Option<Offset>,
    /// The column with `train` or `test`.
    pub split_column: String,
    /// The declared categorical columns the plan reads (features and a level response), with
    /// their levels.
    pub categorical: Vec<CategoricalFeature>,
    /// The offices of an office-effects experiment (the first is the reference); else empty.
    pub offices: Vec<String>,
}

impl DesignPlan {
    /// Column names in parameter order.
    pub fn names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// The factors of the plan's columns that are categorical, as sets of column names: every
    /// single factor, and every combination of two or more factors that appear together in one
    /// design column (the interaction cells the disclosure rules check). Sorted, distinct.
    pub fn factor_sets(&self) -> Vec<Vec<String>> {
        let mut sets: Vec<Vec<String>> = Vec::new();
        for c in &self.columns {
            let mut cols: Vec<String> = c
                .factors
                .iter()
                .filter_map(|f| match f {
                    Factor::Level { column, .. } => Some(column.clone()),
                    _ => None,
                })
                .collect();
            cols.sort();
            cols.dedup();
            for col in &cols {
                if !sets.contains(&vec![col.clone()]) {
                    sets.push(vec![col.clone()]);
                }
            }
            if cols.len() > 1 && !sets.contains(&cols) {
                sets.push(cols);
            }
        }
        sets.sort();
        sets
    }
}

/// Why an experiment has no design.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DesignError {
    #[error(transparent)]
    Formula(#[from] FormulaError),
    /// `key` names the setting of the experiment form that is wrong or missing.
    #[error("key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> DesignError {
    DesignError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// How one variable of a term is coded.
enum Coded<'a> {
    Numeric(&'a Var),
    /// A factor; `full` keeps the reference level (first main effect without intercept).
    Factor(&'a CategoricalFeature, bool),
}

impl Coded<'_> {
    fn width(&self) -> usize {
        match self {
            Coded::Numeric(_) => 1,
            Coded::Factor(f, true) => f.levels.len(),
            Coded::Factor(f, false) => f.levels.len().saturating_sub(1),
        }
    }

    /// (name part, factor) of each column this variable contributes.
    fn parts(&self) -> Vec<(String, Factor)> {
        match self {
            Coded::Numeric(v) => vec![(
                if v.power == 1 {
                    v.column.clone()
                } else {
                    format!("{}^{}", v.column, v.power)
                },
                Factor::Numeric {
                    column: v.column.clone(),
                    power: v.power,
                },
            )],
            Coded::Factor(f, full) => f
                .levels
                .iter()
                .filter(|l| *full || **l != f.reference)
                .map(|l| {
                    (
                        format!("{}={}", f.column, l),
                        Factor::Level {
                            column: f.column.clone(),
                            level: l.clone(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl DataSchema {
    fn declared(&self, column: &str) -> Option<&CategoricalFeature> {
        self.categorical.iter().find(|f| f.column == column)
    }
}

/// The plan of the formula form.
fn from_formula(text: &str, schema: &DataSchema) -> Result<(Response, bool, Vec<DesignColumn>), DesignError> {
    let f = formula::parse(text)?;
    if schema.target.is_some() {
        return Err(invalid(
            "schema.target",
            "give the response in the formula or in [schema].target, not both",
        ));
    }
    if let Response::Level { column, level } = &f.response {
        if let Some(decl) = schema.declared(column) {
            if !decl.levels.contains(level) {
                return Err(invalid(
                    "formula",
                    format!("level `{level}` of the response is not among the declared levels of `{column}`"),
                ));
            }
        }
    }
    if matches!(f.response, Response::Value { .. } | Response::Above { .. })
        && schema.declared(f.response.column()).is_some()
    {
        return Err(invalid(
            "formula",
            format!(
                "the response `{}` is declared categorical; use I({} == level)",
                f.response.column(),
                f.response.column()
            ),
        ));
    }
    // Code every variable, then bound the width before any name is made.
    let mut first_factor_full = !f.intercept;
    let mut coded: Vec<Vec<Coded>> = Vec::with_capacity(f.terms.len());
    for term in &f.terms {
        let mut vars = Vec::with_capacity(term.vars.len());
        for v in &term.vars {
            match schema.declared(&v.column) {
                Some(decl) if v.power != 1 => {
                    return Err(invalid(
                        "formula",
                        format!(
                            "`{}` is a categorical factor and cannot be raised to a power",
                            decl.column
                        ),
                    ))
                }
                Some(decl) => {
                    let full = first_factor_full && term.vars.len() == 1;
                    first_factor_full &= !full;
                    vars.push(Coded::Factor(decl, full));
                }
                None => vars.push(Coded::Numeric(v)),
            }
        }
        coded.push(vars);
    }
    let mut width: usize = usize::from(f.intercept);
    for vars in &coded {
        let w = vars.iter().fold(1usize, |acc, v| acc.saturating_mul(v.width()));
        width = width.saturating_add(w);
    }
    if width > MAX_DESIGN_COLUMNS {
        return Err(invalid(
            "formula",
            format!("the design would have more than {MAX_DESIGN_COLUMNS} columns"),
        ));
    }
    let mut columns = Vec::with_capacity(width);
    if f.intercept {
        columns.push(DesignColumn {
            name: "const".to_owned(),
            factors: Vec::new(),
        });
    }
    for vars in &coded {
        // A factor without a non-reference level (refused by validation) empties the term;
        // skipping it keeps every intermediate product below the bounded final width.
        if vars.iter().any(|v| v.width() == 0) {
            continue;
        }
        // Cartesian product; the outer loop is the newer variable, so the first variable
        // varies fastest (R's order).
        let mut cols: Vec<(Vec<String>, Vec<Factor>)> = vec![(Vec::new(), Vec::new())];
        for v in vars {
            let parts = v.parts();
            let mut next = Vec::with_capacity(cols.len() * parts.len());
            for (name, factor) in &parts {
                for (names, factors) in &cols {
                    let mut n = names.clone();
                    n.push(name.clone());
                    let mut fs = factors.clone();
                    fs.push(factor.clone());
                    next.push((n, fs));
                }
            }
            cols = next;
        }
        for (names, factors) in cols {
            columns.push(DesignColumn {
                name: names.join(":"),
                factors,
            });
        }
    }
    Ok((f.response, f.intercept, columns))
}

/// The plan of the list form: `const`, numerics (and squares), then the dummies.
fn from_lists(
    schema: &DataSchema,
    model: ModelKind,
) -> Result<(Response, bool, Vec<DesignColumn>), DesignError> {
    let t = schema
        .target
        .as_ref()
        .ok_or_else(|| invalid("schema.target", "required unless the experiment has a formula"))?;
    let response = match (model, t.threshold, &t.positive_level) {
        (ModelKind::Logistic, Some(threshold), None) => Response::Above {
            column: t.column.clone(),
            threshold,
        },
        (ModelKind::Logistic, None, Some(level)) => Response::Level {
            column: t.column.clone(),
            level: level.clone(),
        },
        (ModelKind::Logistic, _, _) => {
            return Err(invalid(
                "schema.target",
                "a logistic target needs exactly one of `threshold` or `positive_level`",
            ))
        }
        _ => Response::Value {
            column: t.column.clone(),
            log: t.log,
        },
    };
    if schema.design_width() > MAX_DESIGN_COLUMNS {
        return Err(invalid(
            "schema",
            format!("the design would have more than {MAX_DESIGN_COLUMNS} columns"),
        ));
    }
    let columns = schema
        .design_columns()
        .into_iter()
        .zip(list_factors(schema))
        .map(|(name, factors)| DesignColumn { name, factors })
        .collect();
    Ok((response, true, columns))
}

/// The factors of each list-form column, in [`DataSchema::design_columns`] order.
fn list_factors(schema: &DataSchema) -> Vec<Vec<Factor>> {
    let mut out = vec![Vec::new()];
    let num = |column: &str, power: u8| Factor::Numeric {
        column: column.to_owned(),
        power,
    };
    for f in &schema.numeric {
        out.push(vec![num(&f.column, 1)]);
        if f.squared {
            out.push(vec![num(&f.column, 2)]);
        }
    }
    for f in &schema.categorical {
        for level in f.levels.iter().filter(|l| **l != f.reference) {
            out.push(vec![Factor::Level {
                column: f.column.clone(),
                level: level.clone(),
            }]);
        }
    }
    out
}

/// `column` or `log(column)`.
fn parse_offset(text: &str) -> Result<Offset, DesignError> {
    let t = text.trim();
    let (column, log) = match t.strip_prefix("log(").and_then(|r| r.strip_suffix(')')) {
        Some(inner) => (inner.trim(), true),
        None => (t, false),
    };
    if column.is_empty() || column.contains(['(', ')']) {
        return Err(invalid("offset", "must name a column, or log(column)"));
    }
    Ok(Offset {
        column: column.to_owned(),
        log,
    })
}

impl DesignPlan {
    /// The plan of a `[schema]` (list form, or `formula` when given) without office columns,
    /// weights or offset.
    pub fn from_schema(
        schema: &DataSchema,
        formula: Option<&str>,
        model: ModelKind,
    ) -> Result<Self, DesignError> {
        if matches!(model, ModelKind::Echo | ModelKind::Table) {
            return Err(invalid("model", "echo and table experiments have no design"));
        }
        let (response, intercept, columns) = match formula {
            Some(text) => from_formula(text, schema)?,
            None => from_lists(schema, model)?,
        };
        match (model, &response) {
            (ModelKind::Logistic, Response::Value { .. }) => {
                return Err(invalid(
                    "formula",
                    "a logistic model needs a 0/1 response: I(column > number) or I(column == level)",
                ))
            }
            (ModelKind::Linear | ModelKind::Poisson | ModelKind::Gamma, r) if r.is_binary() => {
                return Err(invalid("formula", "a 0/1 response needs model = \"logistic\""))
            }
            (ModelKind::Poisson | ModelKind::Gamma, Response::Value { log: true, .. }) => {
                return Err(invalid(
                    "formula",
                    "poisson and gamma models have a log link; do not take the log of the response",
                ))
            }
            _ => {}
        }
        let mut used: Vec<&str> = vec![response.column()];
        for c in &columns {
            for f in &c.factors {
                if let Factor::Numeric { column, .. } | Factor::Level { column, .. } = f {
                    if !used.contains(&column.as_str()) {
                        used.push(column);
                    }
                }
            }
        }
        let categorical = schema
            .categorical
            .iter()
            .filter(|f| used.contains(&f.column.as_str()))
            .cloned()
            .collect();
        Ok(DesignPlan {
            response,
            intercept,
            columns,
            weights: None,
            offset: None,
            split_column: schema.split_column.clone(),
            categorical,
            offices: Vec::new(),
        })
    }
}

impl ExperimentSpec {
    /// The design both sides compute: from the formula if there is one, else from the
    /// `[schema]` lists; then one `office=NAME` column per office but the first when
    /// `office_effects`. Bounded before anything is expanded.
    pub fn design(&self) -> Result<DesignPlan, DesignError> {
        let schema = self
            .schema
            .as_ref()
            .ok_or_else(|| invalid("schema", "required: it declares the split column and the factors"))?;
        let mut plan = DesignPlan::from_schema(schema, self.formula.as_deref(), self.model)?;
        if self.office_effects {
            if self.offices.len().saturating_add(plan.columns.len()) > MAX_DESIGN_COLUMNS.saturating_add(1) {
                return Err(invalid(
                    "offices",
                    format!("the design would have more than {MAX_DESIGN_COLUMNS} columns"),
                ));
            }
            plan.columns
                .extend(self.offices.iter().skip(1).map(|o| DesignColumn {
                    name: format!("office={o}"),
                    factors: vec![Factor::Office { name: o.clone() }],
                }));
            plan.offices = self.offices.clone();
        }
        plan.weights = self.weights.clone();
        plan.offset = self.offset.as_deref().map(parse_offset).transpose()?;
        // Backquoted names may hold `=` or `:`, so two columns could be named alike; a name
        // must say which parameter it is.
        let mut names = std::collections::BTreeSet::new();
        if let Some(c) = plan.columns.iter().find(|c| !names.insert(c.name.as_str())) {
            return Err(invalid(
                "formula",
                format!("two design columns would be named `{}`; rename a column", c.name),
            ));
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::spec::ExperimentSpec;

    fn spec(formula: &str, extra: &str) -> ExperimentSpec {
        toml::from_str(&format!(
            "name = \"t\"\nmodel = \"linear\"\nmethod = \"exact\"\nformula = '{formula}'\n{extra}\n[schema]\n\
             categorical = [{{ column = \"f\", levels = [\"a\", \"b\", \"c\"], reference = \"a\" }}, \
             {{ column = \"h\", levels = [\"p\", \"q\", \"r\"], reference = \"p\" }}]\n"
        ))
        .expect("spec")
    }

    #[test]
    fn factor_interactions_vary_the_first_factor_fastest_as_r_does() {
        let s = spec("y ~ f:h", "");
        assert_eq!(
            s.design_columns(),
            ["const", "f=b:h=q", "f=c:h=q", "f=b:h=r", "f=c:h=r"]
        );
        let plan = s.design().expect("plan");
        assert_eq!(
            plan.columns[2].factors,
            [
                Factor::Level {
                    column: "f".into(),
                    level: "c".into()
                },
                Factor::Level {
                    column: "h".into(),
                    level: "q".into()
                }
            ]
        );
        assert_eq!(
            plan.factor_sets(),
            [
                vec!["f".to_owned()],
                vec!["f".into(), "h".into()],
                vec!["h".into()]
            ]
        );
        assert_eq!(
            spec("y ~ x*f", "").design_columns(),
            ["const", "x", "f=b", "f=c", "x:f=b", "x:f=c"]
        );
        assert_eq!(
            spec(
                "y ~ I(x^3) + x:z",
                "office_effects = true\noffices = [\"n\", \"s\"]"
            )
            .design_columns(),
            ["const", "x^3", "x:z", "office=s"]
        );
    }

    #[test]
    fn designs_that_cannot_be_made_say_which_key() {
        let key = |s: &ExperimentSpec| match s.design() {
            Err(DesignError::Invalid { key, .. }) => key,
            Err(DesignError::Formula(_)) => "formula (parse)",
            Ok(_) => "none",
        };
        assert_eq!(key(&spec("y ~ I(f^2)", "")), "formula");
        assert_eq!(key(&spec("f ~ x", "")), "formula");
        assert_eq!(key(&spec("I(f == z) ~ x", "")), "formula");
        assert_eq!(key(&spec("I(y > 1) ~ x", "")), "formula");
        assert_eq!(key(&spec("y ~ x +", "")), "formula (parse)");
        assert_eq!(key(&spec("y ~ x", "offset = \"log(e\"")), "offset");
        assert_eq!(key(&spec("y ~ f + `f=b`", "")), "formula");
        let mut logistic = spec("y ~ x", "");
        logistic.model = ModelKind::Logistic;
        assert_eq!(key(&logistic), "formula");
        let mut both = spec("y ~ x", "");
        if let Some(schema) = both.schema.as_mut() {
            schema.target = Some(crate::spec::TargetSpec {
                column: "y".into(),
                log: false,
                threshold: None,
                positive_level: None,
            });
        }
        assert_eq!(key(&both), "schema.target");
        // Far too wide: refused from the counts, before a name is made.
        let many: Vec<String> = (0..200).map(|i| format!("\"l{i}\"")).collect();
        let wide: ExperimentSpec = toml::from_str(&format!(
            "name = \"t\"\nmodel = \"linear\"\nformula = 'y ~ f:g:h'\n[schema]\ncategorical = [\
             {{ column = \"f\", levels = [{l}], reference = \"l0\" }}, \
             {{ column = \"g\", levels = [{l}], reference = \"l0\" }}, \
             {{ column = \"h\", levels = [{l}], reference = \"l0\" }}]\n",
            l = many.join(", ")
        ))
        .expect("spec");
        assert_eq!(key(&wide), "formula");
        assert_eq!(wide.num_params(), 0);
        // A one-level factor (refused by validation) empties its terms without expanding the rest.
        let mut hostile = wide.clone();
        hostile.formula = Some("y ~ g:h:f".into());
        if let Some(schema) = hostile.schema.as_mut() {
            schema.categorical[0].levels.truncate(1);
        }
        assert!(hostile.design().is_err() || hostile.num_params() <= MAX_DESIGN_COLUMNS as u64);
    }

    /// A formula of up to six terms over numeric `x0..x3` and factors `f` (3 levels) and
    /// `h` (3 levels), with any of `:`, `*`, powers and `- 1`.
    fn formula() -> impl Strategy<Value = String> {
        let atom = prop_oneof![
            (0..4usize).prop_map(|i| format!("x{i}")),
            (0..4usize, 2..5u8).prop_map(|(i, k)| format!("I(x{i}^{k})")),
            Just("f".to_owned()),
            Just("h".to_owned()),
        ];
        let term = prop::collection::vec(atom, 1..4).prop_flat_map(|atoms| {
            prop::collection::vec(prop_oneof![Just(":"), Just("*")], atoms.len()).prop_map(move |ops| {
                let mut t = atoms[0].clone();
                for (a, op) in atoms.iter().skip(1).zip(&ops) {
                    t.push_str(op);
                    t.push_str(a);
                }
                t
            })
        });
        (prop::collection::vec(term, 1..6), any::<bool>()).prop_map(|(terms, no_intercept)| {
            let mut f = format!("y ~ {}", terms.join(" + "));
            if no_intercept {
                f.push_str(" - 1");
            }
            f
        })
    }

    proptest! {
        #[test]
        fn the_plan_has_num_params_distinct_columns(text in formula(), offices in 0..4usize) {
            let names: Vec<String> = (0..offices).map(|i| format!("o{i}")).collect();
            let extra = if offices > 1 {
                format!("office_effects = true\noffices = {names:?}")
            } else {
                String::new()
            };
            let s = spec(&text, &extra);
            let plan = s.design().expect("plan");
            prop_assert_eq!(plan.columns.len() as u64, s.num_params());
            prop_assert_eq!(s.design_columns().len() as u64, s.num_params());
            let distinct: std::collections::BTreeSet<&String> = plan.columns.iter().map(|c| &c.name).collect();
            prop_assert_eq!(distinct.len(), plan.columns.len(), "{:?}", plan.names());
        }
    }
}
