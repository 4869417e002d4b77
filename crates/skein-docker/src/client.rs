//! The Docker Engine API over its unix socket: HTTP/1.1, one connection
//! per request (the engine closes idle ones), JSON bodies; the event
//! stream is newline-separated JSON objects in a chunked body.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// API version asked for: Docker 20.10 speaks 1.41, and newer engines
/// still answer it.
const API: &str = "/v1.41";
/// A request's answer, not an event stream's life.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bigger answers are refused (a host with very many containers is still
/// far below).
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct Docker {
    socket: PathBuf,
}

/// One event of the engine about a container.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Event {
    #[serde(default, rename = "Type")]
    pub kind: String,
    #[serde(default, rename = "Action")]
    pub action: String,
    #[serde(default, rename = "Actor")]
    pub actor: Actor,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Actor {
    #[serde(default, rename = "ID")]
    pub id: String,
    #[serde(default, rename = "Attributes")]
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// A summary row of `GET /containers/json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Summary {
    #[serde(rename = "Id")]
    pub id: String,
}

/// The event stream, read as it comes.
pub struct Events {
    body: Incoming,
    pending: Vec<u8>,
}

impl Events {
    /// The next event; `None` when the engine ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return match serde_json::from_slice(line) {
                    Ok(e) => Ok(Some(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable Docker event skipped");
                        continue;
                    }
                };
            }
            if self.pending.len() > MAX_BODY {
                bail!("a Docker event longer than {MAX_BODY} bytes");
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame.context("Docker event stream")?.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

impl Docker {
    pub fn new(socket: &Path) -> Docker {
        Docker {
            socket: socket.to_path_buf(),
        }
    }

    async fn request(&self, path: &str) -> anyhow::Result<hyper::Response<Incoming>> {
        self.send(hyper::Method::GET, path, None).await
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot reach Docker at {}", self.socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("Docker: HTTP handshake")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Docker connection ended");
            }
        });
        let body = match json {
            Some(v) => Bytes::from(serde_json::to_vec(v).context("Docker request body")?),
            None => Bytes::new(),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header("Host", "docker")
            .header("Accept", "application/json")
            .header("Content-Type", "application/json")
            .body(Full::new(body))
            .context("Docker request")?;
        tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req))
            .await
            .context("Docker did not answer in time")?
            .context("Docker request failed")
    }

    /// A request and its whole answer: status and body (bounded, timed).
    async fn answer(
        &self,
        method: hyper::Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
        let resp = self.send(method, path, json).await?;
        let status = resp.status();
        let body = tokio::time::timeout(
            ANSWER_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        .context("Docker's answer did not arrive in time")?
        .map_err(|e| anyhow::anyhow!("Docker's answer: {e}"))?
        .to_bytes();
        Ok((status, body))
    }

    /// `POST` (with a JSON body) or `DELETE`; the answer's status and body.
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<(hyper::StatusCode, String)> {
        let (status, body) = self.answer(method, path, json).await?;
        Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
    }

    /// `GET <path>` as JSON; `Ok(None)` on 404.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> anyhow::Result<Option<T>> {
        let (status, body) = self.answer(hyper::Method::GET, path, None).await?;
        if status == hyper::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            bail!(
                "Docker answered {status} to GET {path}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(Some(serde_json::from_slice(&body).with_context(|| {
            format!("Docker's answer to GET {path}")
        })?))
    }

    /// The ids of the running containers.
    pub async fn running(&self) -> anyhow::Result<Vec<String>> {
        let rows: Vec<Summary> = self.get("/containers/json").await?.unwrap_or_default();
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// A container's description; `None` when it is gone.
    pub async fn inspect(&self, id: &str) -> anyhow::Result<Option<crate::mapping::Container>> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            bail!("not a container id: {id:?}");
        }
        self.get(&format!("/containers/{id}/json")).await
    }

    /// The container events from now on.
    pub async fn events(&self) -> anyhow::Result<Events> {
        // filters={"type":["container","network"]}
        let resp = self
            .request("/events?filters=%7B%22type%22%3A%5B%22container%22%2C%22network%22%5D%7D")
            .await?;
        if !resp.status().is_success() {
            bail!("Docker answered {} to GET /events", resp.status());
        }
        Ok(Events {
            body: resp.into_body(),
            pending: Vec::new(),
        })
    }
}
