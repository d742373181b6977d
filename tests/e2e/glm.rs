//! Exact GLMs over the real binaries: federated Newton/IRLS on the four CPS 1988 offices gives
//! the pooled statsmodels fits (coefficients and standard errors to 1e-6 relative), the logit in
//! at most 8 rounds and the linear model in one, office (region) effects included; `fedstat
//! results` writes `model.json` with the inference and `coefficients.csv`, and prints R's table.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{demo_data, reference, Fed, REGIONS};

/// The four offices, each allowing the columns the exact fits below use.
fn offices() -> Fed {
    let mut fed = Fed::start();
    let policy = "[policy]\nallowed_targets = [\"wage\", \"education\"]\n";
    for region in REGIONS {
        fed.add_node_with(region, &[("cps1988", demo_data(region))], policy);
    }
    fed.wait_for_nodes(&REGIONS);
    fed
}

fn exact(name: &str, model: &str, target: &str, numeric: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
dataset = "cps1988"
model = "{model}"
method = "exact"
min_nodes = 4
round_timeout_secs = 30
{extra}
[schema]
target = {target}
numeric = [{numeric}]
categorical = [
  {{ column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" }},
  {{ column = "smsa", levels = ["no", "yes"], reference = "no" }},
  {{ column = "parttime", levels = ["no", "yes"], reference = "no" }},
]
"#
    )
}

const EDUCATION_EXPERIENCE: &str = r#"{ column = "education" }, { column = "experience", squared = true }"#;

/// `fedstat results` into a fresh folder: the model document, the CSV and what it printed.
fn results(fed: &Fed, id: u64) -> (Value, String, String) {
    let out = fed.path(&format!("results-{id}"));
    let printed = fed.cli(&["results", &id.to_string(), "--out", out.to_str().expect("utf-8")]);
    assert!(printed.status.success(), "{printed:?}");
    let read = |f: &str| std::fs::read_to_string(Path::new(&out).join(f)).expect("result file");
    let model: Value = serde_json::from_str(&read("model.json")).expect("model.json");
    (
        model,
        read("coefficients.csv"),
        String::from_utf8_lossy(&printed.stdout).into_owned(),
    )
}

fn assert_named_close(got: &Value, want: &Value, names: &[String], what: &str) {
    for n in names {
        let (g, w) = (got[n].as_f64().expect(n), want[n].as_f64().expect(n));
        let err = ((g - w) / w).abs();
        assert!(err <= 1e-6, "{what} of {n}: {g} vs {w} (relative error {err:e})");
    }
}

fn columns(r: &Value) -> Vec<String> {
    r["design"]["columns_in_order"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn exact_logit_and_ols_equal_the_pooled_fits() {
    let fed = offices();
    let logit = fed.submit(
        "logit.toml",
        &exact(
            "exact logit",
            "logistic",
            r#"{ column = "wage", threshold = 522.32 }"#,
            EDUCATION_EXPERIENCE,
            "",
        ),
    );
    let ols = fed.submit(
        "ols.toml",
        &exact(
            "exact ols",
            "linear",
            r#"{ column = "wage", log = true }"#,
            EDUCATION_EXPERIENCE,
            "",
        ),
    );
    let models = &reference()["cps1988"]["models"];

    let s = fed.wait_finished(logit, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let rounds = s["rounds_done"].as_u64().expect("rounds");
    assert!((2..=8).contains(&rounds), "{rounds} rounds");
    let (model, csv, printed) = results(&fed, logit);
    let r = &models["logit_highwage"];
    let names = columns(r);
    assert_named_close(
        &model["coefficients"],
        &r["pooled_statsmodels_Logit"]["coef"],
        &names,
        "logit coefficient",
    );
    assert_named_close(
        &model["std_errors"],
        &r["pooled_statsmodels_Logit"]["se"],
        &names,
        "logit standard error",
    );
    assert_eq!(model["converged"], true);
    assert!(
        model["z_values"].is_object() && model["ci95"]["education"].is_array(),
        "{model:#}"
    );
    assert!(
        csv.starts_with("term,estimate,std_error,z_value,p_value,ci95_low,ci95_high\n(Intercept),"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1 + names.len());
    assert!(
        printed.contains("Pr(>|z|)")
            && printed.contains("(Intercept)")
            && printed.contains("Residual deviance"),
        "{printed}"
    );

    let s = fed.wait_finished(ols, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(s["rounds_done"], 1, "a linear model takes one round");
    let (model, _, printed) = results(&fed, ols);
    let r = &models["ols_logwage"]["pooled_statsmodels_OLS"];
    assert_named_close(&model["coefficients"], &r["coef"], &names, "OLS coefficient");
    assert_named_close(&model["std_errors"], &r["se"], &names, "OLS standard error");
    assert!(model["t_values"].is_object(), "{model:#}");
    assert!(printed.contains("Pr(>|t|)"), "{printed}");
}

#[test]
fn office_effects_give_the_pooled_fit_with_region_dummies() {
    let fed = offices();
    let id = fed.submit(
        "offices.toml",
        &exact(
            "exact ols with office effects",
            "linear",
            r#"{ column = "wage", log = true }"#,
            EDUCATION_EXPERIENCE,
            "office_effects = true\noffices = [\"northeast\", \"midwest\", \"south\", \"west\"]",
        ),
    );
    let s = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (model, _, _) = results(&fed, id);
    let r = &reference()["cps1988"]["models"]["ols_logwage_with_region_dummies"];
    let want = &r["pooled_statsmodels_OLS"];
    // Our office columns are `office=NAME`; the reference names them `region=NAME`.
    let rename = |v: &Value| -> Value {
        v.as_object()
            .expect("object")
            .iter()
            .map(|(k, x)| (k.replace("office=", "region="), x.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let names = columns(r);
    assert_named_close(
        &rename(&model["coefficients"]),
        &want["coef"],
        &names,
        "coefficient",
    );
    assert_named_close(
        &rename(&model["std_errors"]),
        &want["se"],
        &names,
        "standard error",
    );
}

#[test]
fn exact_poisson_equals_statsmodels_on_the_pooled_rows() {
    let fed = offices();
    let id = fed.submit(
        "poisson.toml",
        &exact(
            "years of education as a count",
            "poisson",
            r#"{ column = "education" }"#,
            r#"{ column = "experience", squared = true }"#,
            "",
        ),
    );
    let s = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    let (model, _, _) = results(&fed, id);
    let text = std::fs::read_to_string(crate::support::repo().join("tests/data/glm-reference.json"))
        .expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("json");
    let r = &fixture["models"]["poisson_education"];
    let names: Vec<String> = r["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c.as_str().expect("name").to_owned())
        .collect();
    let as_map = |key: &str| -> Value {
        names
            .iter()
            .zip(r[key].as_array().expect("values"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    assert_named_close(
        &model["coefficients"],
        &as_map("coefficients"),
        &names,
        "coefficient",
    );
    assert_named_close(
        &model["std_errors"],
        &as_map("std_errors"),
        &names,
        "standard error",
    );
    let (d, want) = (
        model["deviance"].as_f64().expect("deviance"),
        r["deviance"].as_f64().expect("deviance"),
    );
    assert!(((d - want) / want).abs() < 1e-9, "{d} vs {want}");
}

/// The Mincer equation written as an R formula, fitted exactly: the pooled OLS of reference.json,
/// with its interaction-free design named as the reference names it.
#[test]
fn a_formula_gives_the_exact_pooled_ols() {
    let fed = offices();
    let id = fed.submit(
        "formula.toml",
        r#"
name = "exact ols from a formula"
dataset = "cps1988"
model = "linear"
method = "exact"
min_nodes = 4
round_timeout_secs = 30
formula = "log(wage) ~ education + experience + I(experience^2) + ethnicity + smsa + parttime"
[schema]
categorical = [
  { column = "ethnicity", levels = ["cauc", "afam"], reference = "cauc" },
  { column = "smsa", levels = ["no", "yes"], reference = "no" },
  { column = "parttime", levels = ["no", "yes"], reference = "no" },
]
"#,
    );
    let s = fed.wait_finished(id, Duration::from_secs(120));
    assert_eq!(s["state"], "Completed", "{s:#}");
    assert_eq!(s["rounds_done"], 1);
    let (model, _, _) = results(&fed, id);
    let r = &reference()["cps1988"]["models"]["ols_logwage"];
    let names = columns(r);
    assert_named_close(
        &model["coefficients"],
        &r["pooled_statsmodels_OLS"]["coef"],
        &names,
        "coefficient",
    );
    assert_named_close(
        &model["std_errors"],
        &r["pooled_statsmodels_OLS"]["se"],
        &names,
        "standard error",
    );
}
