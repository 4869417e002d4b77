//! The Docker network `dcos` on the agent's Docker bridge, as Navstar made
//! it on DC/OS agents: containers run with `--network dcos` get an address
//! of this node's overlay subnet (its second half, the agent's `d-dcos`
//! bridge) and reach every other node's containers. Its shape comes from
//! the file the agent writes for that bridge (`<data-dir>/cni/dcos-docker.conf`);
//! masquerading is off (overlay traffic keeps its addresses), and the label
//! `skein.overlay` marks it as ours: a network of that name someone else
//! made is left alone.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::client::Docker;

/// What the network must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    pub gateway: String,
    pub mtu: u64,
}

/// `Want` from the agent's network file for the Docker bridge (pure).
pub fn from_agent_file(name: &str, bytes: &[u8]) -> anyhow::Result<Want> {
    let v: Value = serde_json::from_slice(bytes).context("the agent's Docker bridge file")?;
    let s = |k: &str| -> anyhow::Result<String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("the agent's Docker bridge file has no {k:?}"))
    };
    Ok(Want {
        name: name.to_string(),
        bridge: s("bridge")?,
        subnet: s("subnet")?,
        gateway: s("gateway")?,
        mtu: v.get("mtu").and_then(Value::as_u64).unwrap_or(1420),
    })
}

/// The body of `POST /networks/create` (pure).
pub fn create_body(w: &Want) -> Value {
    json!({
        "Name": w.name,
        "Driver": "bridge",
        "CheckDuplicate": true,
        "IPAM": {"Driver": "default", "Config": [{"Subnet": w.subnet, "Gateway": w.gateway}]},
        "Options": {
            "com.docker.network.bridge.name": w.bridge,
            "com.docker.network.bridge.enable_ip_masquerade": "false",
            "com.docker.network.driver.mtu": w.mtu.to_string(),
        },
        "Labels": {"skein.overlay": w.name},
    })
}

/// Whether Docker's description of a network (`GET /networks/{name}`) is
/// what `w` wants (pure).
pub fn matches(existing: &Value, w: &Want) -> bool {
    let ipam = &existing["IPAM"]["Config"][0];
    let opts = &existing["Options"];
    ipam["Subnet"] == w.subnet.as_str()
        && ipam["Gateway"] == w.gateway.as_str()
        && opts["com.docker.network.bridge.name"] == w.bridge.as_str()
}

/// Whether skein made it, under this name (Docker also resolves a name
/// as an id or id prefix: the network found must be the one named).
pub fn ours(existing: &Value, name: &str) -> bool {
    existing["Name"] == name && existing["Labels"]["skein.overlay"] == name
}

/// A Docker network name as Docker accepts it, and safe in a URL path.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Makes the network as `w` wants it; what was done.
pub async fn ensure(docker: &Docker, w: &Want) -> anyhow::Result<&'static str> {
    if !valid_name(&w.name) {
        bail!("{:?} is not a Docker network name", w.name);
    }
    let path = format!("/networks/{}", w.name);
    if let Some(existing) = docker.get::<Value>(&path).await? {
        if existing["Name"] == w.name.as_str() && matches(&existing, w) {
            return Ok("kept");
        }
        if !ours(&existing, &w.name) {
            bail!(
                "a Docker network {:?} exists that skein did not make: left alone (containers on it are not on the overlay)",
                w.name
            );
        }
        // The lease moved (rare): the old network must go first; Docker
        // refuses while containers are attached.
        // By its id: the one just looked at, not whatever the name means now.
        let id = existing["Id"].as_str().unwrap_or_default();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "Docker described the network {:?} without a usable id",
                w.name
            );
        }
        let (status, body) = docker
            .call(hyper::Method::DELETE, &format!("/networks/{id}"), None)
            .await?;
        if !status.is_success() {
            bail!(
                "the Docker network {:?} has the old subnet and cannot be removed ({status}: {body})",
                w.name
            );
        }
    }
    let (status, body) = docker
        .call(
            hyper::Method::POST,
            "/networks/create",
            Some(&create_body(w)),
        )
        .await?;
    if !status.is_success() {
        bail!(
            "Docker refused to create the network {:?}: {status}: {body}",
            w.name
        );
    }
    Ok("created")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_follows_the_agents_file() {
        let file = br#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","bridge":"d-dcos",
            "subnet":"9.0.1.128/25","gateway":"9.0.1.129","mtu":1420,"dataDir":"/x"}"#;
        let w = from_agent_file("dcos", file).expect("want");
        let body = create_body(&w);
        assert_eq!(body["IPAM"]["Config"][0]["Subnet"], "9.0.1.128/25");
        assert_eq!(body["Options"]["com.docker.network.bridge.name"], "d-dcos");
        assert_eq!(
            body["Options"]["com.docker.network.bridge.enable_ip_masquerade"],
            "false"
        );
        // Docker answers with the same shape it was given.
        assert!(matches(&body, &w));
        assert!(ours(&body, "dcos"));
        assert!(
            !ours(&body, "other"),
            "a network found under another name is not ours"
        );
        assert!(
            valid_name("dcos") && valid_name("skt-net-1") && !valid_name("../x") && !valid_name("")
        );
        let moved = Want {
            subnet: "9.0.2.128/25".into(),
            gateway: "9.0.2.129".into(),
            ..w.clone()
        };
        assert!(!matches(&body, &moved));
        assert!(from_agent_file("dcos", b"{}").is_err());
    }
}
