//! The researcher's side of the protocol: one connection (QUIC, or TLS-over-TCP where UDP is
//! blocked; see `fedstat_net::dial`) with a researcher (or admin) certificate, one
//! bidirectional stream per request.

use std::net::SocketAddr;
use std::time::Duration;

use fedstat_net::dial::Dialer;
use fedstat_net::identity::Role;
use fedstat_net::session::{close, Connection, RecvStream};
use fedstat_net::transport::{read_frame, read_tensor, write_frame};
use fedstat_proto::wire::{
    ExperimentId, ExperimentStatus, NodeInfo, Request, Response, ResultsHeader, PROTOCOL_VERSION,
};

use crate::config::ResearcherConfig;
use crate::{Error, Result};

/// How long one request may take (results of a 100M-parameter model included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A connected researcher.
pub struct Client {
    conn: Connection,
    /// Name and role the coordinator read from our certificate.
    pub name: String,
    pub role: Role,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish()
    }
}

impl Client {
    pub async fn connect(cfg: &ResearcherConfig) -> Result<Self> {
        let fail = |problem: String| Error::Connect {
            addr: cfg.coordinator.clone(),
            problem,
        };
        let addr: SocketAddr = tokio::net::lookup_host(&cfg.coordinator)
            .await
            .map_err(|e| fail(format!("cannot resolve the address: {e}")))?
            .next()
            .ok_or_else(|| fail("the address resolves to nothing".into()))?;
        let dialer = Dialer::new(&cfg.tls, cfg.crl.as_deref(), cfg.transport, &cfg.server_name)?;
        let conn = dialer.dial(addr).await.map_err(|e| match e {
            fedstat_net::Error::Connection(p) => {
                fail(format!("{p} (is our certificate issued by the federation's CA?)"))
            }
            other => other.into(),
        })?;
        let mut client = Client {
            conn,
            name: String::new(),
            role: Role::Researcher,
        };
        // With TLS 1.3 the server checks our certificate after we consider the handshake done,
        // so a refusal shows up on the first request.
        let hello = client
            .call(Request::Hello {
                protocol: PROTOCOL_VERSION,
            })
            .await
            .map_err(|e| {
                fail(format!(
                    "{e} (is our certificate issued by the federation's CA, and valid?)"
                ))
            })?;
        match hello {
            Response::Welcome { name, role, .. } => {
                client.name = name;
                client.role = role;
                Ok(client)
            }
            other => Err(Error::Protocol(format!("expected a welcome, got {other:?}"))),
        }
    }

    async fn open(&self, req: &Request) -> Result<(RecvStream, Response)> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| Error::Protocol(format!("cannot open a stream: {e}")))?;
        write_frame(&mut send, req).await?;
        let _ = send.finish().await;
        let response = read_frame::<Response>(&mut recv, "response")
            .await?
            .ok_or_else(|| Error::Protocol("the coordinator closed the stream without answering".into()))?;
        match response {
            Response::Error { message } => Err(Error::Refused(message)),
            r => Ok((recv, r)),
        }
    }

    /// Send one request and return its response; an error response becomes [`Error::Refused`].
    pub async fn call(&self, req: Request) -> Result<Response> {
        let (_, response) = tokio::time::timeout(REQUEST_TIMEOUT, self.open(&req))
            .await
            .map_err(|_| Error::Protocol("request timed out".into()))??;
        Ok(response)
    }

    pub async fn submit(&self, spec: fedstat_core::spec::ExperimentSpec) -> Result<ExperimentId> {
        match self.call(Request::Submit { spec: Box::new(spec) }).await? {
            Response::Submitted { experiment } => Ok(experiment),
            other => Err(unexpected(other)),
        }
    }

    /// One experiment's status, or every experiment we may see: the list comes in pages (a
    /// frame has a size limit), fetched here one after the other.
    pub async fn status(&self, experiment: Option<ExperimentId>) -> Result<Vec<ExperimentStatus>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (experiments, next) = match self.call(Request::Status { experiment, after }).await? {
                Response::Status { experiments, next } => (experiments, next),
                other => return Err(unexpected(other)),
            };
            all.extend(experiments);
            match next {
                None => return Ok(all),
                // Pages go up in id order; one that does not would have us ask for ever.
                Some(n) if experiment.is_none() && after.is_none_or(|a| n > a) => after = Some(n),
                Some(n) => {
                    return Err(Error::Protocol(format!(
                        "the coordinator's status pages do not advance (next page after {n})"
                    )))
                }
            }
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        match self.call(Request::Nodes).await? {
            Response::Nodes { nodes } => Ok(nodes),
            other => Err(unexpected(other)),
        }
    }

    /// The global model of an experiment after `round` (default: the latest), with its metadata.
    pub async fn results(
        &self,
        experiment: ExperimentId,
        round: Option<u32>,
    ) -> Result<(ResultsHeader, Vec<f64>)> {
        let fetch = async {
            let (mut recv, response) = self.open(&Request::Results { experiment, round }).await?;
            let Response::Results(header) = response else {
                return Err(unexpected(response));
            };
            let values = read_tensor(&mut recv, header.tensor, fedstat_core::spec::MAX_PARAMS).await?;
            Ok((*header, values.to_f64()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fetch)
            .await
            .map_err(|_| Error::Protocol("request timed out".into()))?
    }

    /// Close the connection politely.
    pub async fn close(self) {
        self.conn.close_and_wait(close::SHUTDOWN, b"bye").await;
    }
}

fn unexpected(r: Response) -> Error {
    Error::Protocol(format!("unexpected response {r:?}"))
}
