//! Tasks: what runs where. A task is registered on the agent of the node it
//! runs on and is single-writer data of that node, shaped like a Marathon
//! port mapping so that DC/OS users can bring their labels unchanged.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::labels::Labels;

/// Upper bounds keep one node's keyspace (and so every gossip message about
/// it) small, whatever a client sends.
pub const MAX_TASK_ID_LEN: usize = 128;
pub const MAX_APP_LEN: usize = 255;
pub const MAX_PORTS: usize = 64;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_LEN: usize = 255;
/// The app's own labels (Marathon's app-level `labels`, where
/// `HAPROXY_{n}_*` and `DCOS_SERVICE_*` live) are more and longer than a
/// port's: 39 HAProxy labels exist, and a value may be a path or a list of
/// virtual hosts.
pub const MAX_APP_LABELS: usize = 128;
pub const MAX_APP_LABEL_VALUE_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

fn default_framework() -> String {
    "marathon".to_string()
}

/// One port of a task, as Marathon writes a port mapping.
///
/// Task types read unknown fields tolerantly (ignored) so that a task a
/// newer agent gossips with fields this version does not know is kept, not
/// discarded, during a rolling upgrade; what a client sends is read
/// strictly by [`parse_task_body`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// `VIP_n` labels live here, e.g. `"VIP_0": "/httpi:3141"`.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

/// The body of `PUT /v1/tasks/{task-id}` (read with [`parse_task_body`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Marathon app id, e.g. `/httpi` or `/group/app`.
    pub app: String,
    #[serde(default = "default_framework")]
    pub framework: String,
    /// The address the task's ports are reachable on.
    pub ip: IpAddr,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Checked by the agent of the node the task runs on; an unhealthy
    /// task's ports get no new connections through VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// The app's labels as Marathon has them (`HAPROXY_GROUP`,
    /// `HAPROXY_0_VHOST`, ...): `HAPROXY_{n}_*` refer to `ports[n]`.
    /// Agents before this field existed ignore it (they read peers'
    /// tasks tolerantly), so a task carrying it survives a rolling upgrade.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProtocol {
    Tcp,
    Http,
}

fn default_path() -> String {
    "/".to_string()
}
fn default_interval() -> u32 {
    2
}
fn default_timeout() -> u32 {
    1
}
fn default_unhealthy_after() -> u32 {
    2
}

/// `{"protocol":"tcp"|"http","path":"/","interval_s":2,"timeout_s":1,"unhealthy_after":2}`,
/// probing the task's first port (or `port_index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub protocol: HealthProtocol,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default)]
    pub port_index: usize,
    #[serde(default = "default_interval")]
    pub interval_s: u32,
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
    /// Consecutive failures before the task is unhealthy (one success
    /// makes it healthy again).
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("task id must be 1 to {MAX_TASK_ID_LEN} characters of [A-Za-z0-9._-], got {0:?}")]
    BadId(String),
    #[error("app must be 1 to {MAX_APP_LEN} printable characters")]
    BadApp,
    #[error("framework must be 1 to 63 characters of [a-z0-9-]")]
    BadFramework,
    #[error("at most {MAX_PORTS} ports per task")]
    TooManyPorts,
    #[error("port {index}: port number must be 1..=65535")]
    PortZero { index: usize },
    #[error("port {index}: at most {MAX_LABELS} labels, each key and value at most {MAX_LABEL_LEN} characters")]
    BadLabels { index: usize },
    #[error("port {index}: name must be at most 63 characters")]
    BadPortName { index: usize },
    #[error("labels: at most {MAX_APP_LABELS}, each key 1 to {MAX_LABEL_LEN} characters of [A-Za-z0-9_.-] and each value at most {MAX_APP_LABEL_VALUE_LEN} characters without control characters")]
    BadAppLabels,
    #[error("health_check: {0}")]
    BadHealthCheck(&'static str),
}

pub fn validate_task_id(id: &str) -> Result<(), TaskError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TaskError::BadId(
            id.chars().take(MAX_TASK_ID_LEN + 1).collect(),
        ))
    }
}

