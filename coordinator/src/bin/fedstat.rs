//! `fedstat`: the researcher CLI. Submit and follow experiments, fetch results, list nodes,
//! or run a whole local federation with `fedstat demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedstat_coordinator::client::Client;
use fedstat_coordinator::config::ResearcherConfig;
use fedstat_coordinator::demo::{self, DemoOptions};
use fedstat_coordinator::results;
use fedstat_proto::output::Output;
use fedstat_proto::wire::{ExperimentState, Request, Response};

#[derive(Parser)]
#[command(name = "fedstat", version, about = "fedstat researcher CLI")]
struct Cli {
    /// Researcher config (see configs/researcher.toml) [env: FEDSTAT_CONFIG, default: researcher.toml]
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit an experiment TOML; prints its id.
    Submit { experiment: PathBuf },
    /// Show one experiment, or all.
    Status { id: Option<u64> },
    /// Follow an experiment until it ends: round k of n with its pooled test metrics.
    Watch { id: u64 },
    /// Write model.json, metrics.csv and parameters.bin of an experiment's latest model.
    Results {
        id: u64,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The model after this completed round (default: the latest).
        #[arg(long)]
        round: Option<u32>,
    },
    /// Connected nodes and the dataset names they offer.
    Nodes,
    /// Stop an experiment (your own; an admin may stop any).
    Cancel { id: u64 },
    /// Close a node's connection (admin certificate required).
    Disconnect { node: String },
    /// Make your private key and a certificate signing request for the secretariat (which
    /// signs it with `fedstat-coordinator pki sign`); the key never leaves this machine.
    Keygen {
        /// Your name in the federation (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        name: String,
        /// Where to write NAME.key (mode 0600) and NAME.csr.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Run a complete local federation of real processes on this machine.
    Demo {
        /// Folder with one CSV per node (default: the bundled CPS 1988 data, 4 offices).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Experiment TOML (default: logistic regression of wage > 522.32).
        #[arg(long)]
        experiment: Option<PathBuf>,
        #[arg(long)]
        rounds: Option<u32>,
        /// Where to write the results.
        #[arg(long, default_value = "fedstat-demo-results")]
        out: PathBuf,
        /// One line per round.
        #[arg(long, short)]
        verbose: bool,
        /// Run under secure aggregation, then once more without, and check that the two
        /// models are the same bit for bit.
        #[arg(long)]
        secure_aggregation: bool,
        /// Apply the `[policy]` table of this TOML file (e.g. your node.toml) to every
        /// simulated office, to see what your own site policy would refuse. Without it the
        /// offices use a permissive demo policy.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Everything this process creates (store, models, audit log, state, results, keys) is
    // owner-only; see fedstat_core::files.
    fedstat_core::files::owner_only_umask();
    fedstat_net::process::init_tracing("warn");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .or_else(|| std::env::var_os("FEDSTAT_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("researcher.toml"))
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let path = config_path(cli);
    let cfg = ResearcherConfig::load(&path).with_context(|| "loading the researcher config (--config)")?;
    Ok(Client::connect(&cfg).await?)
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn done(r: Response, json: bool) -> anyhow::Result<()> {
    match r {
        Response::Done { message } if json => print_json(&serde_json::json!({ "done": message })),
        Response::Done { message } => {
            println!("{message}");
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the coordinator: {other:?}"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Submit { experiment } => {
            let spec = fedstat_core::spec::from_toml_file(experiment)?;
            let client = connect(&cli).await?;
            let id = client.submit(spec).await?;
            if cli.json {
                print_json(&serde_json::json!({ "experiment": id }))?;
            } else {
                println!("{id}");
            }
            client.close().await;
        }
        Command::Status { id } => {
            let client = connect(&cli).await?;
            let all = client.status(*id).await?;
            if cli.json {
                print_json(&all)?;
            } else if let (Some(_), Some(s)) = (id, all.first()) {
                println!(
                    "experiment {} \"{}\" ({}) by {}",
                    s.id,
                    s.name,
                    s.model.as_str(),
                    s.submitter
                );
                println!("state: {}", s.state);
                println!("rounds: {} of {}", s.rounds_done, s.rounds);
                for line in results::privacy_lines(&s.privacy) {
                    println!("{line}");
                }
                if !s.participants.is_empty() {
                    println!("current participants: {}", s.participants.join(", "));
                }
                for r in &s.history {
                    println!("  {}", results::round_line(r, s.rounds));
                }
                println!("events:");
                for e in &s.events {
                    println!("  +{:>8.1} s  {}", e.at_ms as f64 / 1000.0, e.message);
                }
            } else {
                println!("{:>4}  {:<24} {:<9} {:>9} state", "id", "name", "model", "rounds");
                for s in &all {
                    println!("{}", results::status_line(s));
                }
            }
            client.close().await;
        }
        Command::Watch { id } => {
            let client = connect(&cli).await?;
            let (mut rounds, mut events) = (0, 0);
            let last = loop {
                let s = client
                    .status(Some(*id))
                    .await?
                    .pop()
                    .context("the coordinator returned no status")?;
                for e in s.events.iter().skip(events) {
                    if cli.json {
                        print_json(&serde_json::json!({ "event": e }))?;
                    } else {
                        println!("  +{:>8.1} s  {}", e.at_ms as f64 / 1000.0, e.message);
                    }
                }
                // By round number, not position: a status may carry only the newest rounds.
                for r in s.history.iter().filter(|r| r.round > rounds) {
                    if cli.json {
                        print_json(&serde_json::json!({ "round": r }))?;
                    } else {
                        println!("{}", results::round_line(r, s.rounds));
                    }
                }
                rounds = s.history.last().map_or(rounds, |r| r.round);
                events = s.events.len();
                if s.state.is_finished() {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            client.close().await;
            println!("experiment {}: {}", last.id, last.state);
            if let ExperimentState::Failed { .. } = last.state {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Results { id, out, round } => {
            let client = connect(&cli).await?;
            let (header, params) = client.results(*id, *round).await?;
            let files = results::write(out, &header, &params)?;
            client.close().await;
            if cli.json {
                print_json(&results::model_json(&header, &params))?;
            } else {
                if let Some(fedstat_proto::output::Output::Table(t)) = &header.output {
                    print!("{}", results::table_text(t));
                }
                for f in files {
                    println!("wrote {}", out.join(f).display());
                }
                if let Some(Output::Glm(g)) = &header.output {
                    println!("\n{}", results::glm_table(&header.columns, g));
                }
                for line in results::privacy_lines(&header.status.privacy) {
                    println!("{line}");
                }
            }
        }
        Command::Nodes => {
            let client = connect(&cli).await?;
            let nodes = client.nodes().await?;
            client.close().await;
            if cli.json {
                print_json(&nodes)?;
            } else {
                for n in &nodes {
                    println!("{}", results::node_line(n));
                }
            }
        }
        Command::Cancel { id } => {
            let client = connect(&cli).await?;
            let r = client.call(Request::Cancel { experiment: *id }).await;
            client.close().await;
            done(r?, cli.json)?;
        }
        Command::Disconnect { node } => {
            let client = connect(&cli).await?;
            let r = client.call(Request::Disconnect { node: node.clone() }).await;
            client.close().await;
            done(r?, cli.json)?;
        }
        Command::Keygen { name, out } => {
            let (key, csr) = fedstat_net::pki::keygen(name, out)?;
            println!(
                "wrote {} (keep it here) and {} (send it to the secretariat)",
                key.display(),
                csr.display()
            );
        }
        Command::Demo {
            data,
            experiment,
            rounds,
            out,
            verbose,
            policy,
            secure_aggregation,
        } => {
            let report = demo::run(DemoOptions {
                data: data.clone(),
                experiment: experiment.clone(),
                rounds: *rounds,
                out: out.clone(),
                verbose: *verbose,
                policy: policy.clone(),
                secure_aggregation: *secure_aggregation,
            })
            .await?;
            if cli.json {
                print_json(&serde_json::json!({
                    "experiment": report.experiment,
                    "nodes": report.nodes,
                    "rounds": report.rounds,
                    "seconds": report.seconds,
                    "federated": report.federated,
                    "central": report.central,
                    "exact_max_relative_difference": report.exact_max_relative_difference,
                }))?;
            } else {
                println!("demo finished in {:.1} s", report.seconds);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
