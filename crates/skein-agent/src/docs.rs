//! Every document the HTTP API returns, as plain serde types shared by the
//! server (`skein-api` serializes them) and the CLI (`skein` deserializes
//! them and prints its tables).
//!
//! | endpoint | document |
//! |---|---|
//! | `GET /v1/version` | [`Version`] |
//! | `GET /v1/nodes` | [`Nodes`] |
//! | `GET /v1/tasks` | [`Tasks`] |
//! | `GET /v1/tasks/{id}` | [`TaskView`] |
//! | `PUT /v1/tasks/{id}` | [`PutTaskReply`] (body: [`skein_state::TaskSpec`]) |
//! | `GET /v1/state` | [`State`] |
//! | `GET /v1/vips` | [`Vips`] |
//! | `GET /v1/vips/problems` | [`VipProblems`] |
//! | `GET /overlay-master/state` | [`OverlayMasterState`] |
//! | `GET /overlay-agent/overlay` | [`OverlayAgent`] |
//! | `POST /overlay-master/agents/delete` | [`DeleteAgentsReply`] (body: [`DeleteAgentsRequest`]) |
//! | `GET /v1/records` | [`Records`] |
//! | `GET /v1/enumerate` | [`Enumerate`] |
//! | `GET /v1/config` | [`DnsConfig`] |
//! | `GET /v1/hosts/{host}` | [`Hosts`] |
//! | `GET /v1/services/{service}` | [`Services`] |
//! | any failure | [`ErrorBody`] |
//!
//! Wire compatibility: the documents that used to be built with
//! `serde_json::json!` came out with their keys sorted (serde_json's map is
//! a B-tree without its `preserve_order` feature). Their structs therefore
//! declare fields in byte-wise sorted order, so the bytes on the wire are
//! unchanged; `tests::fields_are_in_the_order_json_macro_wrote` checks it.
//! The row types that were already typed ([`NodeView`], [`TaskView`],
//! [`VipView`], [`VipProblem`]) keep their declaration order, as before.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
pub use skein_l4lb::VipProblem;
pub use skein_state::{BadEntry, NodeStatus, NodeView, TaskView};

pub use crate::view::{VipBackendView, VipView};

/// `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub cluster_id: String,
    pub node_id: String,
    pub version: String,
}

/// `GET /v1/nodes`.
pub type Nodes = Vec<NodeView>;

/// `GET /v1/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tasks {
    pub tasks: Vec<TaskView>,
    /// Published values that did not decode (a newer or broken peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<BadEntry>,
}

/// [`Tasks`] borrowed from a view: the same JSON without copying the
/// cluster's tasks per request.
#[derive(Debug, Serialize)]
pub struct TasksRef<'a> {
    pub tasks: &'a [TaskView],
    #[serde(skip_serializing_if = "<[BadEntry]>::is_empty")]
    pub invalid: &'a [BadEntry],
}

/// The reply to `PUT /v1/tasks/{id}` (201 created, 200 replaced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutTaskReply {
    pub id: String,
    pub node_id: String,
}

/// `GET /v1/state`: every node's published keyspace with versions, and this
/// node's view of their liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub cluster_id: String,
    pub node_id: String,
    pub nodes: BTreeMap<String, StateNode>,
    /// Removed nodes and the generation up to which they are removed.
    pub removed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateNode {
    pub generation: u64,
    pub keys: BTreeMap<String, StateKey>,
    pub max_version: u64,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateKey {
    pub deleted: bool,
    /// The value as JSON when it is JSON (every value skein writes but the
    /// overlay fingerprint and status), else as a string; `null` when
    /// deleted.
    pub value: Option<serde_json::Value>,
    pub version: u64,
}

/// `GET /v1/vips`.
pub type Vips = Vec<VipView>;

/// `GET /v1/vips/problems`: the labels or VIPs that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VipProblems(pub Vec<VipProblem>);

impl Serialize for VipProblems {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// `VipProblem` (skein-l4lb) only serializes; this reads it back.
#[derive(Deserialize)]
#[serde(remote = "VipProblem")]
struct VipProblemDef {
    task_id: String,
    node_id: String,
    label: String,
    error: String,
}

impl<'de> Deserialize<'de> for VipProblems {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Row(#[serde(with = "VipProblemDef")] VipProblem);
        let rows = Vec::<Row>::deserialize(d)?;
        Ok(VipProblems(rows.into_iter().map(|r| r.0).collect()))
    }
}

/// DC/OS's `GET /overlay-master/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayMasterState {
    pub agents: Vec<OverlayAgent>,
    pub network: OverlayNetwork,
}

/// One agent of [`OverlayMasterState`]; alone, `GET /overlay-agent/overlay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayAgent {
    pub ip: IpAddr,
    pub node_id: String,
    pub overlays: Vec<AgentOverlay>,
    pub state: OverlayState,
}