impl TaskSpec {
    /// Checks what serde cannot: lengths, ranges and character sets. A task
    /// that passes is safe to gossip and to turn into DNS names and rules.
    pub fn validate(&self) -> Result<(), TaskError> {
        if self.app.is_empty()
            || self.app.len() > MAX_APP_LEN
            || self.app.chars().any(|c| c.is_control())
        {
            return Err(TaskError::BadApp);
        }
        let framework_ok = !self.framework.is_empty()
            && self.framework.len() <= 63
            && self
                .framework
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !framework_ok {
            return Err(TaskError::BadFramework);
        }
        if self.ports.len() > MAX_PORTS {
            return Err(TaskError::TooManyPorts);
        }
        for (index, port) in self.ports.iter().enumerate() {
            if port.port == 0 {
                return Err(TaskError::PortZero { index });
            }
            if port.name.as_ref().is_some_and(|n| n.len() > 63) {
                return Err(TaskError::BadPortName { index });
            }
            let labels_ok = port.labels.len() <= MAX_LABELS
                && port
                    .labels
                    .iter()
                    .all(|(k, v)| k.len() <= MAX_LABEL_LEN && v.len() <= MAX_LABEL_LEN);
            if !labels_ok {
                return Err(TaskError::BadLabels { index });
            }
        }
        let app_labels_ok = self.labels.len() <= MAX_APP_LABELS
            && self.labels.iter().all(|(k, v)| {
                !k.is_empty()
                    && k.len() <= MAX_LABEL_LEN
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                    && v.len() <= MAX_APP_LABEL_VALUE_LEN
                    && !v.chars().any(|c| c.is_control())
            });
        if !app_labels_ok {
            return Err(TaskError::BadAppLabels);
        }
        if let Some(hc) = &self.health_check {
            if hc.port_index >= self.ports.len() {
                return Err(TaskError::BadHealthCheck(
                    "port_index names no port of the task",
                ));
            }
            if !(1..=3600).contains(&hc.interval_s) || !(1..=60).contains(&hc.timeout_s) {
                return Err(TaskError::BadHealthCheck(
                    "interval_s must be 1..=3600 and timeout_s 1..=60",
                ));
            }
            if !(1..=100).contains(&hc.unhealthy_after) {
                return Err(TaskError::BadHealthCheck("unhealthy_after must be 1..=100"));
            }
            if !hc.path.starts_with('/')
                || hc.path.len() > 1024
                || hc.path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(TaskError::BadHealthCheck(
                    "path must start with / and hold no spaces or control characters",
                ));
            }
        }
        Ok(())
    }
}

