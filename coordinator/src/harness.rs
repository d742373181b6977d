//! One way to launch a whole federation of the real binaries on this machine, shared by
//! `fedstat demo`, the round benchmark and the end-to-end tests: finding the binaries, a PKI
//! from `fedstat-coordinator pki`, the TOML of every party's config, and the coordinator and
//! node processes (the coordinator on 127.0.0.1:0, its address read from its `listening on`
//! line).
//!
//! Everything here is blocking (std::process): the calls are short, and async callers run them
//! outside anything they time. A [`Proc`] is killed when dropped, so a failing caller leaves
//! nothing running.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::{Error, Result};

/// How long a coordinator may take to print its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The folder holding `fedstat-coordinator`, `fedstat-node` and `fedstat`.
#[derive(Debug, Clone)]
pub struct Bins {
    dir: PathBuf,
}

impl Bins {
    /// The binaries in `dir`; `fedstat-coordinator` and `fedstat-node` must be there.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Bins> {
        let bins = Bins { dir: dir.into() };
        for name in ["fedstat-coordinator", "fedstat-node"] {
            if !bins.path(name).is_file() {
                return Err(Error::Harness(format!(
                    "{name} is not in {}; build every binary with `cargo build --release --bins`",
                    bins.dir.display()
                )));
            }
        }
        Ok(bins)
    }

    /// The binaries next to the running program (`fedstat demo`: the folder of `fedstat`).
    pub fn beside_this_program() -> Result<Bins> {
        let dir = this_program()?.parent().map(Path::to_owned).unwrap_or_default();
        Bins::in_dir(dir)
    }

    /// The binaries of the build that made the running test or bench executable:
    /// `target/<profile>/deps/NAME-HASH` -> `target/<profile>`.
    pub fn of_this_build() -> Result<Bins> {
        let exe = this_program()?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| Error::Harness(format!("{} is not inside a target folder", exe.display())))?;
        Bins::in_dir(dir)
    }

    /// The folder of the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The binary `name` (e.g. `fedstat`) in this folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn coordinator(&self) -> PathBuf {
        self.path("fedstat-coordinator")
    }

    pub fn node(&self) -> PathBuf {
        self.path("fedstat-node")
    }

    /// Refuse binaries older than a source file of `shared/`, `coordinator/` or `node/` under
    /// `workspace`: a benchmark of a stale build measures the wrong code.
    pub fn check_fresh(&self, workspace: &Path) -> Result<()> {
        let sources = ["shared", "coordinator", "node"]
            .iter()
            .filter_map(|c| newest_source(&workspace.join(c).join("src")))
            .max();
        for bin in [self.coordinator(), self.node()] {
            let built = modified(&bin).ok_or_else(|| {
                Error::Harness(format!(
                    "{} is missing: run `cargo build --release --bins` first",
                    bin.display()
                ))
            })?;
            if sources.is_some_and(|s| s > built) {
                return Err(Error::Harness(format!(
                    "{} is older than the sources: run `cargo build --release --bins` first",
                    bin.display()
                )));
            }
        }
        Ok(())
    }

    /// `fedstat-coordinator pki init`: a CA and the coordinator's certificate in `dir`
    /// (`federation` names it; default: the binary's).
    pub fn pki_init(&self, dir: &Path, federation: Option<&str>) -> Result<()> {
        let mut cmd = Command::new(self.coordinator());
        cmd.args(["pki", "init"]);
        if let Some(name) = federation {
            cmd.args(["--federation", name]);
        }
        checked(cmd.arg("--dir").arg(dir), "pki init")
    }

    /// `fedstat-coordinator pki issue`: key and certificate `name.{key,pem}` with `role` in `dir`.
    pub fn pki_issue(&self, dir: &Path, role: &str, name: &str) -> Result<()> {
        checked(
            Command::new(self.coordinator())
                .args(["pki", "issue", "--role", role, "--name", name, "--dir"])
                .arg(dir),
            &format!("pki issue {role} {name}"),
        )
    }

    /// Start `fedstat-coordinator run --config CONFIG`, its stderr appended to `log` (a
    /// restarted coordinator keeps its earlier log); returns it and the address it printed.
    pub fn spawn_coordinator(&self, config: &Path, log: &Path) -> Result<(Proc, String)> {
        let mut cmd = Command::new(self.coordinator());
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(append(log)?);
        let mut proc = Proc::spawn("the coordinator", &mut cmd, log)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| Error::Harness("the coordinator's output is not captured".into()))?;
        let (tx, rx) = mpsc::channel();
        // One thread reads the address, then keeps draining stdout so the coordinator never
        // blocks on a full pipe; it ends when the coordinator does.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                    break;
                }
            }
            // Dropping `tx` unblocks the reader when stdout ended before the address.
            drop(tx);
            lines.for_each(drop);
        });
        match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(addr) => Ok((proc, addr)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Wait a little for its exit, so its last words are in the log.
                let _ = proc.wait_within(Duration::from_secs(2));
                Err(Error::Harness(format!(
                    "the coordinator exited before listening (log {}):\n{}",
                    log.display(),
                    tail(&proc.log_text(), 20)
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Harness(format!(
                "the coordinator did not print its address within {} s (log {})",
                LISTEN_TIMEOUT.as_secs(),
                log.display()
            ))),
        }
    }

    /// Start `fedstat-node run --config CONFIG` named `name`, its stderr in `log` and its
    /// stdout in `stdout` (or nowhere).
    pub fn spawn_node(&self, name: &str, config: &Path, log: &Path, stdout: Option<&Path>) -> Result<Proc> {
        self.spawn_node_with_env(name, config, log, stdout, &[])
    }

    /// [`Bins::spawn_node`] with extra environment variables (the tests' fault points).
    pub fn spawn_node_with_env(
        &self,
        name: &str,
        config: &Path,
        log: &Path,
        stdout: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let out = match stdout {
            Some(path) => Stdio::from(create(path)?),
            None => Stdio::null(),
        };
        Proc::spawn(
            &format!("node {name}"),
            Command::new(self.node())
                .args(["run", "--config"])
                .arg(config)
                .envs(env.iter().copied())
                .stdout(out)
                .stderr(create(log)?),
            log,
        )
    }
}

