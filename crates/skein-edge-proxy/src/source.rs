//! Where route sets come from: the local agent's long poll, or a file.
//!
//! Either way a route set that cannot be read is rejected whole and the
//! routes in use stay (Marathon-LB's one bad config stopped every update;
//! here it stops only itself, and the next good one applies). When the
//! agent is away the last routes keep serving; the outage is logged once.

use std::sync::Arc;
use std::time::Duration;

use skein_edge::Routes;

use crate::state::Changes;
use crate::{client, EdgeDoc, RouteSource, Shared};

/// The agent answers a long poll within 25 s; give it some slack.
const POLL_TIMEOUT_S: u64 = 25;
const MAX_DOC_BYTES: usize = 64 << 20;
const FILE_POLL: Duration = Duration::from_millis(50);

/// Reads a route document: `{"version", "routes"}` or bare `Routes`, and
/// checks that every HTTP route names a backend it has.
pub(crate) fn parse(bytes: &[u8]) -> Result<(Option<u64>, Routes), String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let (version, routes) = if value.get("routes").is_some() {
        let doc: EdgeDoc =
            serde_json::from_value(value).map_err(|e| format!("not an edge document: {e}"))?;
        (Some(doc.version), doc.routes)
    } else {
        let routes: Routes =
            serde_json::from_value(value).map_err(|e| format!("not a route set: {e}"))?;
        (None, routes)
    };
    check(&routes)?;
    Ok((version, routes))
}

/// Every backend named once, and every HTTP route naming one of them.
fn check(routes: &Routes) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for b in &routes.backends {
        if !names.insert(&*b.name) {
            return Err(format!("backend {} appears twice", b.name));
        }
    }
    for r in &routes.http_routes {
        if !names.contains(&*r.backend) {
            return Err(format!(
                "an HTTP route names {}, which is no backend",
                r.backend
            ));
        }
    }
    Ok(())
}

/// Why an answer of the agent was not used.
#[derive(Debug)]
pub(crate) enum AnswerError {
    /// A delta this edge cannot apply (from a version it does not have,
    /// unreadable, or inconsistent once applied): fetch the whole.
    Delta(String),
    /// A whole document that does not read: rejected.
    Whole(String),
}

/// Reads the agent's answer: a whole document, or what changed since the
/// version this edge has (`last`), applied to it. The whole document is
/// read straight into routes (no intermediate JSON tree: 7 MB at 10,000
/// apps).
pub(crate) fn parse_answer(
    bytes: &[u8],
    last: Option<&(u64, Routes)>,
) -> Result<(u64, Routes, Option<Changes>), AnswerError> {
    // The agent writes `version` then `base` for a delta, `version` then
    // `routes` for a whole document.
    let head = &bytes[..bytes.len().min(64)];
    let is_delta = head.windows(7).any(|w| w == b"\"base\":");
    if !is_delta {
        let doc: EdgeDoc = serde_json::from_slice(bytes)
            .map_err(|e| AnswerError::Whole(format!("not an edge document: {e}")))?;
        check(&doc.routes).map_err(AnswerError::Whole)?;
        return Ok((doc.version, doc.routes, None));
    }
    let delta: skein_edge::EdgeDelta = serde_json::from_slice(bytes)
        .map_err(|e| AnswerError::Delta(format!("not an edge delta: {e}")))?;
    let Some((have, old)) = last.filter(|(v, _)| *v == delta.base) else {
        return Err(AnswerError::Delta(format!(
            "a delta from version {}, which this edge does not have",
            delta.base
        )));
    };
    tracing::debug!(
        base = have,
        version = delta.version,
        upsert = delta.upsert.len(),
        remove = delta.remove.len(),
        "route delta"
    );
    let changes = Changes::of(&delta);
    let version = delta.version;
    let routes = delta.apply(old).map_err(AnswerError::Delta)?;
    check(&routes).map_err(AnswerError::Delta)?;
    Ok((version, routes, Some(changes)))
}

pub(crate) async fn run(shared: Arc<Shared>) {
    match shared.cfg.source.clone() {
        RouteSource::Agent { url, token } => agent(shared, url, token).await,
        RouteSource::File(path) => file(shared, path).await,
    }
}

