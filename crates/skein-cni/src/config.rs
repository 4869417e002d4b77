//! Decoding an invocation: the CNI_* environment and the network
//! configuration on stdin, into a typed [`Request`]. Pure: the environment is
//! passed in as a lookup function so tests need not touch the process's.
//!
//! Every rejection carries the spec's code (4 environment, 6 not JSON,
//! 1 version, 7 configuration) and a message naming the offending value.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::{Map, Value};

use crate::error::{code, CniError};

pub const DEFAULT_MTU: u32 = 1420;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/skein/cni";

/// The spec versions we answer in, oldest first (as VERSION lists them).
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.3.1", "0.4.0", "1.0.0"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V0_3_1,
    V0_4_0,
    V1_0_0,
}

impl CniVersion {
    pub fn parse(s: &str) -> Option<CniVersion> {
        match s {
            "0.3.1" => Some(CniVersion::V0_3_1),
            "0.4.0" => Some(CniVersion::V0_4_0),
            "1.0.0" => Some(CniVersion::V1_0_0),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
        }
    }

    /// CHECK arrived with spec 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// Results before 1.0.0 carry `"version": "4"` in each `ips` entry.
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

/// The network configuration the agent writes for one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The overlay's name (`dcos`); a directory under `data_dir`.
    pub name: String,
    /// The agent's bridge for this half of the agent subnet (`m-dcos`).
    pub bridge: String,
    /// Where container addresses come from (`9.0.1.0/25`).
    pub subnet: Ipv4Net,
    /// The bridge's own address, the containers' default route.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// ADD, DEL or CHECK of one container interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub conf: NetConf,
    pub container_id: String,
    /// `None` only for a DEL whose runtime no longer has the namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Version,
    Run(Invocation),
}

/// Decodes one invocation. `env` looks up a variable of the plugin's
/// environment (an empty value counts as unset, as the reference skel does).
pub fn parse_request(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Request, CniError> {
    let get = |key: &str| env(key).filter(|v| !v.is_empty());
    let command = match get("CNI_COMMAND") {
        None => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set: expected ADD, DEL, CHECK or VERSION",
            ))
        }
        Some(c) => match c.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("unknown CNI_COMMAND {other:?}: expected ADD, DEL, CHECK or VERSION"),
                ))
            }
        },
    };
    if command == Command::Version {
        // VERSION's stdin only carries the caller's cniVersion; the answer
        // does not depend on it.
        return Ok(Request::Version);
    }

    let container_id = get("CNI_CONTAINERID").ok_or_else(|| missing_env("CNI_CONTAINERID"))?;
    validate_container_id(&container_id)?;
    let ifname = get("CNI_IFNAME").ok_or_else(|| missing_env("CNI_IFNAME"))?;
    validate_ifname(&ifname)
        .map_err(|why| CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {ifname:?} {why}")))?;
    let netns = match get("CNI_NETNS") {
        Some(path) if !path.starts_with('/') => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_NETNS {path:?} is not an absolute path"),
            ))
        }
        Some(path) => Some(PathBuf::from(path)),
        // The spec lets a runtime DEL after the namespace is gone.
        None if command == Command::Del => None,
        None => return Err(missing_env("CNI_NETNS")),
    };

    let conf = parse_netconf(stdin)?;
    if command == Command::Check && !conf.cni_version.has_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK is not part of CNI {}: it needs cniVersion 0.4.0 or later",
                conf.cni_version.as_str()
            ),
        ));
    }
    Ok(Request::Run(Invocation {
        command,
        conf,
        container_id,
        netns,
        ifname,
    }))
}

fn missing_env(key: &str) -> CniError {
    CniError::new(code::INVALID_ENV, format!("{key} is not set"))
}

/// The spec's rule: an alphanumeric, then alphanumerics, `_`, `.` or `-`.
/// It also keeps the id safe to write into the allocation files.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit \
                 and hold only letters, digits, '_', '.' and '-'"
            ),
        ))
    }
}

/// Linux's (and the spec's) rule for an interface name; `Err` says why not.
pub fn validate_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > 15 {
        Err("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Err("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Err("contains '/', ':' or whitespace")
    } else {
        Ok(())
    }
}

/// The `cniVersion` to put on an error result: the config's when it is one
/// we speak, else our newest.
pub fn reply_version(stdin: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .as_ref()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::V1_0_0)
        .as_str()
}

/// Where the agent writes the network of overlay `name` for this node's
/// runtime bridge: its data dir's `cni/<name>.conf` (`/var/lib/skein` by
/// default).
pub fn default_state_file(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/skein/cni/{name}.conf"))
}