/// A child process, killed when dropped; its stderr goes to `log`.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages (`the coordinator`, `node west`).
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let child = cmd
            .spawn()
            .map_err(|e| Error::Harness(format!("cannot start {name}: {e}")))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (empty when unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to 10 s for the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.terminate_within(Duration::from_secs(10))
    }

    /// SIGTERM (so it closes its QUIC connections and exits 0), then wait up to `limit`.
    pub fn terminate_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        sigterm(&[self.pid()]);
        self.wait_within(limit)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stop processes politely (one SIGTERM for all), each killed if still running `limit` after
/// its turn came.
pub fn stop_all(procs: Vec<Proc>, limit: Duration) {
    if procs.is_empty() {
        return;
    }
    sigterm(&procs.iter().map(Proc::pid).collect::<Vec<_>>());
    for mut p in procs {
        if p.wait_within(limit).is_none() {
            tracing::warn!("{} did not stop within {} s; killing it", p.name, limit.as_secs());
            p.kill();
        }
    }
}

/// `kill -TERM` (the crate forbids the unsafe a direct `kill(2)` would need).
fn sigterm(pids: &[u32]) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `path` as the inside of a TOML basic string: backslashes and quotes escaped.
pub fn toml_path(path: &Path) -> String {
    toml_str(&path.display().to_string())
}

fn toml_str(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The `[tls]` table of party `name`: `ca` trusted, `name.pem` and `name.key` from `pki`.
pub fn tls_section(pki: &Path, ca: &Path, name: &str) -> String {
    format!(
        "[tls]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        toml_path(ca),
        toml_path(&pki.join(format!("{name}.pem"))),
        toml_path(&pki.join(format!("{name}.key")))
    )
}

/// A coordinator's settings beyond its address (127.0.0.1:0) and certificate.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorOptions {
    /// `crl`: the revocation list to check peers against.
    pub crl: Option<PathBuf>,
    /// `durable`: keep the store (None: the coordinator's default).
    pub durable: Option<bool>,
    /// `data_dir`, relative to the config file's folder when relative.
    pub data_dir: Option<PathBuf>,
    /// Further top-level keys (they come before `[tls]`).
    pub extra: String,
}

