//! `fedstat demo`: a whole federation on this machine, from the real binaries. In a temporary
//! folder it creates a PKI, starts `fedstat-coordinator` and one `fedstat-node` per CSV file
//! (separate processes talking QUIC on loopback), submits an experiment, shows its progress,
//! compares the federated model with the same model fitted centrally on the pooled rows, writes
//! the results and stops everything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedstat_core::data::{column_sums, load_design, Design, LoadLimits, Standardization, StandardizationExt};
use fedstat_core::glm::{fit_pooled, Family};
use fedstat_core::model::{evaluate, fit_central, metrics, Metrics};
use fedstat_core::spec::ExperimentSpec;
use fedstat_proto::output::{GlmSummary, Output};
use fedstat_proto::wire::ExperimentState;

use crate::client::Client;
use crate::config::ResearcherConfig;
use crate::harness::{self, write, Bins, CoordinatorOptions};
use crate::results;
use crate::{Error, Result};

/// The bundled data: four simulated offices (see configs/demo/cps1988/README.md).
const BUNDLED: [(&str, &str); 4] = [
    ("midwest", include_str!("../../configs/demo/cps1988/midwest.csv")),
    (
        "northeast",
        include_str!("../../configs/demo/cps1988/northeast.csv"),
    ),
    ("south", include_str!("../../configs/demo/cps1988/south.csv")),
    ("west", include_str!("../../configs/demo/cps1988/west.csv")),
];
const BUNDLED_README: &str = include_str!("../../configs/demo/cps1988/README.md");
/// The default experiment: logistic regression of wage > 522.32.
pub const DEFAULT_EXPERIMENT: &str = include_str!("../../configs/experiment-logit.toml");

#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Folder with one CSV per node (default: the bundled CPS 1988 data).
    pub data: Option<PathBuf>,
    /// Experiment TOML (default: configs/experiment-logit.toml, bundled).
    pub experiment: Option<PathBuf>,
    pub rounds: Option<u32>,
    /// Where to write the results (default: ./fedstat-demo-results).
    pub out: PathBuf,
    /// Print one line per round.
    pub verbose: bool,
    /// A TOML file whose `[policy]` table every simulated office applies (default: the
    /// permissive [`DEMO_POLICY`]).
    pub policy: Option<PathBuf>,
    /// Run the experiment under secure aggregation, then once more without, and check that
    /// the two models are the same bit for bit.
    pub secure_aggregation: bool,
}

/// The simulated offices' site policy when `--policy` is not given: any column, automatic
/// approval and no floor on `min_nodes`, so any experiment on any folder of CSVs can run. The
/// other disclosure rules (cells of at least 10 rows, differencing, batch and epoch bounds)
/// keep their defaults. A real office's defaults are stricter: no column until listed.
pub const DEMO_POLICY: &str = "[policy]\n\
    # fedstat demo: permissive policy for simulated offices (real defaults are stricter)\n\
    allowed_features = [\"*\"]\nallowed_targets = [\"*\"]\nmin_nodes_floor = 1\napproval = \"auto\"\n";

/// The `[policy]` table of `path`, as TOML text for the simulated offices' configs.
fn policy_table(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| Error::Demo(format!("{}: not valid TOML: {e}", path.display())))?;
    let policy = doc
        .get("policy")
        .and_then(toml::Value::as_table)
        .ok_or_else(|| Error::Demo(format!("{} has no [policy] table", path.display())))?;
    // No custodian sits at the simulated offices: approval is automatic, whatever FILE says.
    let mut policy = policy.clone();
    policy.insert("approval".into(), toml::Value::String("auto".into()));
    let mut wrapper = toml::Table::new();
    wrapper.insert("policy".into(), toml::Value::Table(policy));
    toml::to_string(&wrapper).map_err(|e| Error::Demo(format!("{}: {e}", path.display())))
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub experiment: u64,
    /// Pooled test metrics (federated averaging; empty for an exact fit).
    pub federated: Metrics,
    pub central: Metrics,
    /// Exact fits: the largest relative difference between the federated and the central
    /// coefficients and standard errors.
    pub exact_max_relative_difference: Option<f64>,
    pub rounds: u32,
    pub nodes: usize,
    pub seconds: f64,
}

/// The node names and CSV files of the demo federation.
fn node_files(opts: &DemoOptions, work: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    match &opts.data {
        None => {
            let dir = work.join("data");
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
            write(&dir.join("README.md"), BUNDLED_README)?;
            for (name, text) in BUNDLED {
                let path = dir.join(format!("{name}.csv"));
                write(&path, text)?;
                files.push((name.to_owned(), path));
            }
        }
        Some(dir) => {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
            for entry in entries {
                let path = entry.map_err(|e| Error::io("cannot list", dir, e))?.path();
                if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
                    let stem = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    // Certificate names allow letters, digits, '.', '_' and '-'.
                    let name: String = stem
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                                c
                            } else {
                                '-'
                            }
                        })
                        .take(64)
                        .collect();
                    let path =
                        std::path::absolute(&path).map_err(|e| Error::io("cannot resolve", &path, e))?;
                    files.push((name, path));
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(Error::Demo(format!("no .csv file in {}", dir.display())));
            }
        }
    }
    Ok(files)
}

