//! Load: a live coordinator running a three-node experiment while, on loopback, hundreds of
//! connections present no certificate or one from another CA, a legitimate node certificate
//! and a researcher certificate send thousands of malformed frames on many streams, and junk
//! datagrams hit the UDP port. Bounded in count and time. The experiment must complete with
//! every legitimate node in every round, the coordinator must stay up, within a memory bound,
//! and never panic. Figures are printed (`cargo test --release -p fedstat-e2e load --
//! --nocapture`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedstat_net::tls::{client_config, TlsFiles};
use fedstat_net::transport::{read_frame, write_frame};
use fedstat_proto::wire::{
    encode_frame, AnswerHeader, CoordMsg, DType, NodeMsg, Phase, Response, TensorMeta, Upload,
    PROTOCOL_VERSION,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;

use crate::support::{bin, demo_data, logit_experiment, raw_client, Fed};

/// Connection attempts without a valid certificate (half with none, half from another CA).
const BAD_CERT_ATTEMPTS: u64 = 400;
/// Connections with a valid node certificate whose hello is garbage.
const BAD_HELLOS: u64 = 50;
/// Malformed frames on update streams of a node connection that said a valid hello.
const NODE_STREAM_FRAMES: u64 = 5000;
/// Of which: streams that send all but the last byte of a 1 MiB frame, then stall until the
/// coordinator's header timeout ends them. A node connection gets 8 update streams at once, so
/// the stalled ones and the flood share them.
const STALLED_STREAMS: u64 = 4;
/// Flood streams in flight at once, within the node's 8 stream credits.
const FLOOD_IN_FLIGHT: usize = 4;
/// Malformed requests, one per stream, on a researcher connection.
const REQUEST_FRAMES: u64 = 2000;
/// Junk UDP datagrams at the coordinator's port.
const DATAGRAMS: u64 = 50_000;
/// Peak resident memory the coordinator may reach: its baseline (about 20 MiB with a
/// 9-parameter model), plus what the attack can make it hold at once: 8 update streams of the
/// node connection and 8 requests of the researcher connection (at most 1 MiB each), a few
/// hundred handshakes' state. Anything above this means a buffer grows with the attack.
const MAX_HWM_MIB: u64 = 200;
/// Everything the attack does ends within this.
const ATTACK_LIMIT: Duration = Duration::from_secs(25);

/// What the attackers did and what came back.
#[derive(Debug, Default)]
struct Figures {
    bad_cert_attempts: AtomicU64,
    bad_cert_refused: AtomicU64,
    bad_cert_served: AtomicU64,
    bad_hellos: AtomicU64,
    bad_hellos_closed: AtomicU64,
    node_frames: AtomicU64,
    request_frames: AtomicU64,
    request_errors_answered: AtomicU64,
    datagrams: AtomicU64,
}

/// A small deterministic generator: the junk is the same on every run.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Malformed frame number `i`: random bytes, an oversized or absurd length prefix, a valid
/// prefix over garbage, a truncated frame, an update header for an experiment that is not
/// open to this node (a replay), or a header announcing an absurd tensor.
fn malformed_frame(i: u64, junk: &mut Junk) -> Vec<u8> {
    let prefixed = |len: u32, body: Vec<u8>| {
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    };
    match i % 7 {
        0 => {
            let n = 1 + junk.below(64) as usize;
            junk.bytes(n)
        }
        1 => prefixed(u32::MAX - junk.below(1000) as u32, junk.bytes(16)),
        2 => prefixed((1 << 20) + 1 + junk.below(1 << 20) as u32, junk.bytes(8)),
        3 => {
            let n = 1 + junk.below(200) as usize;
            prefixed(n as u32, junk.bytes(n))
        }
        4 => {
            // Truncated: announces more than it sends, then the stream ends.
            let n = 64 + junk.below(4096) as usize;
            prefixed(n as u32, junk.bytes(n / 2))
        }
        5 => {
            let header = AnswerHeader {
                experiment: junk.below(4),
                round: junk.below(10) as u32,
                phase: Phase::Train,
                weight: 100,
                aux: vec![0.5],
                tensor: TensorMeta {
                    dtype: DType::F64,
                    len: 9,
                },
            };
            let mut out = encode_frame(&Upload::Answer(header)).expect("encode header");
            out.extend_from_slice(&junk.bytes(72));
            out
        }
        _ => {
            let header = AnswerHeader {
                experiment: 1,
                round: 1,
                phase: Phase::Train,
                weight: u64::MAX,
                aux: vec![f64::NAN; 3],
                tensor: TensorMeta {
                    dtype: DType::F32,
                    len: u64::MAX,
                },
            };
            encode_frame(&Upload::Answer(header)).expect("encode header")
        }
    }
}

fn load_identity(pki: &Path, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_file_iter(pki.join(format!("{name}.pem")))
        .expect("cert file")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join(format!("{name}.key"))).expect("key");
    (chain, key)
}

