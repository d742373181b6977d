//! Exact GLMs by federated Newton/IRLS ([`crate::glm`]): the pooled maximum-likelihood fit,
//! with R's `summary(glm)` inference, from sums over rows.
//!
//! Round r asks every node for its sums at the current coefficients θ₍r−1₎ (round 1: β = 0, or
//! R's `mustart` for the log links) and the intercept-only model at its own intercept. The
//! coordinator adds them exactly and takes the step θ_r = (XᵀWX)⁻¹XᵀWz. Round r also brings
//! the deviance at θ₍r−1₎, so convergence of θ₍r−1₎ (R's relative deviance change against
//! θ₍r−2₎ below 1e-10) is known in round r; θ₍r−1₎ is then the estimate, and the same round's
//! XᵀWX, deviance and Pearson χ² are evaluated exactly there: the standard errors are those
//! at the estimate. The Gaussian model is linear in β, so it ends in round 1.
//!
//! The answer is one vector for the exact Sum aggregator:
//! `[XᵀWX upper triangle (p(p+1)/2) | XᵀWz (p) | the 13 scalars of glm::Scalars]`.
//! The model sent is `[θ (p) | null-model intercept]`; the final model is θ alone.

use std::sync::Arc;
use std::time::Instant;

use fedstat_proto::output::Output;
use fedstat_proto::wire::{DType, Phase, RoundRecord};

use crate::aggregate::{AggregatorKind, Pooled, Values};
use crate::glm::{self, At, Family, FitState, Scalars, StepSums};
use crate::spec::ExperimentSpec;
use crate::sums::Standardization;

use super::{Algorithm, Answer, AnswerShape, Checkpoint, Progress, Report, Step};

/// Number of values in an answer for `p` coefficients.
pub fn answer_len(p: usize) -> usize {
    p * (p + 1) / 2 + p + Scalars::LEN
}

/// A node's answer: its step sums as one vector.
pub fn answer(sums: &StepSums) -> Values {
    let mut v = Vec::with_capacity(answer_len(sums.p));
    v.extend_from_slice(&sums.xtwx);
    v.extend_from_slice(&sums.xtwz);
    v.extend_from_slice(&sums.scalars.to_vec());
    Values::F64(v)
}

/// Read step sums back from a vector of [`answer_len`]`(p)` values.
fn decode(v: &[f64], p: usize) -> Option<StepSums> {
    if v.len() != answer_len(p) {
        return None;
    }
    let tri = p * (p + 1) / 2;
    let scalars: &[f64; Scalars::LEN] = v[tri + p..].try_into().ok()?;
    Some(StepSums {
        p,
        xtwx: v[..tri].to_vec(),
        xtwz: v[tri..tri + p].to_vec(),
        scalars: Scalars::from_slice(scalars),
    })
}

/// Where the node evaluates its sums in a round: the data (round 1 of the log links) or the
/// coefficients sent, `[θ (p) | null intercept]`.
pub fn evaluation_point<'a>(family: Family, round: u32, model: &'a [f64], p: usize) -> Option<At<'a>> {
    if round == 1 && family.starts_from_data() {
        return Some(At::Data);
    }
    if model.len() != p + 1 {
        return None;
    }
    Some(At::Coefficients {
        beta: &model[..p],
        null: model[p],
    })
}

/// Whether the design has an intercept (its first column is `const`).
pub fn has_intercept(names: &[String]) -> bool {
    names.first().is_some_and(|n| n == "const")
}

/// Rules one node's sums must follow, whatever the coefficients: no negative weights or
/// deviances, a positive semi-definite diagonal, Cauchy–Schwarz between the entries of XᵀWX,
/// a whole row count. Names the rule, never a value. Under the Gaussian mechanism
/// (`noisy`) the off-diagonal entries carry noise, so Cauchy–Schwarz is not required of one
/// node's answer (the node floors diagonals and counts at 0 and rounds the count).
pub fn check(answer: Answer<'_>, p: usize, noisy: bool) -> Result<(), String> {
    let v = answer.values.to_f64();
    let s = decode(&v, p).ok_or("GLM sums of the wrong length")?;
    let c = &s.scalars;
    if [
        c.deviance,
        c.pearson,
        c.null_weight,
        c.null_deviance,
        c.rows,
        c.sum_w,
    ]
    .iter()
    .any(|x| *x < 0.0)
    {
        return Err("a weight, count or deviance in the GLM sums is negative".into());
    }
    if c.rows.fract() != 0.0 {
        return Err("the GLM row count is not a whole number".into());
    }
    let full = s.xtwx_full();
    for i in 0..p {
        if full[i * p + i] < 0.0 {
            return Err("XᵀWX has a negative diagonal entry".into());
        }
    }
    if noisy {
        return Ok(());
    }
    for i in 0..p {
        for j in i + 1..p {
            let bound = (full[i * p + i] * full[j * p + j]).sqrt();
            if full[i * p + j].abs() > bound * (1.0 + 1e-9) + 1e-9 {
                return Err("XᵀWX is not positive semi-definite (Cauchy–Schwarz)".into());
            }
        }
    }
    Ok(())
}