/// A task body from a client (`PUT /v1/tasks/{id}`, the CLI): any field
/// this version does not know is an error that names it (most likely a
/// typo, which would otherwise be dropped silently). What peers gossip is
/// read with plain serde, tolerating fields a newer version added.
pub fn parse_task_body(body: &[u8]) -> Result<TaskSpec, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut unknown = Vec::new();
    let spec: TaskSpec = serde_ignored::deserialize(&mut de, |path| {
        // serde_ignored writes an Option's inside as `?`: not a field.
        unknown.push(format!("`{}`", path.to_string().replace(".?", "")));
    })
    .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    match unknown.len() {
        0 => Ok(spec),
        1 => Err(format!("unknown field {}", unknown[0])),
        _ => Err(format!("unknown fields {}", unknown.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<TaskSpec, String> {
        let spec = parse_task_body(body.as_bytes())?;
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    #[test]
    fn marathon_shaped_body_parses_with_defaults() {
        let spec = parse(
            r#"{"app":"/httpi","ip":"10.0.0.2","ports":[{"name":"http","port":9896,"labels":{"VIP_0":"/httpi:3141"}}]}"#,
        )
        .expect("valid");
        assert_eq!(spec.framework, "marathon");
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp);
        assert_eq!(&spec.ports[0].labels["VIP_0"], "/httpi:3141");
    }

    #[test]
    fn app_labels_are_kept_and_checked() {
        let spec = parse(
            r#"{"app":"/web","ip":"10.0.0.3","ports":[{"port":80}],
                "labels":{"HAPROXY_GROUP":"external","HAPROXY_0_VHOST":"web.example.com"}}"#,
        )
        .expect("valid");
        assert_eq!(spec.labels.get("HAPROXY_0_VHOST"), Some("web.example.com"));
        let text = serde_json::to_string(&spec).expect("serializable");
        assert!(text.contains(r#""labels":{"HAPROXY_0_VHOST""#), "{text}");
        // Without labels the field is not written (older agents' bytes).
        let bare = parse(r#"{"app":"/web","ip":"10.0.0.3"}"#).expect("valid");
        assert!(!serde_json::to_string(&bare)
            .expect("ser")
            .contains("labels"));
        for bad in [
            r#"{"app":"/w","ip":"10.0.0.3","labels":{"":"x"}}"#,
            r#"{"app":"/w","ip":"10.0.0.3","labels":{"A B":"x"}}"#,
            r#"{"app":"/w","ip":"10.0.0.3","labels":{"A":"x\ny"}}"#,
        ] {
            assert!(parse(bad).expect_err(bad).contains("labels"), "{bad}");
        }
        let long = format!(
            r#"{{"app":"/w","ip":"10.0.0.3","labels":{{"A":"{}"}}}}"#,
            "x".repeat(MAX_APP_LABEL_VALUE_LEN + 1)
        );
        assert!(parse(&long).is_err());
    }

    #[test]
    fn a_client_gets_unknown_fields_named_and_a_peer_has_them_ignored() {
        let body = r#"{"app":"/a","ip":"10.0.0.3","owner":"ops",
            "ports":[{"port":80,"weight":3}],"health_check":{"protocol":"tcp","grace_s":5}}"#;
        assert_eq!(
            parse_task_body(body.as_bytes()).expect_err("strict"),
            "unknown fields `owner`, `ports.0.weight`, `health_check.grace_s`"
        );
        // Gossiped by a newer agent: kept, the unknown fields ignored.
        let spec: TaskSpec = serde_json::from_str(body).expect("tolerant");
        spec.validate().expect("valid");
        assert_eq!(spec.ports[0].port, 80);
        // Trailing garbage is an error, as with serde_json::from_slice.
        assert!(parse_task_body(br#"{"app":"/a","ip":"10.0.0.3"} x"#).is_err());
    }

    #[test]
    fn bad_bodies_are_rejected_with_a_reason() {
        for (body, needle) in [
            (r#"{"app":"/a","ip":"10.0.0.300"}"#, "invalid IP"),
            (
                r#"{"app":"/a","ip":"10.0.0.3","ports":[{"port":70000}]}"#,
                "invalid value",
            ),
            (
                r#"{"app":"/a","ip":"10.0.0.3","ports":[{"port":0}]}"#,
                "1..=65535",
            ),
            (r#"{"app":"","ip":"10.0.0.3"}"#, "app must be"),
            (
                r#"{"app":"/a","ip":"10.0.0.3","prots":[]}"#,
                "unknown field",
            ),
            (
                r#"{"app":"/a","ip":"10.0.0.3","framework":"Bad Name"}"#,
                "framework",
            ),
            (r#"{"ip":"10.0.0.3"}"#, "missing field `app`"),
            (
                r#"{"app":"/a","ip":"10.0.0.3","ports":[{"port":1,"protocol":"sctp"}]}"#,
                "unknown variant",
            ),
        ] {
            let err = parse(body).expect_err(body);
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn task_ids() {
        assert!(validate_task_id("httpi.1a2b-3_c").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129), "ü"] {
            assert!(validate_task_id(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Any body a client sends is parsed and validated or rejected with
        /// an error; nothing panics.
        #[test]
        fn arbitrary_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(spec) = serde_json::from_slice::<TaskSpec>(&bytes) {
                let _ = spec.validate();
            }
        }

        #[test]
        fn json_shaped_bodies_never_panic(
            app in ".{0,300}",
            framework in "[a-zA-Z0-9 _-]{0,70}",
            port in any::<u32>(),
            label in ".{0,300}",
        ) {
            let body = serde_json::json!({
                "app": app, "framework": framework, "ip": "10.0.0.1",
                "ports": [{"port": port, "labels": {"VIP_0": label}}],
            });
            if let Ok(spec) = serde_json::from_value::<TaskSpec>(body) {
                if spec.validate().is_ok() {
                    // What validates is safe to store and read back.
                    let text = serde_json::to_string(&spec).expect("serializable");
                    prop_assert_eq!(serde_json::from_str::<TaskSpec>(&text).ok(), Some(spec));
                }
            }
        }
    }
}
