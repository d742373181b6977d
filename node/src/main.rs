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
    /// List the experiment manifests held for the data custodian's approval.
    Pending {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Approve a held manifest (its hash, or at least its first 8 hex digits).
    Approve {
        hash: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Reject a held manifest; the reason is sent to the researcher.
    Reject {
        hash: String,
        #[arg(long)]
        reason: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The privacy budget per dataset: budget, spent and remaining ε, charges per experiment.
    Budget {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a certificate's key fingerprint as a line of `[policy.secure_peers]`, for the
    /// other offices to pin (exchange it out of band, not through the secretariat).
    Fingerprint {
        /// A node certificate (PEM), e.g. the `tls.cert` of a node config.
        #[arg(long)]
        cert: PathBuf,
    },
    /// The node's tamper-evident audit log.
    #[command(subcommand)]
    Audit(Audit),
    /// Make the node's private key and a certificate signing request for the secretariat
    /// (which signs it with `fedstat-coordinator pki sign`); the key never leaves this machine.
    Keygen {
        /// The node's name in the federation (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        name: String,
        /// Where to write NAME.key (mode 0600) and NAME.csr.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Audit {
    /// Check the hash chain; name the first edited, deleted, inserted or reordered record.
    Verify {
        /// Check the audit log named by this node config.
        #[arg(long, short, required_unless_present = "file", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// Check this audit log file.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Everything this process creates (store, models, audit log, state, results, keys) is
    // owner-only; see fedstat_core::files.
    fedstat_core::files::owner_only_umask();
    fedstat_net::process::init_tracing("info,quinn=warn");
    fedstat_net::process::exit_code(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = fedstat_node::config::NodeConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(fedstat_node::session::run(
                cfg,
                fedstat_net::process::shutdown_signal(),
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
        Command::Pending { config } => {
            let held = store(&config)?.pending()?;
            if held.is_empty() {
                println!("no manifests are held for approval");
            }
            for p in held {
                println!("{}", p.describe());
            }
            Ok(())
        }
        Command::Approve { hash, config } => {
            let d = store(&config)?.approve(&hash)?;
            println!("approved manifest {}", d.manifest);
            Ok(())
        }
        Command::Reject { hash, reason, config } => {
            let d = store(&config)?.reject(&hash, &reason)?;
            println!("rejected manifest {}: {}", d.manifest, d.reason);
            Ok(())
        }
        Command::Budget { config, json } => {
            let cfg = fedstat_node::config::NodeConfig::load(&config)?;
            let offered: Vec<String> = cfg.datasets.keys().cloned().collect();
            let spend = fedstat_node::ledger::PrivacyLedger::new(&cfg.privacy_ledger)
                .report(&offered, cfg.policy.privacy.as_ref())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "datasets": spend }))?
                );
            } else {
                for line in fedstat_node::ledger::describe(&spend) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Fingerprint { cert } => {
            let (id, print) = fedstat_net::attest::certificate_pin(&cert)?;
            if id.role != fedstat_net::identity::Role::Node {
                anyhow::bail!(
                    "{} is a {} certificate; offices pin node certificates",
                    cert.display(),
                    id.role
                );
            }
            println!("{} = \"{print}\"", id.name);
            Ok(())
        }
        Command::Keygen { name, out } => {
            let (key, csr) = fedstat_net::pki::keygen(&name, &out)?;
            println!(
                "wrote {} (keep it here) and {} (send it to the secretariat)",
                key.display(),
                csr.display()
            );
            Ok(())
        }
        Command::Audit(Audit::Verify { config, file }) => {
            let path = match (file, config) {
                (Some(f), _) => f,
                (None, Some(c)) => fedstat_node::config::NodeConfig::load(&c)?.audit_log,
                (None, None) => anyhow::bail!("give --config or --file"),
            };
            println!("{}", fedstat_node::governance::verify_audit(&path)?);
            Ok(())
        }
    }
}

fn store(config: &std::path::Path) -> anyhow::Result<fedstat_node::approval::ApprovalStore> {
    let cfg = fedstat_node::config::NodeConfig::load(config)?;
    Ok(fedstat_node::approval::ApprovalStore::new(&cfg.state_dir))
}