fn set_state(shared: &Shared, s: String) {
    *shared
        .source_state
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = s;
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~,".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn agent(shared: Arc<Shared>, url: String, token: Option<String>) {
    let groups = encode(&shared.cfg.groups.join(","));
    let mut have: Option<u64> = None;
    // The routes of `have`, to apply the agent's deltas to.
    let mut last: Option<(u64, Routes)> = None;
    let mut backoff = Duration::from_millis(250);
    let mut failing: Option<String> = None;
    loop {
        let path = match have {
            Some(v) => {
                // `base`: answered with what changed since, when the agent
                // still has it (an agent without deltas ignores it).
                let base = match &last {
                    Some((l, _)) if *l == v => format!("&base={v}"),
                    _ => String::new(),
                };
                format!(
                    "/v1/edge?groups={groups}&wait_version={v}&timeout_s={POLL_TIMEOUT_S}{base}"
                )
            }
            None => format!("/v1/edge?groups={groups}"),
        };
        let timeout = Duration::from_secs(POLL_TIMEOUT_S + 10);
        let asked = std::time::Instant::now();
        let got = tokio::select! {
            r = client::get(&url, &path, token.as_deref(), timeout, MAX_DOC_BYTES) => r,
            _ = shared.refetch.notified() => {
                have = None;
                continue;
            }
        };
        let problem = match got {
            Ok((status, body)) if status.is_success() => match parse_answer(&body, last.as_ref()) {
                Ok((version, routes, changes)) => {
                    // Kept (pointers: the backends are shared with the
                    // table) for the next delta.
                    last = Some((version, routes.clone()));
                    if failing.take().is_some() {
                        tracing::info!(%url, "agent reachable again");
                    }
                    backoff = Duration::from_millis(250);
                    set_state(&shared, format!("agent {url}: version {version}"));
                    let unchanged = have == Some(version);
                    if !unchanged || shared.table.load().version != version {
                        shared.apply_changes(version, routes, changes).await;
                    }
                    have = Some(version);
                    if unchanged && asked.elapsed() < Duration::from_millis(50) {
                        // An agent that does not hold the poll: do not spin.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shared.refetch.notified() => { have = None; }
                        }
                    }
                    continue;
                }
                Err(AnswerError::Delta(e)) => {
                    // A delta that does not fit what this edge has: ask for
                    // the whole document at once.
                    tracing::warn!(%url, error = %e, "route delta not applicable; fetching the whole route set");
                    have = None;
                    last = None;
                    continue;
                }
                Err(AnswerError::Whole(e)) => {
                    shared.reject(format!("agent {url}: {e}"));
                    format!("bad document: {e}")
                }
            },
            Ok((status, _)) if status == http::StatusCode::NOT_FOUND => {
                "the agent has no /v1/edge endpoint (an older agent?)".to_string()
            }
            Ok((status, body)) => format!(
                "{status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
            Err(e) => format!("{e:#}"),
        };
        if failing.as_deref() != Some(problem.as_str()) {
            tracing::warn!(%url, %problem, "cannot get routes from the agent; the last routes stay; retrying");
            failing = Some(problem.clone());
        }
        set_state(&shared, format!("agent {url}: {problem}"));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.refetch.notified() => { have = None; }
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Follows a routes file: re-read every 50 ms (or on a HUP), applied when
/// its bytes change. A file that does not read must read the same at two
/// polls in a row before it is rejected, so a writer caught mid-write (one
/// not renaming into place) costs 50 ms, not a rejection.
async fn file(shared: Arc<Shared>, path: std::path::PathBuf) {
    let mut last: Option<Vec<u8>> = None;
    let mut counter: u64 = 0;
    let mut missing_logged = false;
    let mut unreadable: Option<Vec<u8>> = None;
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(FILE_POLL) => false,
            _ = shared.refetch.notified() => true,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if !missing_logged {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the routes file; the last routes stay");
                    set_state(&shared, format!("file {}: {e}", path.display()));
                    missing_logged = true;
                }
                continue;
            }
        };
        missing_logged = false;
        if !forced && last.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        let parsed = parse(&bytes);
        if parsed.is_err() && !forced && unreadable.as_deref() != Some(bytes.as_slice()) {
            // Perhaps caught half written: rejected only if it reads the
            // same at the next poll.
            unreadable = Some(bytes);
            continue;
        }
        unreadable = None;
        last = Some(bytes);
        match parsed {
            Ok((version, routes)) => {
                counter += 1;
                let version = version.unwrap_or(counter);
                set_state(
                    &shared,
                    format!("file {}: version {version}", path.display()),
                );
                shared.apply(version, routes).await;
            }
            Err(e) => {
                set_state(&shared, format!("file {}: rejected: {e}", path.display()));
                shared.reject(format!("{}: {e}", path.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_document_shapes_read() {
        let routes = Routes::default();
        let bare = serde_json::to_vec(&routes).unwrap();
        assert_eq!(parse(&bare).unwrap(), (None, routes.clone()));
        let doc = serde_json::to_vec(&EdgeDoc {
            version: 7,
            routes: routes.clone(),
        })
        .unwrap();
        assert_eq!(parse(&doc).unwrap(), (Some(7), routes));
        assert!(parse(b"{\"backends\": 3}").is_err());
        assert!(parse(b"not json").is_err());
        let dangling = br#"{"backends": [], "http_routes": [{"backend": "x"}], "problems": []}"#;
        assert!(parse(dangling).unwrap_err().contains("no backend"));
    }

    #[test]
    fn groups_are_query_encoded() {
        assert_eq!(encode("external,internal"), "external,internal");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