/// How a fit ends: at `beta`, with the sums evaluated there.
struct End<'a> {
    beta: Vec<f64>,
    sums: &'a StepSums,
    scalars: Scalars,
    iterations: u32,
    converged: bool,
    warnings: Vec<String>,
    noise_covariance: Option<Vec<f64>>,
}

#[derive(Debug)]
pub struct Glm {
    spec: ExperimentSpec,
    family: Family,
    names: Vec<String>,
    intercept: bool,
    /// `[θ | null intercept]` while fitting; θ once done.
    global: Arc<Values>,
    history: Vec<RoundRecord>,
    output: Option<Output>,
    round_started: Option<(u32, Instant)>,
}

impl Glm {
    /// `None` if the spec is not an exact GLM.
    pub fn new(spec: &ExperimentSpec, checkpoint: Checkpoint) -> Option<Self> {
        let family = Family::of(spec.model)?;
        let names = spec.design_columns();
        let p = names.len();
        let global = match (&checkpoint.output, checkpoint.global) {
            (_, Some(g)) => g,
            (None, None) => Values::zeros(DType::F64, p + 1),
            (Some(_), None) => Values::zeros(DType::F64, p),
        };
        Some(Glm {
            spec: spec.clone(),
            family,
            intercept: has_intercept(&names),
            names,
            global: Arc::new(global),
            history: checkpoint.history,
            output: checkpoint.output,
            round_started: None,
        })
    }

    fn p(&self) -> usize {
        self.names.len()
    }

    /// The summary and the event that ends the fit at `beta`, from sums evaluated there.
    fn finish(&mut self, end: End<'_>, report: &mut Report) -> Result<(), String> {
        let End {
            beta,
            sums,
            scalars,
            iterations,
            converged,
            mut warnings,
            noise_covariance,
        } = end;
        if self.family == Family::Binomial
            && beta
                .iter()
                .skip(usize::from(self.intercept))
                .any(|b| b.abs() > 15.0)
        {
            let big: Vec<&str> = self
                .names
                .iter()
                .zip(&beta)
                .filter(|(_, b)| b.abs() > 15.0)
                .map(|(n, _)| n.as_str())
                .collect();
            warnings.push(format!(
                "coefficients of {} are very large: fitted probabilities of 0 or 1 (separation) are likely",
                big.join(", ")
            ));
        }
        let summary = glm::summarize(
            FitState {
                family: self.family,
                names: &self.names,
                beta: &beta,
                intercept: self.intercept,
                iterations,
                converged,
                warnings,
                noise_covariance,
            },
            sums,
            scalars,
        )
        .map_err(|e| format!("inference: {e}"))?;
        for w in &summary.warnings {
            report.events.push(format!("warning: {w}"));
        }
        report.events.push(format!(
            "exact {} fit {} after {} iteration(s): deviance {:.6}, {} coefficients",
            self.family.name(),
            if converged { "converged" } else { "stopped" },
            iterations,
            summary.deviance,
            beta.len()
        ));
        self.global = Arc::new(Values::F64(beta));
        let output = Output::Glm(Box::new(summary));
        report.progress.push(Progress::Output(output.clone()));
        self.output = Some(output);
        Ok(())
    }
}

