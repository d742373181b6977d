//! `fedstat-node`: parse arguments, load the config, run. All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedstat-node",
    version,
    about = "fedstat node: trains next to an office's private data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the coordinator and serve tasks until SIGINT/SIGTERM.
    Run {
        /// The node's TOML config (see configs/node.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check locally, without any network, that the datasets load under an experiment's schema.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// An experiment TOML (see configs/experiment-logit.toml).
        #[arg(long, short)]
        experiment: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fedstat_shared::process::init_tracing("info,quinn=warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = fedstat_node::config::NodeConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(fedstat_node::session::run(
                cfg,
                fedstat_shared::process::shutdown_signal(),
            ))?;
            eprintln!("fedstat-node: stopped");
            Ok(())
        }
        Command::Check { config, experiment } => {
            let cfg = fedstat_node::config::NodeConfig::load(&config)?;
            for line in fedstat_node::check(&cfg, &experiment)? {
                println!("{line}");
            }
            Ok(())
        }
    }
}