/// An agent's (or one of its overlays') status, with the error if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub status: OverlayStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlayStatus {
    /// The agent realized its overlay.
    #[serde(rename = "STATUS_OK")]
    Ok,
    /// Leases won, not (yet) reported realized.
    #[serde(rename = "STATUS_LEASED")]
    Leased,
    /// No VTEP lease yet.
    #[serde(rename = "STATUS_PENDING")]
    Pending,
    /// Realizing (or leasing) failed; `error` says why.
    #[serde(rename = "STATUS_ERROR")]
    Error,
    /// The agent's overlay configuration differs; its leases are ignored.
    #[serde(rename = "STATUS_CONFIG_MISMATCH")]
    ConfigMismatch,
}

impl OverlayStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OverlayStatus::Ok => "STATUS_OK",
            OverlayStatus::Leased => "STATUS_LEASED",
            OverlayStatus::Pending => "STATUS_PENDING",
            OverlayStatus::Error => "STATUS_ERROR",
            OverlayStatus::ConfigMismatch => "STATUS_CONFIG_MISMATCH",
        }
    }
}

/// One overlay of an agent: its agent subnet, bridges and VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOverlay {
    pub backend: OverlayBackend,
    pub docker_bridge: Bridge,
    pub info: OverlayInfo,
    pub mesos_bridge: Bridge,
    pub state: OverlayState,
    /// The agent subnet, `a.b.c.d/prefix`.
    pub subnet: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayBackend {
    pub vxlan: Vxlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vxlan {
    pub vni: u32,
    /// `a.b.c.d/len` (the VTEP subnet's length).
    pub vtep_ip: String,
    pub vtep_mac: String,
    pub vtep_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    /// The gateway, `a.b.c.d/len`.
    pub ip: String,
    pub name: String,
}

/// An overlay network as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayInfo {
    pub name: String,
    pub prefix: u8,
    pub subnet: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayNetwork {
    pub overlays: Vec<OverlayInfo>,
    pub vtep_mac_oui: String,
    pub vtep_mtu: u32,
    pub vtep_subnet: String,
}

/// `POST /overlay-master/agents/delete`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteAgentsRequest {
    pub agents: Vec<IpAddr>,
}

/// Its reply: the node ids deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteAgentsReply {
    pub deleted: Vec<String>,
}

/// dcos-net's `GET /v1/records`.
pub type Records = Vec<RecordRow>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRow {
    pub name: String,
    /// `10.0.0.1`, or `priority weight port target` for SRV.
    pub rdata: String,
    /// `A`, `AAAA` or `SRV`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Mesos-DNS's `GET /v1/enumerate`: per framework, per app, its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enumerate {
    pub frameworks: Vec<EnumerateFramework>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnumerateFramework {
    pub name: String,
    pub tasks: Vec<EnumerateTask>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnumerateTask {
    pub name: String,
    pub records: Vec<EnumerateRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnumerateRecord {
    /// The address, or `target:port` for SRV.
    pub host: String,
    pub name: String,
    pub rtype: String,
}

/// Mesos-DNS's `GET /v1/config`, from the agent's settings (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    #[serde(rename = "DnsOn")]
    pub dns_on: bool,
    #[serde(rename = "Domain")]
    pub domain: String,
    #[serde(rename = "ExternalOn")]
    pub external_on: bool,
    #[serde(rename = "HttpOn")]
    pub http_on: bool,
    #[serde(rename = "Listeners")]
    pub listeners: Vec<String>,
    #[serde(rename = "RefreshSeconds")]
    pub refresh_seconds: u64,
    #[serde(rename = "Resolvers")]
    pub resolvers: Vec<String>,
    #[serde(rename = "SOAMname")]
    pub soa_mname: String,
    #[serde(rename = "SOARname")]
    pub soa_rname: String,
    #[serde(rename = "TTL")]
    pub ttl: u32,
    #[serde(rename = "Timeout")]
    pub timeout: u64,
    #[serde(rename = "Zones")]
    pub zones: Vec<String>,
}

/// Mesos-DNS's `GET /v1/hosts/{host}` (one row of empty strings if none).
pub type Hosts = Vec<HostRow>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    pub host: String,
    pub ip: String,
}

/// Mesos-DNS's `GET /v1/services/{service}` (one row of empty strings if
/// none).
pub type Services = Vec<ServiceRow>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    pub host: String,
    pub ip: String,
    /// A string, as Mesos-DNS had it.
    pub port: String,
    pub service: String,
}