impl Algorithm for Glm {
    fn next_step(&mut self, now: Instant) -> Option<Step> {
        if self.output.is_some() {
            return None;
        }
        let round = self.history.len() as u32 + 1;
        if self.round_started.is_none_or(|(r, _)| r != round) {
            self.round_started = Some((round, now));
        }
        Some(Step {
            phase: Phase::Glm,
            round,
            model: Some(self.global.clone()),
            standardization: None,
            answer: AnswerShape {
                dtype: DType::F64,
                len: answer_len(self.p()) as u64,
                aux: 0,
                weighted: false,
            },
            aggregator: AggregatorKind::of_phase(Phase::Glm),
        })
    }

    fn check_answer(&self, step: &Step, answer: Answer<'_>) -> Result<(), String> {
        match step.phase {
            Phase::Glm => check(answer, self.p(), self.spec.privacy.is_some()),
            _ => Err(format!("an exact fit asks for no {} answers", step.phase)),
        }
    }

    fn finish_step(
        &mut self,
        now: Instant,
        step: &Step,
        pooled: Pooled,
        participants: Vec<String>,
        retries: u32,
    ) -> Result<Report, String> {
        let p = self.p();
        let r = step.round;
        let sums = decode(&pooled.values.to_f64(), p)
            .ok_or_else(|| format!("round {r}: GLM sums of the wrong length"))?;
        if sums.scalars.rows < 1.0 {
            return Err(format!("round {r}: no rows with a positive weight"));
        }
        let started = self
            .round_started
            .filter(|(k, _)| *k == r)
            .map_or(now, |(_, t)| t);
        let ms = now.saturating_duration_since(started).as_millis() as u64;
        let mut record = RoundRecord {
            round: r,
            participants,
            total_examples: sums.scalars.rows as u64,
            // The deviance at the coefficients the sums were taken at.
            train_loss: sums.scalars.deviance,
            metrics: None,
            train_ms: ms,
            round_ms: ms,
            retries,
        };
        let mut report = Report::default();
        report.events.push(format!(
            "round {r}: GLM sums from {} node(s) over {} rows; deviance {:.6}",
            record.participants.len(),
            record.total_examples,
            sums.scalars.deviance
        ));
        let current: Vec<f64> = self.global.to_f64();
        let step_err = |e: crate::Error| format!("round {r}: {e}");

        if self.family.is_linear() {
            let noisy = self.spec.privacy.is_some();
            let beta = glm::irls_step(&sums, &self.names).map_err(|e| match e {
                // Noise, not the design, is the likely cause: say so and what to change.
                crate::Error::Singular { column, .. } if noisy => format!(
                    "round {r}: the noisy XᵀX is not positive definite at column `{column}` (the Gaussian mechanism's noise outweighs that column's information): declare tighter privacy.bounds, a lower noise_multiplier, or use more rows"
                ),
                other => step_err(other),
            })?;
            let scalars = glm::gaussian_at_solution(&sums, &beta, self.intercept);
            record.train_loss = scalars.deviance;
            // Under the Gaussian mechanism the coefficients carry the noise's variance as well
            // as the sampling variance: both go into the standard errors.
            let (noise_covariance, warnings) = if noisy {
                let nodes = record.participants.len();
                let cov = crate::privacy::ols_noise_covariance(&self.spec, &sums, &beta, nodes, &self.names)
                    .map_err(step_err)?;
                let note = "standard errors, tests and intervals include the variance of the \
                            privacy noise (delta method; the noise distribution is public)"
                    .to_owned();
                (Some(cov), vec![note])
            } else {
                (None, Vec::new())
            };
            let end = End {
                beta,
                sums: &sums,
                scalars,
                iterations: 1,
                converged: true,
                warnings,
                noise_covariance,
            };
            self.finish(end, &mut report)?;
        } else {
            let previous = self.history.last().map(|h| h.train_loss);
            let main_done = previous.is_some_and(|d| glm::converged(d, sums.scalars.deviance));
            // The null model: its intercept is exact after round 1 without an offset
            // (g(Σwy/Σw)); with one, it takes its own one-dimensional IRLS steps.
            let null_next = if self.intercept && sums.scalars.null_weight > 0.0 {
                sums.scalars.null_weighted_z / sums.scalars.null_weight
            } else {
                0.0
            };
            let null_now = current.get(p).copied().unwrap_or(0.0);
            let null_done = !self.intercept
                || (r >= 2 && (null_next - null_now).abs() <= glm::TOLERANCE * (null_next.abs() + 1.0));
            let at_limit = r > self.spec.max_iterations;
            if (main_done && null_done) || at_limit {
                let beta = current[..p].to_vec();
                let mut warnings = Vec::new();
                if !main_done {
                    warnings.push(format!(
                        "not converged: the deviance still changed by more than {} (relative) after max_iterations = {} iterations",
                        glm::TOLERANCE,
                        self.spec.max_iterations
                    ));
                }
                let end = End {
                    beta,
                    sums: &sums,
                    scalars: sums.scalars,
                    iterations: r - 1,
                    converged: main_done,
                    warnings,
                    noise_covariance: None,
                };
                self.finish(end, &mut report)?;
            } else {
                let mut next = glm::irls_step(&sums, &self.names).map_err(step_err)?;
                if next.iter().any(|b| !b.is_finite()) {
                    return Err(format!(
                        "round {r}: the Newton step is not finite (the fit diverges)"
                    ));
                }
                next.push(null_next);
                self.global = Arc::new(Values::F64(next));
            }
        }
        report.progress.push(Progress::RoundCompleted {
            record: record.clone(),
            model: self.global.clone(),
        });
        self.history.push(record);
        Ok(report)
    }

    fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    fn model(&self) -> &Arc<Values> {
        &self.global
    }

    fn standardization(&self) -> Option<&Standardization> {
        None
    }

    fn output(&self) -> Option<&Output> {
        self.output.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::data::tests::{cps_schema, data_dir, REGIONS};
    use crate::data::LocalData;
    use crate::spec::{DataSchema, ModelKind, TargetSpec};

    fn spec(model: ModelKind, schema: DataSchema, offices: &[&str]) -> ExperimentSpec {
        let mut spec: ExperimentSpec = toml::from_str(&format!(
            "name = \"exact\"\ndataset = \"cps\"\nmodel = \"{}\"\nmethod = \"exact\"\n",
            model.as_str()
        ))
        .expect("spec");
        spec.schema = Some(schema);
        spec.office_effects = !offices.is_empty();
        spec.offices = offices.iter().map(|o| (*o).to_owned()).collect();
        crate::spec::validate(&spec).expect("valid");
        spec
    }

    fn target(column: &str, log: bool, threshold: Option<f64>) -> TargetSpec {
        TargetSpec {
            column: column.to_owned(),
            log,
            threshold,
            positive_level: None,
        }
    }

    /// Each office's rows as the node loads them: the spec's design plan (weights, offset and
    /// office columns included).
    fn offices_from_plan(spec: &ExperimentSpec) -> Vec<LocalData> {
        let plan = spec.design().expect("plan");
        REGIONS
            .iter()
            .map(|r| {
                let path = data_dir().join("cps1988").join(format!("{r}.csv"));
                crate::data::load_design(&path, &plan, Some(r), crate::data::LoadLimits::UNLIMITED)
                    .expect("load")
            })
            .collect()
    }

    /// Drive the algorithm to the end, the offices' sums added in f64 (the engine's exact sum
    /// is tested elsewhere). Returns the model after each round and the summary.
    fn fit(spec: &ExperimentSpec) -> (Vec<Vec<f64>>, crate::proto::output::GlmSummary) {
        fit_on(spec, offices_from_plan(spec))
    }

    fn fit_on(
        spec: &ExperimentSpec,
        data: Vec<LocalData>,
    ) -> (Vec<Vec<f64>>, crate::proto::output::GlmSummary) {
        let mut alg = Glm::new(spec, Checkpoint::default()).expect("a GLM");
        let family = Family::of(spec.model).expect("family");
        let p = spec.num_params() as usize;
        let intercept = has_intercept(&spec.design_columns());
        let now = Instant::now();
        let mut models = Vec::new();
        while let Some(step) = alg.next_step(now) {
            let model = step.model.as_ref().map(|m| m.to_f64()).unwrap_or_default();
            let at = evaluation_point(family, step.round, &model, p).expect("point");
            let mut total = vec![0.0; answer_len(p)];
            for d in &data {
                let (sums, _) = glm::step_sums(family, &d.train, at, intercept).expect("sums");
                let v = answer(&sums).to_f64();
                check(
                    Answer {
                        values: &Values::F64(v.clone()),
                        weight: 1,
                        aux: &[],
                    },
                    p,
                    false,
                )
                .expect("a valid answer");
                total.iter_mut().zip(&v).for_each(|(t, x)| *t += x);
            }
            let pooled = Pooled {
                values: Values::F64(total),
                aux: Vec::new(),
                total_weight: data.len() as u64,
                answers: data.len(),
            };
            alg.finish_step(
                now,
                &step,
                pooled,
                REGIONS.iter().map(|r| r.to_string()).collect(),
                0,
            )
            .expect("step");
            models.push(alg.model().to_f64());
            assert!(models.len() <= spec.max_rounds() as usize, "too many rounds");
        }
        let Some(Output::Glm(summary)) = alg.output().cloned() else {
            panic!("no summary");
        };
        (models, *summary)
    }

    fn json(path: PathBuf) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json")
    }