/// The agent's network file, read with care: the path comes from a
/// network configuration, so it must be a regular file (not a FIFO that
/// blocks the runtime, nor `/dev/zero`) of at most 64 KiB.
pub fn read_state_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(64 * 1024 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > 64 * 1024 {
        return Err(std::io::Error::other("larger than 64 KiB"));
    }
    Ok(bytes)
}

/// The keys a static configuration may leave to the agent's state file.
const FROM_STATE: [&str; 5] = ["bridge", "subnet", "gateway", "mtu", "dataDir"];

/// A static network configuration, installed once (`{"type": "skein-cni",
/// "name": "dcos"}`, in a `.conflist` with other plugins after it), gets
/// this node's current bridge, subnet, gateway, MTU and IPAM dir from the
/// file the agent keeps (`stateFile`, else [`default_state_file`]), as
/// Flannel's plugin reads its `subnet.env`: the lease may change, the
/// installed file need not. Keys the configuration sets win. A
/// configuration with a `bridge` is complete (the agent-written files
/// are) and is returned as it is; so is anything that is not a JSON
/// object with a usable name (its decoding reports what is wrong).
pub fn fill_from_state(
    stdin: &[u8],
    read: &dyn Fn(&std::path::Path) -> std::io::Result<Vec<u8>>,
) -> Result<Vec<u8>, CniError> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(stdin) else {
        return Ok(stdin.to_vec());
    };
    if obj.contains_key("bridge") {
        return Ok(stdin.to_vec());
    }
    let path = match obj.get("stateFile") {
        Some(Value::String(p)) if p.starts_with('/') => PathBuf::from(p),
        Some(v) => return Err(invalid(format!("stateFile {v} is not an absolute path"))),
        None => match obj.get("name") {
            Some(Value::String(n))
                if !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    && n != "."
                    && n != ".." =>
            {
                default_state_file(n)
            }
            _ => return Ok(stdin.to_vec()),
        },
    };
    let bytes = read(&path).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "no network state at {}: is the skein agent running with its overlay on this node?",
                path.display()
            ),
        )
        .with_details(e.to_string())
    })?;
    let Ok(Value::Object(state)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(invalid(format!(
            "{} is not the agent's network file (not a JSON object)",
            path.display()
        )));
    };
    for key in FROM_STATE {
        if !obj.contains_key(key) {
            if let Some(v) = state.get(key) {
                obj.insert(key.to_string(), v.clone());
            }
        }
    }
    serde_json::to_vec(&Value::Object(obj)).map_err(|e| {
        CniError::new(code::DECODE, "re-encoding the network configuration")
            .with_details(e.to_string())
    })
}