/// The body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialized in declaration order, and through `serde_json::Value`
    /// (keys sorted, as `json!` wrote them): the same bytes.
    fn same_as_json_macro<T: Serialize>(doc: &T) {
        let typed = serde_json::to_string(doc).expect("serializes");
        let sorted = serde_json::to_value(doc).expect("to value").to_string();
        assert_eq!(typed, sorted);
    }

    fn overlay_state(error: Option<&str>) -> OverlayState {
        OverlayState {
            error: error.map(str::to_string),
            status: if error.is_some() {
                OverlayStatus::Error
            } else {
                OverlayStatus::Ok
            },
        }
    }

    #[test]
    fn fields_are_in_the_order_json_macro_wrote() {
        same_as_json_macro(&Version {
            cluster_id: "c".into(),
            node_id: "n".into(),
            version: "v".into(),
        });
        same_as_json_macro(&PutTaskReply {
            id: "t".into(),
            node_id: "n".into(),
        });
        let key = |deleted| StateKey {
            deleted,
            value: (!deleted).then(|| serde_json::json!({"b": 1, "a": [2]})),
            version: 3,
        };
        same_as_json_macro(&State {
            cluster_id: "c".into(),
            node_id: "n".into(),
            nodes: [(
                "n".to_string(),
                StateNode {
                    generation: 1,
                    keys: [("k".to_string(), key(false)), ("t".to_string(), key(true))].into(),
                    max_version: 3,
                    status: NodeStatus::Alive,
                },
            )]
            .into(),
            removed: [("gone".to_string(), 7)].into(),
        });
        let info = OverlayInfo {
            name: "dcos".into(),
            prefix: 24,
            subnet: "9.0.0.0/8".into(),
        };
        let bridge = |name: &str| Bridge {
            ip: "9.0.0.1/25".into(),
            name: name.into(),
        };
        same_as_json_macro(&OverlayMasterState {
            agents: vec![OverlayAgent {
                ip: "10.0.0.1".parse().expect("ip"),
                node_id: "n".into(),
                overlays: vec![AgentOverlay {
                    backend: OverlayBackend {
                        vxlan: Vxlan {
                            vni: 1024,
                            vtep_ip: "44.128.0.1/20".into(),
                            vtep_mac: "70:B3:D5:80:00:01".into(),
                            vtep_name: "vtep1024".into(),
                        },
                    },
                    docker_bridge: bridge("d-dcos"),
                    info: info.clone(),
                    mesos_bridge: bridge("m-dcos"),
                    state: overlay_state(Some("boom")),
                    subnet: "9.0.0.0/24".into(),
                }],
                state: overlay_state(None),
            }],
            network: OverlayNetwork {
                overlays: vec![info],
                vtep_mac_oui: "70:B3:D5:00:00:00".into(),
                vtep_mtu: 1450,
                vtep_subnet: "44.128.0.0/20".into(),
            },
        });
        same_as_json_macro(&DeleteAgentsReply {
            deleted: vec!["n".into()],
        });
        same_as_json_macro(&RecordRow {
            name: "a.mesos.".into(),
            rdata: "10.0.0.1".into(),
            kind: "A".into(),
        });
        same_as_json_macro(&Enumerate {
            frameworks: vec![EnumerateFramework {
                name: "marathon".into(),
                tasks: vec![EnumerateTask {
                    name: "a".into(),
                    records: vec![EnumerateRecord {
                        host: "10.0.0.1".into(),
                        name: "a.marathon.mesos.".into(),
                        rtype: "A".into(),
                    }],
                }],
            }],
        });
        same_as_json_macro(&DnsConfig {
            dns_on: true,
            domain: "mesos".into(),
            external_on: true,
            http_on: true,
            listeners: vec!["127.0.0.1:53".into()],
            refresh_seconds: 0,
            resolvers: vec![],
            soa_mname: "ns.mesos.".into(),
            soa_rname: "hostmaster.mesos.".into(),
            ttl: 5,
            timeout: 2,
            zones: vec!["mesos.".into()],
        });
        same_as_json_macro(&HostRow {
            host: "h".into(),
            ip: "i".into(),
        });
        same_as_json_macro(&ServiceRow {
            host: "h".into(),
            ip: "i".into(),
            port: "1".into(),
            service: "s".into(),
        });
        same_as_json_macro(&ErrorBody { error: "e".into() });
    }

    #[test]
    fn wire_details() {
        // A deleted key's value is an explicit null; an overlay state's
        // error is left out when there is none.
        let key = StateKey {
            deleted: true,
            value: None,
            version: 2,
        };
        assert_eq!(
            serde_json::to_string(&key).expect("json"),
            r#"{"deleted":true,"value":null,"version":2}"#
        );
        assert_eq!(
            serde_json::to_string(&overlay_state(None)).expect("json"),
            r#"{"status":"STATUS_OK"}"#
        );
        let tasks = Tasks {
            tasks: vec![],
            invalid: vec![],
        };
        assert_eq!(
            serde_json::to_string(&tasks).expect("json"),
            r#"{"tasks":[]}"#
        );
    }

    #[test]
    fn vip_problems_round_trip() {
        let problems = VipProblems(vec![VipProblem {
            task_id: "t".into(),
            node_id: "n".into(),
            label: "VIP_0".into(),
            error: "bad".into(),
        }]);
        let text = serde_json::to_string(&problems).expect("json");
        assert_eq!(
            text,
            r#"[{"task_id":"t","node_id":"n","label":"VIP_0","error":"bad"}]"#
        );
        let back: VipProblems = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, problems);
    }
}