    fn named(v: &serde_json::Value, names: &[String]) -> Vec<f64> {
        names.iter().map(|n| v[n].as_f64().expect("number")).collect()
    }

    fn list(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    fn assert_rel(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            let err = if *w == 0.0 { g.abs() } else { ((g - w) / w).abs() };
            assert!(err <= tol, "{what}[{j}]: {g} vs {w} (relative error {err:e})");
        }
    }

    #[test]
    fn exact_logit_follows_the_newton_trace_and_matches_statsmodels() {
        let s = spec(
            ModelKind::Logistic,
            cps_schema(target("wage", false, Some(522.32))),
            &[],
        );
        let (models, summary) = fit(&s);
        let r = &json(data_dir().join("cps1988/reference.json"))["cps1988"]["models"]["logit_highwage"];
        let names = s.design_columns();
        let trace = r["newton_from_zero_trace"]["iterations"]
            .as_array()
            .expect("trace");
        // The trace lists some iterations; round k's model is iteration k.
        for it in trace {
            let k = it["iteration"].as_u64().expect("iteration") as usize;
            if k < models.len() {
                assert_rel(
                    &models[k - 1][..names.len()],
                    &list(&it["beta"]),
                    1e-6,
                    &format!("iteration {k}"),
                );
            }
        }
        let sm = &r["pooled_statsmodels_Logit"];
        assert_rel(
            &summary.coefficients,
            &named(&sm["coef"], &names),
            1e-6,
            "coefficients",
        );
        assert_rel(
            &summary.std_errors,
            &named(&sm["se"], &names),
            1e-6,
            "standard errors",
        );
        assert!(summary.converged);
        assert!(models.len() <= 8, "{} rounds", models.len());
        assert!((summary.deviance - sm["deviance"].as_f64().expect("deviance")).abs() < 1e-6);
        let null = -2.0 * sm["loglik_null_intercept_only"].as_f64().expect("null");
        assert_rel(&[summary.null_deviance], &[null], 1e-9, "null deviance");
    }

    #[test]
    fn exact_ols_takes_one_round_and_matches_statsmodels() {
        let s = spec(ModelKind::Linear, cps_schema(target("wage", true, None)), &[]);
        let (models, summary) = fit(&s);
        assert_eq!(models.len(), 1);
        let r = &json(data_dir().join("cps1988/reference.json"))["cps1988"]["models"]["ols_logwage"];
        let sm = &r["pooled_statsmodels_OLS"];
        let names = s.design_columns();
        assert_rel(
            &summary.coefficients,
            &named(&sm["coef"], &names),
            1e-6,
            "coefficients",
        );
        assert_rel(
            &summary.std_errors,
            &named(&sm["se"], &names),
            1e-6,
            "standard errors",
        );
        assert_rel(
            &[summary.deviance],
            &[sm["rss"].as_f64().expect("rss")],
            1e-9,
            "RSS",
        );
        assert_eq!(summary.df_residual, 22517);
        let want_aic = -2.0 * sm["loglik_gaussian"].as_f64().expect("loglik") + 2.0 * 8.0;
        assert_rel(&[summary.aic.expect("aic")], &[want_aic], 1e-9, "AIC");
    }