/// Run the demo; prints progress to stdout.
pub async fn run(opts: DemoOptions) -> Result<DemoReport> {
    run_demo(opts).await.map_err(|e| match e {
        // The harness's messages are the demo's own.
        Error::Harness(m) => Error::Demo(m),
        other => other,
    })
}

async fn run_demo(opts: DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    let bins = Bins::beside_this_program()?;
    let mut spec: ExperimentSpec = match &opts.experiment {
        Some(path) => fedstat_core::spec::from_toml_file(path)?,
        None => {
            toml::from_str(DEFAULT_EXPERIMENT).map_err(|e| Error::Demo(format!("bundled experiment: {e}")))?
        }
    };
    if let Some(r) = opts.rounds {
        spec.rounds = r;
    }
    fedstat_core::spec::validate(&spec)?;
    let tmp = tempfile::Builder::new()
        .prefix("fedstat-demo-")
        .tempdir()
        .map_err(|e| Error::Demo(format!("cannot create a temporary folder: {e}")))?;
    let work = tmp.path().to_owned();
    let files = node_files(&opts, &work)?;
    let n = files.len();
    spec.min_nodes = spec.min_nodes.min(n as u32);
    if opts.secure_aggregation {
        spec.secure_aggregation = true;
        spec.min_nodes = spec.min_nodes.max(2);
        fedstat_core::spec::validate(&spec)?;
    }
    let policy = match &opts.policy {
        Some(path) => policy_table(path)?,
        None => DEMO_POLICY.to_owned(),
    };
    if spec.is_exact_glm() {
        println!(
            "fedstat demo: {n} simulated offices, exact {} fit (federated Newton/IRLS, at most {} iterations)",
            spec.model.as_str(),
            spec.max_iterations
        );
    } else {
        println!(
            "fedstat demo: {n} simulated offices, {} model, {} rounds",
            spec.model.as_str(),
            spec.rounds
        );
    }
    match &opts.policy {
        Some(path) => println!(
            "  every office applies the [policy] of {} (with automatic approval: no custodian sits here)",
            path.display()
        ),
        None => println!(
            "  the offices use a permissive demo policy (any column, automatic approval, no floor on \
             min_nodes); a real office's defaults are stricter: see yours with --policy node.toml"
        ),
    }
    println!("  working folder {}", work.display());

    // 1. PKI: a fresh CA, the coordinator's certificate, one certificate per party.
    let pki = work.join("pki");
    bins.pki_init(&pki, Some("fedstat demo"))?;
    bins.pki_issue(&pki, "researcher", "demo-researcher")?;
    for (name, _) in &files {
        bins.pki_issue(&pki, "node", name)?;
    }

    // 2. The coordinator, on a free loopback port.
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io("cannot create", &logs, e))?;
    let ca = pki.join("ca.pem");
    let tls = |name: &str| harness::tls_section(&pki, &ca, name);
    let coord_cfg = work.join("coordinator.toml");
    write(
        &coord_cfg,
        &harness::coordinator_config(&tls("coordinator"), &CoordinatorOptions::default()),
    )?;
    let (coord, addr) = bins.spawn_coordinator(&coord_cfg, &logs.join("coordinator.log"))?;
    println!("  coordinator listening on {addr}");

    // 3. One node per CSV file.
    let mut nodes = Vec::new();
    for (name, csv) in &files {
        let cfg = work.join(format!("node-{name}.toml"));
        let datasets = [(spec.dataset.as_str(), csv.as_path())];
        write(&cfg, &harness::node_config(&addr, &tls(name), &datasets, &policy))?;
        nodes.push(bins.spawn_node(
            name,
            &cfg,
            &logs.join(format!("node-{name}.err.log")),
            Some(&logs.join(format!("node-{name}.log"))),
        )?);
    }

    // 4. The researcher: wait for the nodes, submit, follow.
    let rcfg_path = work.join("researcher.toml");
    write(
        &rcfg_path,
        &harness::researcher_config(&addr, &tls("demo-researcher")),
    )?;
    let outcome = follow(&ResearcherConfig::load(&rcfg_path)?, &spec, n, &opts).await;

    // Waiting for the children to exit blocks: keep it off the runtime's threads.
    let stopping = tokio::task::spawn_blocking(move || {
        harness::stop_all(nodes, Duration::from_secs(5));
        harness::stop_all(vec![coord], Duration::from_secs(5));
    });
    // A failed join means the stopping thread panicked; the children were killed on drop.
    let _ = stopping.await;
    let (experiment, federated, rounds, glm) = match outcome {
        Ok(x) => x,
        Err(e) => {
            let kept = tmp.keep();
            let what = match e {
                Error::Demo(m) => m,
                other => other.to_string(),
            };
            return Err(Error::Demo(format!(
                "{what} (logs kept in {})",
                kept.join("logs").display()
            )));
        }
    };

    // 5. The same model fitted centrally on the pooled rows.
    let (central, exact_max_relative_difference) = match glm {
        Some((columns, fed)) => {
            let central = central_glm(&spec, &files)?;
            println!("\n{}", results::glm_table(&columns, &fed));
            let diff = print_glm_comparison(&columns, &fed, &central);
            (Metrics::default(), Some(diff))
        }
        None => {
            let central = central_fit(&spec, &files)?;
            print_comparison(&federated, &central);
            (central, None)
        }
    };
    println!("  results written to {}", opts.out.display());
    Ok(DemoReport {
        experiment,
        federated,
        central,
        exact_max_relative_difference,
        rounds,
        nodes: n,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `(node, reason)` from an event saying a node could not take part in the statistics phase
/// (which keeps it out of the whole experiment).
fn refusal(message: &str) -> Option<(&str, &str)> {
    let rest = message.split_once("node `")?.1;
    let (node, rest) = rest.split_once('`')?;
    let why = rest.strip_prefix(" could not do statistics: ")?;
    Some((node, why))
}

/// What the demo's experiment produced: its id, pooled test metrics, rounds, and for an exact
/// fit the design columns and the inference.
type Followed = (u64, Metrics, u32, Option<(Vec<String>, GlmSummary)>);

async fn follow(
    cfg: &ResearcherConfig,
    spec: &ExperimentSpec,
    nodes: usize,
    opts: &DemoOptions,
) -> Result<Followed> {
    let client = Client::connect(cfg).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = client.nodes().await?.len();
        if up == nodes {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Demo(format!(
                "only {up} of {nodes} nodes connected within 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  {nodes} nodes connected; submitting \"{}\"", spec.name);
    let id = client.submit(spec.clone()).await?;
    let mut shown = 0;
    let mut refused: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let status = loop {
        let s = client
            .status(Some(id))
            .await?
            .pop()
            .ok_or_else(|| Error::Protocol("empty status".into()))?;
        for r in s.history.iter().skip(shown) {
            if opts.verbose || r.round == 1 || r.round == s.rounds || r.round % 5 == 0 {
                println!("  {}", results::round_line(r, s.rounds));
            }
        }
        shown = s.history.len();
        // An office whose policy refuses the experiment says why once; when too few offices
        // are left to reach min_nodes, waiting for the phase deadlines would show nothing more.
        for e in &s.events {
            if let Some((node, why)) = refusal(&e.message) {
                if !refused.contains_key(node) {
                    println!("  office `{node}` refused: {why}");
                    refused.insert(node.to_owned(), why.to_owned());
                }
            }
        }
        if s.state.is_finished() {
            break s;
        }
        if nodes.saturating_sub(refused.len()) < spec.min_nodes as usize {
            let _ = client
                .call(fedstat_proto::wire::Request::Cancel { experiment: id })
                .await;
            return Err(Error::Demo(format!(
                "{} of the {nodes} offices refused the experiment, fewer than min_nodes = {} are left",
                refused.len(),
                spec.min_nodes
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let ExperimentState::Failed { reason } = &status.state {
        return Err(Error::Demo(format!("the experiment failed: {reason}")));
    }
    let (header, params) = client.results(id, None).await?;
    results::write(&opts.out, &header, &params)?;
    if spec.secure_aggregation {
        same_without_secure_aggregation(&client, spec, &params).await?;
    }
    client.close().await;
    if let Some(Output::Glm(g)) = header.output {
        return Ok((
            id,
            Metrics::default(),
            status.rounds_done,
            Some((header.columns, *g)),
        ));
    }
    let metrics = status
        .history
        .last()
        .and_then(|r| r.metrics.clone())
        .ok_or_else(|| Error::Demo("no pooled test metrics were computed".into()))?;
    Ok((id, metrics, status.rounds_done, None))
}

/// Run `spec` once more without secure aggregation and check that its model is `params`, bit
/// for bit: masking changes what the coordinator sees, never the result.
async fn same_without_secure_aggregation(
    client: &Client,
    spec: &ExperimentSpec,
    params: &[f64],
) -> Result<()> {
    let mut plain = spec.clone();
    plain.secure_aggregation = false;
    plain.secure_threshold = None;
    println!("  running the same experiment without secure aggregation, to compare");
    let id = client.submit(plain).await?;
    loop {
        let s = client
            .status(Some(id))
            .await?
            .pop()
            .ok_or_else(|| Error::Protocol("empty status".into()))?;
        if let ExperimentState::Failed { reason } = &s.state {
            return Err(Error::Demo(format!("the comparison run failed: {reason}")));
        }
        if s.state.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, plain_params) = client.results(id, None).await?;
    let same = plain_params.len() == params.len()
        && plain_params
            .iter()
            .zip(params)
            .all(|(a, b)| a.to_bits() == b.to_bits());
    if !same {
        return Err(Error::Demo(
            "the model under secure aggregation differs from the model without it".into(),
        ));
    }
    println!(
        "  secure aggregation: the model is bit for bit the model without it ({} parameters compared)",
        params.len()
    );
    Ok(())
}

/// An exact GLM fitted on all files' training rows pooled in this process.
pub fn central_glm(spec: &ExperimentSpec, files: &[(String, PathBuf)]) -> Result<GlmSummary> {
    let plan = spec.design().map_err(fedstat_core::data::design_error)?;
    let family = Family::of(spec.model).ok_or_else(|| Error::Demo("not a GLM".into()))?;
    let mut train: Vec<Design> = Vec::new();
    for (office, path) in files {
        train.push(load_design(path, &plan, Some(office), LoadLimits::UNLIMITED)?.train);
    }
    let pooled = Design::stack(&train)?;
    Ok(fit_pooled(
        family,
        &pooled,
        &spec.design_columns(),
        spec.max_iterations,
    )?)
}

/// The federated and the central coefficients and standard errors side by side; returns the
/// largest relative difference.
fn print_glm_comparison(columns: &[String], fed: &GlmSummary, central: &GlmSummary) -> f64 {
    let rel = |a: f64, b: f64| if b == 0.0 { a.abs() } else { ((a - b) / b).abs() };
    let width = columns.iter().map(|c| c.len()).max().unwrap_or(4).max(4);
    println!(
        "  {:width$}  {:>14} {:>14}   {:>12} {:>12}   {:>9}",
        "term", "federated", "central", "fed. SE", "central SE", "rel. diff"
    );
    let mut worst: f64 = 0.0;
    for (j, c) in columns.iter().enumerate() {
        let (b, cb) = (fed.coefficients[j], central.coefficients[j]);
        let (s, cs) = (fed.std_errors[j], central.std_errors[j]);
        let d = rel(b, cb).max(rel(s, cs));
        worst = worst.max(d);
        println!("  {c:width$}  {b:>14.6e} {cb:>14.6e}   {s:>12.4e} {cs:>12.4e}   {d:>9.1e}");
    }
    println!(
        "  federated fit: {} iteration(s); central fit on the pooled rows: {}; largest relative difference {worst:.1e}\n",
        fed.iterations, central.iterations
    );
    worst
}

/// Fit the experiment's model on all files' rows pooled, as a statistician would without
/// federation, and score it on the pooled test rows.
pub fn central_fit(spec: &ExperimentSpec, files: &[(String, PathBuf)]) -> Result<Metrics> {
    let plan = spec.design().map_err(fedstat_core::data::design_error)?;
    let mut train: Vec<Design> = Vec::new();
    let mut test: Vec<Design> = Vec::new();
    let mut sums = Vec::new();
    for (office, path) in files {
        let d = load_design(path, &plan, Some(office), LoadLimits::UNLIMITED)?;
        sums.push(column_sums(d.train.x.view()));
        train.push(d.train);
        test.push(d.test);
    }
    let names: Vec<String> = plan.names().into_iter().skip(1).collect();
    let st = Standardization::from_sums(&sums, &names)?;
    let mut pooled_train = Design::stack(&train)?;
    let mut pooled_test = Design::stack(&test)?;
    st.apply(&mut pooled_train.x);
    st.apply(&mut pooled_test.x);
    let beta = fit_central(
        spec.model,
        pooled_train.x.view(),
        pooled_train.y.view(),
        spec.training.l2,
        &plan.names(),
    )?;
    let sums = evaluate(spec.model, pooled_test.x.view(), pooled_test.y.view(), &beta)?;
    Ok(metrics(spec.model, &sums))
}

fn print_comparison(fed: &Metrics, central: &Metrics) {
    println!();
    println!(
        "  pooled test metrics ({} test rows)   federated     central (pooled rows)",
        fed.n
    );
    let row = |name: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            println!(
                "    {name:<32} {a:>10.4}   {b:>10.4}   (difference {:+.4})",
                a - b
            );
        }
    };
    row("log-loss", fed.log_loss, central.log_loss);
    row("accuracy", fed.accuracy, central.accuracy);
    row("AUC", fed.auc, central.auc);
    row("RMSE", fed.rmse, central.rmse);
    row("R²", fed.r2, central.r2);
    println!();
}