/// A client endpoint on loopback address 127.0.0.`host`: each attacker gets its own source
/// address, as in the field, so the coordinator's per-address limits bear on it and not on the
/// legitimate nodes and CLI (127.0.0.1).
fn client_endpoint(cfg: quinn::ClientConfig, host: u8) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, host], 0))).expect("endpoint");
    endpoint.set_default_client_config(cfg);
    endpoint
}

/// One connection attempt with a bad certificate; true when the coordinator served a request.
async fn bad_cert_attempt(endpoint: &quinn::Endpoint, addr: SocketAddr) -> bool {
    let attempt = async {
        let conn = endpoint.connect(addr, "localhost").ok()?.await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        write_frame(
            &mut send,
            &fedstat_proto::wire::Request::Hello {
                protocol: PROTOCOL_VERSION,
            },
        )
        .await
        .ok()?;
        let _ = send.finish();
        read_frame::<Response>(&mut recv, "response").await.ok()?
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(_))
    )
}

async fn bad_certificates(
    addr: SocketAddr,
    no_cert: quinn::ClientConfig,
    other_ca: quinn::ClientConfig,
    f: Arc<Figures>,
) {
    let endpoints = [client_endpoint(no_cert, 2), client_endpoint(other_ca, 3)];
    let gate = Arc::new(Semaphore::new(50));
    let mut tasks = Vec::new();
    for i in 0..BAD_CERT_ATTEMPTS {
        let permit = gate.clone().acquire_owned().await.expect("gate");
        let endpoint = endpoints[(i % 2) as usize].clone();
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            f.bad_cert_attempts.fetch_add(1, Ordering::Relaxed);
            if bad_cert_attempt(&endpoint, addr).await {
                f.bad_cert_served.fetch_add(1, Ordering::Relaxed);
            } else {
                f.bad_cert_refused.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Valid node certificate, garbage instead of a hello: the coordinator must close.
async fn bad_hellos(addr: SocketAddr, cfg: quinn::ClientConfig, f: Arc<Figures>) {
    let endpoint = client_endpoint(cfg, 4);
    let mut junk = Junk(0x5eed_0001);
    for i in 0..BAD_HELLOS {
        let frame = malformed_frame(i, &mut junk);
        // Refused outright (this certificate's connection cap, while earlier garbage
        // connections are still being torn down) counts as closed too: never welcomed.
        let closed = async {
            let Ok(connecting) = endpoint.connect(addr, "localhost") else {
                return true;
            };
            let Ok(conn) = connecting.await else { return true };
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return true;
            };
            if send.write_all(&frame).await.is_err() {
                return true;
            }
            let _ = send.finish();
            // Either the stream or the connection ends: nothing is ever answered.
            let answer = read_frame::<CoordMsg>(&mut recv, "answer").await;
            !matches!(answer, Ok(Some(CoordMsg::Welcome { .. })))
        };
        f.bad_hellos.fetch_add(1, Ordering::Relaxed);
        if let Ok(true) = tokio::time::timeout(Duration::from_secs(12), closed).await {
            f.bad_hellos_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A node that says a valid hello (offering a dataset no experiment uses), then opens
/// thousands of update streams carrying malformed frames, some of which stall half-way.
async fn node_flood(addr: SocketAddr, cfg: quinn::ClientConfig, f: Arc<Figures>) {
    let endpoint = client_endpoint(cfg, 5);
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("flooder handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let hello = NodeMsg::Hello {
        protocol: PROTOCOL_VERSION,
        software: "load test".into(),
        datasets: vec!["nothing-here".into()],
    };
    write_frame(&mut send, &hello).await.expect("hello");
    let welcome = read_frame::<CoordMsg>(&mut recv, "welcome")
        .await
        .expect("welcome");
    assert!(matches!(welcome, Some(CoordMsg::Welcome { .. })), "{welcome:?}");
    let reader =
        tokio::spawn(async move { while let Ok(Some(_)) = read_frame::<CoordMsg>(&mut recv, "c").await {} });

    let mut junk = Junk(0x5eed_0002);
    let mut stalled = Vec::new();
    let gate = Arc::new(Semaphore::new(FLOOD_IN_FLIGHT));
    let mut tasks = Vec::new();
    for i in 0..NODE_STREAM_FRAMES {
        if i % 10 == 0 {
            // Heartbeats keep the session alive through the flood.
            let _ = write_frame(&mut send, &NodeMsg::Heartbeat).await;
        }
        if i % 150 == 75 && (stalled.len() as u64) < STALLED_STREAMS {
            let Ok(mut s) = conn.open_uni().await else { break };
            // All but the last byte of a maximal frame: the coordinator holds the whole buffer.
            let mut frame = (1u32 << 20).to_be_bytes().to_vec();
            frame.extend_from_slice(&junk.bytes((1 << 20) - 1));
            if s.write_all(&frame).await.is_err() {
                break;
            }
            f.node_frames.fetch_add(1, Ordering::Relaxed);
            stalled.push(s);
            continue;
        }
        let frame = malformed_frame(i, &mut junk);
        let permit = gate.clone().acquire_owned().await.expect("gate");
        let Ok(mut s) = conn.open_uni().await else { break };
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            if s.write_all(&frame).await.is_ok() {
                f.node_frames.fetch_add(1, Ordering::Relaxed);
            }
            let _ = s.finish();
            // Wait until the coordinator has read or refused it, so streams do not pile up.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.stopped()).await;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(stalled);
    conn.close(0u32.into(), b"done");
    reader.abort();
    endpoint.wait_idle().await;
}

/// A researcher sending malformed requests, one per stream; each must get an error back.
async fn request_flood(addr: SocketAddr, cfg: quinn::ClientConfig, f: Arc<Figures>) {
    let endpoint = client_endpoint(cfg, 6);
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("researcher handshake");
    let mut junk = Junk(0x5eed_0003);
    let gate = Arc::new(Semaphore::new(FLOOD_IN_FLIGHT));
    let mut tasks = Vec::new();
    for i in 0..REQUEST_FRAMES {
        // Skip the update-header shapes: as requests they are merely wrong, not malformed.
        let frame = malformed_frame(i % 5, &mut junk);
        let permit = gate.clone().acquire_owned().await.expect("gate");
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            break;
        };
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            if send.write_all(&frame).await.is_ok() {
                f.request_frames.fetch_add(1, Ordering::Relaxed);
            }
            let _ = send.finish();
            let answer = tokio::time::timeout(
                Duration::from_secs(12),
                read_frame::<Response>(&mut recv, "response"),
            )
            .await;
            if let Ok(Ok(Some(Response::Error { .. }))) = answer {
                f.request_errors_answered.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    conn.close(0u32.into(), b"done");
}

/// Junk datagrams, some shaped like QUIC long-header packets, in bursts.
async fn udp_flood(addr: SocketAddr, f: Arc<Figures>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp socket");
    let mut junk = Junk(0x5eed_0004);
    for i in 0..DATAGRAMS {
        let n = 1 + junk.below(1350) as usize;
        let mut d = junk.bytes(n);
        if i % 3 == 0 && n > 6 {
            // Long header, QUIC v1: an Initial the endpoint has to look at.
            d[0] = 0xc0 | (d[0] & 0x0f);
            d[1..5].copy_from_slice(&1u32.to_be_bytes());
        }
        if socket.send_to(&d, addr).await.is_ok() {
            f.datagrams.fetch_add(1, Ordering::Relaxed);
        }
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Peak and current resident memory of a process, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("memory field")
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn a_live_coordinator_shrugs_off_junk_while_an_experiment_runs() {
    let started = Instant::now();
    let regions = ["midwest", "south", "west"];
    let mut fed = Fed::start();
    for region in regions {
        fed.add_node(region, &[("cps1988", demo_data(region))]);
    }
    fed.wait_for_nodes(&regions);
    fed.issue("node", "flooder");
    fed.issue("node", "garbler");
    let other = fed.path("other-ca");
    for args in [
        &["pki", "init", "--dir"][..],
        &["pki", "issue", "--role", "node", "--name", "mallory", "--dir"][..],
    ] {
        let out = std::process::Command::new(bin("fedstat-coordinator"))
            .args(args)
            .arg(&other)
            .output()
            .expect("pki");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    let pki = fed.pki();
    let ca = pki.join("ca.pem");
    let tls = |name: &str| TlsFiles {
        ca_cert: ca.clone(),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}.key")),
    };
    let no_cert = raw_client(&ca, None);
    let other_ca = raw_client(&ca, Some(load_identity(&other, "mallory")));
    let flooder = client_config(&tls("flooder")).expect("flooder config");
    let garbler = client_config(&tls("garbler")).expect("garbler config");
    let alice = client_config(&tls("alice")).expect("researcher config");
    let addr: SocketAddr = fed.addr.parse().expect("coordinator address");

    let pid = fed.coordinator.child.id();
    let (hwm_before, rss_before) = memory_kib(pid);

    let figures = Arc::new(Figures::default());
    let f = figures.clone();
    let attack = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let t0 = Instant::now();
            let all = async {
                tokio::join!(
                    bad_certificates(addr, no_cert, other_ca, f.clone()),
                    bad_hellos(addr, garbler, f.clone()),
                    node_flood(addr, flooder, f.clone()),
                    request_flood(addr, alice, f.clone()),
                    udp_flood(addr, f.clone()),
                )
            };
            let finished = tokio::time::timeout(ATTACK_LIMIT, all).await.is_ok();
            (finished, t0.elapsed())
        })
    });

    // The experiment runs through the attack.
    let submitted = Instant::now();
    let id = fed.submit("load.toml", &logit_experiment(8, 3, ""));
    let s = fed.wait_finished(id, Duration::from_secs(90));
    let experiment_time = submitted.elapsed();
    let (attack_finished, attack_time) = attack.join().expect("attack thread");
    let (hwm_after, rss_after) = memory_kib(pid);

    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let f = &figures;
    eprintln!("load test figures:");
    eprintln!(
        "  bad-certificate connections: {} attempted, {} refused, {} served",
        get(&f.bad_cert_attempts),
        get(&f.bad_cert_refused),
        get(&f.bad_cert_served)
    );
    eprintln!(
        "  garbage hellos (valid node certificate): {} sent, {} closed without a welcome",
        get(&f.bad_hellos),
        get(&f.bad_hellos_closed)
    );
    eprintln!(
        "  malformed frames: {} on node update streams ({STALLED_STREAMS} stalled 1 byte short of 1 MiB)",
        get(&f.node_frames)
    );
    eprintln!(
        "  malformed requests: {} ({} answered with an error)",
        get(&f.request_frames),
        get(&f.request_errors_answered)
    );
    eprintln!("  junk UDP datagrams: {}", get(&f.datagrams));
    eprintln!(
        "  attack: {:.1} s ({}); experiment: {:.1} s, {}",
        attack_time.as_secs_f64(),
        if attack_finished {
            "all sent"
        } else {
            "cut at the time limit"
        },
        experiment_time.as_secs_f64(),
        s["state"]
    );
    eprintln!(
        "  coordinator memory: VmHWM {} -> {} MiB, VmRSS {} -> {} MiB (bound {MAX_HWM_MIB} MiB)",
        hwm_before / 1024,
        hwm_after / 1024,
        rss_before / 1024,
        rss_after / 1024
    );
    let audit = std::fs::read_to_string(fed.path("data/audit.jsonl")).unwrap_or_default();
    let refusals = audit
        .lines()
        .filter(|l| l.contains("\"connection_refused\""))
        .count();
    eprintln!(
        "  coordinator audit log: {} records, {refusals} connection refusals",
        audit.lines().count()
    );
    let log = fed.coordinator.log_text();
    eprintln!(
        "  refused before the handshake: {} (handshake cap), {} (connection limit)",
        log.matches("too many handshakes in progress").count(),
        log.matches("connection limit reached").count()
    );
    eprintln!("  whole test: {:.1} s", started.elapsed().as_secs_f64());

    assert_eq!(s["state"], "Completed", "{s:#}");
    let history = s["history"].as_array().expect("history");
    assert_eq!(history.len(), 8, "{s:#}");
    for round in history {
        let mut who: Vec<&str> = round["participants"]
            .as_array()
            .expect("participants")
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        who.sort_unstable();
        assert_eq!(who, regions, "round {}: {s:#}", round["round"]);
    }
    assert!(fed.coordinator.is_running(), "the coordinator died");
    assert!(
        hwm_after < MAX_HWM_MIB * 1024,
        "coordinator peak memory {hwm_after} KiB"
    );
    assert_eq!(
        get(&f.bad_cert_served),
        0,
        "a connection without a valid certificate was served"
    );
    assert_eq!(get(&f.bad_cert_attempts), BAD_CERT_ATTEMPTS);
    assert_eq!(
        get(&f.bad_hellos_closed),
        BAD_HELLOS,
        "a garbage hello was welcomed or left hanging"
    );
    assert!(
        get(&f.node_frames) >= NODE_STREAM_FRAMES * 9 / 10,
        "the flood was cut short"
    );
    assert!(
        attack_finished,
        "the attack did not finish within {ATTACK_LIMIT:?}"
    );
    assert!(!log.contains("panicked"), "the coordinator panicked:\n{log}");
    for (name, node) in &fed.nodes {
        assert!(!node.log_text().contains("panicked"), "node {name} panicked");
    }
}