    #[test]
    fn exact_ols_with_office_effects_matches_the_pooled_fit_with_region_dummies() {
        let offices = ["northeast", "midwest", "south", "west"];
        let s = spec(
            ModelKind::Linear,
            cps_schema(target("wage", true, None)),
            &offices,
        );
        let (_, summary) = fit(&s);
        let r = &json(data_dir().join("cps1988/reference.json"))["cps1988"]["models"]
            ["ols_logwage_with_region_dummies"]["pooled_statsmodels_OLS"];
        let names: Vec<String> = s
            .design_columns()
            .iter()
            .map(|n| n.replace("office=", "region="))
            .collect();
        assert_rel(
            &summary.coefficients,
            &named(&r["coef"], &names),
            1e-6,
            "coefficients",
        );
        assert_rel(
            &summary.std_errors,
            &named(&r["se"], &names),
            1e-6,
            "standard errors",
        );
    }

    fn glm_reference(name: &str) -> serde_json::Value {
        json(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/glm-reference.json"))["models"]
            [name]
            .clone()
    }

    fn check_against(summary: &crate::proto::output::GlmSummary, r: &serde_json::Value) {
        assert_rel(
            &summary.coefficients,
            &list(&r["coefficients"]),
            1e-6,
            "coefficients",
        );
        assert_rel(
            &summary.std_errors,
            &list(&r["std_errors"]),
            1e-6,
            "standard errors",
        );
        assert_rel(
            &summary.statistics,
            &list(&r["z_or_t_values"]),
            1e-6,
            "z or t values",
        );
        // statsmodels tests every GLM with z; R (and we) test Gamma with t(df_residual).
        if summary.statistic == crate::proto::output::TestStatistic::Z {
            assert_rel(&summary.p_values, &list(&r["p_values"]), 1e-6, "p-values");
        }
        assert_rel(
            &[summary.deviance],
            &[r["deviance"].as_f64().expect("d")],
            1e-9,
            "deviance",
        );
        assert_rel(
            &[summary.null_deviance],
            &[r["null_deviance"].as_f64().expect("d")],
            1e-9,
            "null deviance",
        );
        assert_rel(
            &[summary.dispersion],
            &[r["dispersion"].as_f64().expect("d")],
            1e-6,
            "dispersion",
        );
        assert_eq!(summary.df_residual, r["df_residual"].as_u64().expect("df"));
        assert!(summary.converged);
    }

    fn count_schema() -> DataSchema {
        let mut schema = cps_schema(target("education", false, None));
        schema.numeric.remove(0);
        schema
    }

    #[test]
    fn exact_poisson_matches_statsmodels() {
        let s = spec(ModelKind::Poisson, count_schema(), &[]);
        let (_, summary) = fit(&s);
        let r = glm_reference("poisson_education");
        check_against(&summary, &r);
        assert_rel(
            &[summary.aic.expect("aic")],
            &[r["aic"].as_f64().expect("aic")],
            1e-9,
            "AIC",
        );
    }

    #[test]
    fn exact_poisson_with_office_effects_matches_statsmodels() {
        let s = spec(
            ModelKind::Poisson,
            count_schema(),
            &["northeast", "midwest", "south", "west"],
        );
        let (_, summary) = fit(&s);
        check_against(&summary, &glm_reference("poisson_education_offices"));
    }

    #[test]
    fn exact_gamma_matches_statsmodels() {
        let s = spec(ModelKind::Gamma, cps_schema(target("wage", false, None)), &[]);
        let (_, summary) = fit(&s);
        check_against(&summary, &glm_reference("gamma_wage"));
    }

    #[test]
    fn exact_poisson_with_an_offset_matches_statsmodels() {
        let mut s = spec(ModelKind::Poisson, count_schema(), &[]);
        s.offset = Some("log(wage)".to_owned());
        crate::spec::validate(&s).expect("valid");
        let (_, summary) = fit_on(&s, offices_from_plan(&s));
        check_against(&summary, &glm_reference("poisson_education_offset_log_wage"));
    }

    #[test]
    fn exact_weighted_least_squares_matches_statsmodels_with_r_zero_weights() {
        let mut schema = cps_schema(target("wage", true, None));
        schema.numeric.remove(0);
        let mut s = spec(ModelKind::Linear, schema, &[]);
        s.weights = Some("education".to_owned());
        crate::spec::validate(&s).expect("valid");
        let (_, summary) = fit_on(&s, offices_from_plan(&s));
        let r = glm_reference("gaussian_log_wage_weighted");
        check_against(&summary, &r);
        assert_eq!(
            summary.rows,
            r["n"].as_u64().expect("n"),
            "rows of weight 0 take no part"
        );
    }
}
