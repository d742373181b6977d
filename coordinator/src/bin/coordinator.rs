//! `fedstat-coordinator`: run the coordinator, or manage the federation's PKI.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedstat_net::identity::Role;
use fedstat_net::pki::CaDir;

#[derive(Parser)]
#[command(
    name = "fedstat-coordinator",
    version,
    about = "fedstat coordinator: orchestrates federated rounds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve nodes and researchers until SIGINT/SIGTERM.
    Run {
        /// The coordinator's TOML config (see configs/coordinator.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The federation's certificate authority.
    #[command(subcommand)]
    Pki(Pki),
    /// The coordinator's tamper-evident audit log.
    #[command(subcommand)]
    Audit(Audit),
}

#[derive(Subcommand)]
enum Audit {
    /// Check the hash chain; name the first edited, deleted, inserted or reordered record.
    Verify {
        /// The audit log file.
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum Pki {
    /// Create the federation CA and the coordinator's certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Name of the federation (certificate organisation).
        #[arg(long, default_value = "fedstat federation")]
        federation: String,
        /// DNS names and IP addresses the coordinator is reached at (repeatable).
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
        sans: Vec<String>,
        /// Write the CA key here instead of DIR: a folder meant to stay offline (removable
        /// media), mounted only to sign, issue or revoke.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
    },
    /// Sign a certificate signing request (from `fedstat-node keygen` or `fedstat keygen`):
    /// the name comes from the request, the role from you. The production path: the party's
    /// key never leaves the party.
    Sign {
        /// Folder holding the CA (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// The CA key's folder, if `pki init --ca-key-dir` put it elsewhere.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        /// The request file (NAME.csr).
        #[arg(long)]
        csr: PathBuf,
        /// node, researcher or admin; never taken from the request.
        #[arg(long)]
        role: Role,
        /// Where to write NAME.pem (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = fedstat_net::pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Issue a certificate and its key at the CA (demos and tests: the key then has to travel
    /// to its owner; in production use `keygen` at the party and `pki sign` here).
    Issue {
        /// Folder holding the CA (from `pki init`).
        #[arg(long)]
        dir: PathBuf,
        /// The CA key's folder, if `pki init --ca-key-dir` put it elsewhere.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long)]
        role: Role,
        /// The party's name (letters, digits, `.`, `_`, `-`); nodes are known by it.
        #[arg(long)]
        name: String,
        /// Where to write NAME.pem and NAME.key (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = fedstat_net::pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Re-sign a certificate for another period, keeping its name, role and key (and the
    /// coordinator's host names): the party swaps the certificate, its key never moves.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        /// The CA key's folder, if `pki init --ca-key-dir` put it elsewhere.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        /// Renew DIR/NAME.pem.
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        name: Option<String>,
        /// Or renew this certificate (the name is the one it carries).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Where to write NAME.pem (default: the folder of the certificate renewed).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = fedstat_net::pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Re-sign DIR/crl.pem with a fresh next-update date (it is valid for 90 days; peers warn
    /// 30 days before it lapses). Distribute the new file.
    Crl {
        #[arg(long)]
        dir: PathBuf,
        /// The CA key's folder, if `pki init --ca-key-dir` put it elsewhere.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
    },
    /// Revoke a party's certificate and rewrite DIR/crl.pem; then send SIGHUP to the
    /// coordinator (whose config names the CRL) to refuse and disconnect it at once.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        /// The CA key's folder, if `pki init --ca-key-dir` put it elsewhere.
        #[arg(long)]
        ca_key_dir: Option<PathBuf>,
        #[arg(long)]
        name: String,
        /// The certificate to revoke (default: DIR/NAME.pem).
        #[arg(long)]
        cert: Option<PathBuf>,
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
            let cfg = fedstat_coordinator::config::CoordinatorConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            rt.block_on(async {
                let fed = fedstat_coordinator::server::federation(&cfg)?;
                let listeners = fedstat_coordinator::server::bind(&cfg)?;
                let addr = listeners.addr;
                let on = match (listeners.quic.is_some(), listeners.tcp.is_some()) {
                    (true, true) => "QUIC (UDP) and TCP",
                    (true, false) => "QUIC (UDP) only",
                    _ => "TCP only",
                };
                eprintln!("fedstat-coordinator: listening on {addr}: {on}");
                // Tests and the demo read the bound address from this line.
                println!("listening on {addr}");
                std::io::stdout().flush().context("cannot write to stdout")?;
                fedstat_coordinator::server::serve(
                    listeners,
                    fed,
                    &cfg,
                    fedstat_net::process::shutdown_signal(),
                )
                .await;
                anyhow::Ok(())
            })?;
            eprintln!("fedstat-coordinator: stopped");
            Ok(())
        }
        Command::Pki(Pki::Init {
            dir,
            federation,
            sans,
            ca_key_dir,
        }) => {
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            fedstat_net::pki::init(&ca, &federation, &sans)?;
            println!(
                "created the federation CA and the coordinator certificate in {}",
                dir.display()
            );
            Ok(())
        }
        Command::Pki(Pki::Revoke {
            dir,
            ca_key_dir,
            name,
            cert,
        }) => {
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            let crl = fedstat_net::pki::revoke(&ca, &name, cert.as_deref())?;
            println!(
                "revoked `{name}`; wrote {} (send SIGHUP to the coordinator to apply it now)",
                crl.display()
            );
            Ok(())
        }
        Command::Pki(Pki::Issue {
            dir,
            ca_key_dir,
            role,
            name,
            out,
            days,
        }) => {
            let out = out.unwrap_or_else(|| dir.clone());
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            let (cert, key) = fedstat_net::pki::issue(&ca, role, &name, &out, days)?;
            println!("issued {role} `{name}`: {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::Pki(Pki::Renew {
            dir,
            ca_key_dir,
            name,
            cert,
            out,
            days,
        }) => {
            let cert = match (cert, name) {
                (Some(cert), _) => cert,
                (None, Some(name)) => {
                    fedstat_net::identity::validate_name(&name)?;
                    dir.join(format!("{name}.pem"))
                }
                (None, None) => anyhow::bail!("give --name or --cert"),
            };
            let out = out.unwrap_or_else(|| cert.parent().map(PathBuf::from).unwrap_or_default());
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            let (path, who) = fedstat_net::pki::renew(&ca, &cert, &out, days)?;
            println!("renewed {who} for {days} days: {}", path.display());
            Ok(())
        }
        Command::Pki(Pki::Crl { dir, ca_key_dir }) => {
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            let crl = fedstat_net::pki::refresh_crl(&ca)?;
            println!(
                "re-signed {} (valid {} days); send SIGHUP to the coordinator and give nodes the new copy",
                crl.display(),
                fedstat_net::pki::CRL_DAYS
            );
            Ok(())
        }
        Command::Pki(Pki::Sign {
            dir,
            ca_key_dir,
            csr,
            role,
            out,
            days,
        }) => {
            let out = out.unwrap_or_else(|| dir.clone());
            let ca = CaDir::new(&dir).with_key_dir(ca_key_dir.as_deref());
            let (cert, who) = fedstat_net::pki::sign(&ca, &csr, role, &out, days)?;
            println!("signed {who}: {}", cert.display());
            Ok(())
        }
        Command::Audit(Audit::Verify { file }) => {
            let report = fedstat_core::audit::verify(&file)?;
            anyhow::ensure!(report.is_intact(), "audit log {}: {report}", file.display());
            println!("audit log {}: {report}", file.display());
            Ok(())
        }
    }
}