/// Decodes and validates the network configuration. Keys we do not use
/// (`prevResult`, `runtimeConfig`, `args`, `type`, ...) are ignored.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "failed to decode the network configuration on stdin: it is not valid JSON",
        )
        .with_details(e.to_string())
    })?;
    let Value::Object(obj) = value else {
        return Err(invalid("the network configuration must be a JSON object"));
    };

    let version = required_str(&obj, "cniVersion")?;
    let cni_version = CniVersion::parse(version).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI version {version:?}: skein-cni supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        )
    })?;

    let name = required_str(&obj, "name")?;
    let name_ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        // The name becomes a directory under dataDir, so no '/'.
        return Err(invalid(format!(
            "name {name:?} is invalid: use letters, digits, '_', '.' and '-'"
        )));
    }

    let bridge = required_str(&obj, "bridge")?;
    validate_ifname(bridge).map_err(|why| invalid(format!("bridge {bridge:?} {why}")))?;

    let subnet_s = required_str(&obj, "subnet")?;
    let subnet: Ipv4Net = subnet_s.parse().map_err(|_| {
        invalid(format!(
            "subnet {subnet_s:?} is not an IPv4 CIDR like 9.0.1.0/25"
        ))
    })?;
    if subnet.network() != subnet.addr() {
        return Err(invalid(format!(
            "subnet {subnet} is not a network address (host bits set; did you mean {}?)",
            subnet.trunc()
        )));
    }
    if subnet.prefix_len() > 30 {
        return Err(invalid(format!(
            "subnet {subnet} is too small: it needs room for a gateway and containers (at most /30)"
        )));
    }

    let gateway_s = required_str(&obj, "gateway")?;
    let gateway: Ipv4Addr = gateway_s
        .parse()
        .map_err(|_| invalid(format!("gateway {gateway_s:?} is not an IPv4 address")))?;
    if !subnet.contains(&gateway) {
        return Err(invalid(format!(
            "gateway {gateway} is outside subnet {subnet}"
        )));
    }
    if gateway == subnet.network() || gateway == subnet.broadcast() {
        return Err(invalid(format!(
            "gateway {gateway} is the network or broadcast address of subnet {subnet}"
        )));
    }

    let mtu = match obj.get("mtu") {
        None | Some(Value::Null) => DEFAULT_MTU,
        Some(v) => v
            .as_u64()
            .filter(|m| (68..=65535).contains(m))
            .map(|m| m as u32)
            .ok_or_else(|| invalid(format!("mtu {v} is not an integer from 68 to 65535")))?,
    };

    let data_dir = match obj.get("dataDir") {
        None | Some(Value::Null) => PathBuf::from(DEFAULT_DATA_DIR),
        Some(Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
        Some(v) => {
            // Relative would depend on the runtime's working directory.
            return Err(invalid(format!("dataDir {v} is not an absolute path")));
        }
    };

    Ok(NetConf {
        cni_version,
        name: name.to_string(),
        bridge: bridge.to_string(),
        subnet,
        gateway,
        mtu,
        data_dir,
    })
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn required_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, CniError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(invalid(format!("network configuration has no {key:?}"))),
        Some(other) => Err(invalid(format!("{key:?} must be a string, got {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        assert!(validate_ifname("abcdefghijklmnop").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("a:1").is_err());
    }

    #[test]
    fn container_id_rules() {
        assert!(validate_container_id("abc-1_2.3").is_ok());
        assert!(validate_container_id("-abc").is_err());
        assert!(validate_container_id("a/b").is_err());
        assert!(validate_container_id("a\nb").is_err());
    }

    #[test]
    fn a_static_configuration_is_filled_from_the_agents_file() {
        let state = br#"{"cniVersion":"1.0.0","name":"dcos","type":"skein-cni","bridge":"m-dcos",
            "subnet":"9.0.1.0/25","gateway":"9.0.1.1","mtu":1400,"dataDir":"/d/cni-ipam"}"#;
        let read = |p: &std::path::Path| {
            if p == std::path::Path::new("/var/lib/skein/cni/dcos.conf") {
                Ok(state.to_vec())
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            }
        };
        let filled = fill_from_state(
            br#"{"cniVersion":"0.4.0","name":"dcos","type":"skein-cni","mtu":1300}"#,
            &read,
        )
        .expect("filled");
        let conf = parse_netconf(&filled).expect("complete");
        assert_eq!(conf.bridge, "m-dcos");
        assert_eq!(conf.subnet.to_string(), "9.0.1.0/25");
        assert_eq!(conf.mtu, 1300, "the configuration's own keys win");
        assert_eq!(conf.data_dir, PathBuf::from("/d/cni-ipam"));
        assert_eq!(conf.cni_version.as_str(), "0.4.0");

        let e = fill_from_state(
            br#"{"cniVersion":"1.0.0","name":"other","type":"skein-cni"}"#,
            &read,
        )
        .expect_err("no file");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("/var/lib/skein/cni/other.conf"), "{e}");
        let e = fill_from_state(
            br#"{"cniVersion":"1.0.0","name":"dcos","stateFile":"rel"}"#,
            &read,
        )
        .expect_err("relative");
        assert_eq!(e.code, code::INVALID_CONFIG);
        // Complete or broken configurations pass through untouched.
        for raw in [&state[..], b"nope", br#"{"name":"../x"}"#] {
            assert_eq!(fill_from_state(raw, &read).expect("as is"), raw.to_vec());
        }
    }

    #[test]
    fn the_state_file_must_be_a_small_regular_file() {
        let dir = std::env::temp_dir().join(format!("skein-cni-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ok = dir.join("dcos.conf");
        std::fs::write(&ok, b"{}").expect("write");
        assert_eq!(read_state_file(&ok).expect("read"), b"{}");
        let big = dir.join("big.conf");
        std::fs::write(&big, vec![b' '; 70 * 1024]).expect("write");
        assert!(read_state_file(&big).is_err());
        assert!(read_state_file(std::path::Path::new("/dev/zero")).is_err());
        assert!(read_state_file(&dir).is_err(), "a directory");
        let link = dir.join("link.conf");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&ok, &link).expect("symlink");
        assert!(read_state_file(&link).is_err(), "a symlink is not followed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reply_version_falls_back() {
        assert_eq!(reply_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(reply_version(br#"{"cniVersion":"9.9.9"}"#), "1.0.0");
        assert_eq!(reply_version(b"nope"), "1.0.0");
    }
}