/// A coordinator config listening on 127.0.0.1:0 with `tls` (from [`tls_section`]).
pub fn coordinator_config(tls: &str, opts: &CoordinatorOptions) -> String {
    let mut text = String::from("listen = \"127.0.0.1:0\"\n");
    if let Some(crl) = &opts.crl {
        text.push_str(&format!("crl = \"{}\"\n", toml_path(crl)));
    }
    if let Some(durable) = opts.durable {
        text.push_str(&format!("durable = {durable}\n"));
    }
    if let Some(dir) = &opts.data_dir {
        text.push_str(&format!("data_dir = \"{}\"\n", toml_path(dir)));
    }
    text.push_str(&opts.extra);
    text.push_str(tls);
    text
}

/// A node config dialling `addr` (server name `localhost`) with `tls`, offering `datasets`
/// (name, CSV), followed by `tail` (TOML tables such as `[policy]`).
pub fn node_config(addr: &str, tls: &str, datasets: &[(&str, &Path)], tail: &str) -> String {
    // `[datasets]` even when empty: what callers append after it stays out of `[tls]`.
    let mut text = format!("coordinator = \"{addr}\"\nserver_name = \"localhost\"\n{tls}\n[datasets]\n");
    for (name, csv) in datasets {
        text.push_str(&format!("\"{}\" = \"{}\"\n", toml_str(name), toml_path(csv)));
    }
    if !tail.is_empty() {
        text.push('\n');
        text.push_str(tail);
    }
    text
}

/// A researcher config for the coordinator at `addr` with `tls`.
pub fn researcher_config(addr: &str, tls: &str) -> String {
    format!("coordinator = \"{addr}\"\nserver_name = \"localhost\"\n{tls}")
}

/// Write `text` to `path`.
pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io("cannot write", path, e))
}

fn this_program() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error::Harness(format!("cannot locate this program: {e}")))
}

fn create(path: &Path) -> Result<File> {
    File::create(path).map_err(|e| Error::io("cannot create", path, e))
}

fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io("cannot open", path, e))
}

/// Run `cmd` to completion; its stderr (or stdout) is the error when it fails.
fn checked(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::Harness(format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        let said = if out.stderr.is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        return Err(Error::Harness(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(said).trim()
        )));
    }
    Ok(())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the `.rs` files under `dir`.
fn newest_source(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            modified(&path)
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// Median, minimum and maximum of benchmark samples (NaN for none): what the benchmarks quote.
pub fn median_range(xs: &[f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_as_toml_with_escaped_paths() {
        let pki = Path::new("/tmp/a \"b\"\\pki");
        let tls = tls_section(pki, &pki.join("ca.pem"), "west");
        let opts = CoordinatorOptions {
            crl: Some(pki.join("crl.pem")),
            durable: Some(true),
            data_dir: Some("data".into()),
            extra: "max_connections = 3\n".into(),
        };
        let coord: toml::Table = toml::from_str(&coordinator_config(&tls, &opts)).expect("coordinator");
        assert_eq!(coord["data_dir"].as_str(), Some("data"));
        assert_eq!(coord["tls"]["cert"].as_str(), Some("/tmp/a \"b\"\\pki/west.pem"));
        let csv = pki.join("west.csv");
        let node = node_config(
            "127.0.0.1:9",
            &tls,
            &[("cps", &csv)],
            "[policy]\nmin_nodes_floor = 1\n",
        );
        let node: toml::Table = toml::from_str(&node).expect("node");
        assert_eq!(node["datasets"]["cps"].as_str(), csv.to_str());
        assert_eq!(node["policy"]["min_nodes_floor"].as_integer(), Some(1));
        let r: toml::Table = toml::from_str(&researcher_config("127.0.0.1:9", &tls)).expect("researcher");
        assert_eq!(r["coordinator"].as_str(), Some("127.0.0.1:9"));
    }
}
