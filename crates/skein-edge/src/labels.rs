//! Marathon-LB's labels, read per app port.
//!
//! `HAPROXY_GROUP` (app-wide) and `HAPROXY_{n}_*` (port `n` of the task):
//! each port is read on its own, so a malformed label disables only the
//! port it names, and a label for a raw HAProxy template (which only an
//! HAProxy configuration could interpret) is reported as unsupported for
//! its own port, which is served without it.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use skein_state::Labels;

/// How a port is proxied.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Tcp,
    Http,
}

/// `HAPROXY_{n}_BALANCE`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Roundrobin,
    Leastconn,
    /// A hash of the client's address: one client, one server.
    Source,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::Roundrobin => "roundrobin",
            Balance::Leastconn => "leastconn",
            Balance::Source => "source",
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        })
    }
}

/// `HAPROXY_{n}_AUTH`: `realm:user:password-hash`, the hash in crypt(3)'s
/// SHA-256 (`$5$`) or SHA-512 (`$6$`) form as `mkpasswd -m sha-512` makes
/// it (Marathon-LB put it in an HAProxy userlist).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BasicAuth {
    pub realm: String,
    pub user: String,
    pub password_hash: String,
}

/// What the labels say about one app port that an edge should expose
/// (the default: no group, TCP, no routes; for building them in code).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortLabels {
    /// The edge groups that serve it (`HAPROXY_{n}_GROUP`, else
    /// `HAPROXY_GROUP`; comma separated), sorted, at least one.
    pub groups: Vec<String>,
    /// `HAPROXY_{n}_PORT`: the port to bind instead of the service port.
    /// In JSON `label_port`, not to be read as the backend's effective
    /// `bind_port`.
    #[serde(rename = "label_port", default)]
    pub bind_port: Option<u16>,
    pub bind_addr: Option<IpAddr>,
    pub mode: Mode,
    /// Lowercase host names, in label order, each once.
    /// (Shared: the computed routes hold them too.)
    pub vhosts: Vec<Arc<str>>,
    /// A path prefix (`/api`), matched on the virtual hosts or, without
    /// one, on the HTTP port.
    pub path: Option<Arc<str>>,
    /// Stripped from the request path before it is forwarded.
    pub proxypass_path: Option<String>,
    pub balance: Balance,
    pub sticky: bool,
    pub redirect_to_https: bool,
    /// PEM files (certificate and key) on the edge node, for the vhosts on
    /// the HTTPS port.
    pub ssl_certs: Vec<String>,
    /// Orders HTTP routes (higher first), as Marathon-LB ordered its ACLs.
    pub backend_weight: i32,
    /// Boxed: rare, and three strings wide in every app port's labels.
    pub auth: Option<Box<BasicAuth>>,
}

/// One thing wrong with an app's labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelProblem {
    /// The label at fault.
    pub label: String,
    pub message: String,
    /// Whether the port is left unserved because of it (a malformed value)
    /// or served without it (an unsupported template label).
    pub disables: bool,
}

/// How one app port's labels read.
#[derive(Debug, Clone, PartialEq, Eq)]
// Exposed is by far the common case: boxing it would cost an allocation
// per app port on every computation.
#[allow(clippy::large_enum_variant)]
pub enum PortOutcome {
    /// No group, or `HAPROXY_{n}_ENABLED=false`: no edge serves it.
    NotExposed,
    /// Exposed; `problems` lists what was ignored.
    Exposed {
        labels: PortLabels,
        problems: Vec<LabelProblem>,
    },
    /// A label is malformed: not served, and why.
    Disabled { problems: Vec<LabelProblem> },
}

/// Labels Marathon-LB passed verbatim into its HAProxy template: meaningless
/// without HAProxy, so reported rather than silently dropped.
const TEMPLATE_LABELS: &[&str] = &[
    "BACKEND_HEAD",
    "BACKEND_HSTS_OPTIONS",
    "BACKEND_HTTP_HEALTHCHECK_OPTIONS",
    "BACKEND_HTTP_OPTIONS",
    "BACKEND_REDIRECT_HTTP_TO_HTTPS",
    "BACKEND_REDIRECT_HTTP_TO_HTTPS_WITH_PATH",
    "BACKEND_SERVER_HTTP_HEALTHCHECK_OPTIONS",
    "BACKEND_SERVER_OPTIONS",
    "BACKEND_SERVER_TCP_HEALTHCHECK_OPTIONS",
    "BACKEND_STICKY_OPTIONS",
    "BACKEND_TCP_HEALTHCHECK_OPTIONS",
    "FRONTEND_BACKEND_GLUE",
    "FRONTEND_HEAD",
    "HTTP_BACKEND_ACL_ALLOW_DENY",
    "HTTP_BACKEND_NETWORK_ALLOWED_ACL",
    "HTTP_BACKEND_PROXYPASS_GLUE",
    "HTTP_BACKEND_REDIR",
    "HTTP_BACKEND_REVPROXY_GLUE",
    "HTTP_BACKEND_REVPROXY_PATH",
    "HTTP_FRONTEND_ACL",
    "HTTP_FRONTEND_ACL_ONLY",
    "HTTP_FRONTEND_ACL_ONLY_WITH_PATH",
    "HTTP_FRONTEND_ACL_ONLY_WITH_PATH_AND_AUTH",
    "HTTP_FRONTEND_ACL_WITH_AUTH",
    "HTTP_FRONTEND_ACL_WITH_AUTH_AND_PATH",
    "HTTP_FRONTEND_ACL_WITH_PATH",
    "HTTP_FRONTEND_APPID_ACL",
    "HTTP_FRONTEND_ROUTING_ONLY",
    "HTTP_FRONTEND_ROUTING_ONLY_WITH_AUTH",
    "HTTP_FRONTEND_ROUTING_ONLY_WITH_PATH",
    "HTTP_FRONTEND_ROUTING_ONLY_WITH_PATH_AND_AUTH",
    "HTTPS_FRONTEND_ACL",
    "HTTPS_FRONTEND_ACL_ONLY_WITH_PATH",
    "HTTPS_FRONTEND_ACL_WITH_AUTH",
    "HTTPS_FRONTEND_ACL_WITH_AUTH_AND_PATH",
    "HTTPS_FRONTEND_ACL_WITH_PATH",
    "HTTPS_GROUPED_FRONTEND_HEAD",
    "MAP_HTTP_FRONTEND_ACL",
    "MAP_HTTP_FRONTEND_ACL_ONLY",
    "MAP_HTTP_FRONTEND_ACL_WITH_PATH",
    "MAP_HTTP_FRONTEND_APPID_ACL",
    "MAP_HTTPS_FRONTEND_ACL",
    "TCP_BACKEND_ACL_ALLOW_DENY",
    "TCP_BACKEND_NETWORK_ALLOWED_ACL",
    "USE_HSTS",
    "BACKEND_NETWORK_ALLOWED_ACL",
    "BACKEND_HEALTHCHECK_PORT_INDEX",
];

/// The groups an app (or one of its ports) names, split and cleaned.
fn groups(value: &str) -> Vec<String> {
    if !value.contains(',') {
        // One group, as nearly every app names.
        let g = value.trim();
        return if g.is_empty() {
            Vec::new()
        } else {
            vec![g.to_string()]
        };
    }
    // Sized to the commas (room for each, not four).
    let mut out: Vec<String> = Vec::with_capacity(value.split(',').count());
    out.extend(
        value
            .split(',')
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty()),
    );
    out.sort();
    out.dedup();
    out
}

fn boolean(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A host name as a `Host` header or SNI carries it: DNS labels of
/// `[a-z0-9-]`, or a leading `*.` for every name under a domain.
fn vhost(raw: &str) -> Option<Arc<str>> {
    let raw = raw.trim();
    // Lowercased only when it is not already (one allocation, not two).
    let lower;
    let host = if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        lower = raw.to_ascii_lowercase();
        lower.as_str()
    } else {
        raw
    };
    let rest = host.strip_prefix("*.").unwrap_or(host);
    let ok = !rest.is_empty()
        && host.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    ok.then(|| Arc::from(host))
}

/// A path prefix: starts with `/`, no spaces, no query.
fn path(raw: &str) -> Option<String> {
    let ok = raw.starts_with('/')
        && raw.len() <= 1024
        && !raw
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#');
    ok.then(|| raw.to_string())
}

fn auth(raw: &str) -> Result<BasicAuth, &'static str> {
    let mut parts = raw.splitn(3, ':');
    let (Some(realm), Some(user), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected realm:user:password-hash");
    };
    if realm.is_empty() || user.is_empty() || realm.contains('"') {
        return Err("realm and user must be non-empty (and the realm without quotes)");
    }
    if !(hash.starts_with("$5$") || hash.starts_with("$6$")) {
        return Err("the password must be a crypt(3) SHA-256 ($5$) or SHA-512 ($6$) hash, e.g. from `mkpasswd -m sha-512`");
    }
    Ok(BasicAuth {
        realm: realm.to_string(),
        user: user.to_string(),
        password_hash: hash.to_string(),
    })
}

/// `HAPROXY_<n>_<NAME>` → `(n, NAME)`.
fn port_label(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("HAPROXY_")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let n = rest.get(..digits)?.parse().ok()?;
    let name = rest.get(digits..)?.strip_prefix('_')?;
    Some((n, name))
}

/// Reads port `index`'s labels out of the app's.
pub fn parse_port(app: &Labels, index: usize) -> PortOutcome {
    // This port's labels, found in one pass (an app has a few dozen), and
    // without formatting its prefix: this runs for every app port of a
    // view. On the stack up to a port's usual few (an allocation per app
    // port showed in a first view of 10,000 apps).
    const ON_STACK: usize = 16;
    let mut near: [(&str, &str); ON_STACK] = [("", ""); ON_STACK];
    let mut count = 0;
    let mut more: Vec<(&str, &str)> = Vec::new();
    for (k, v) in app.iter() {
        match port_label(k) {
            Some((n, name)) if n == index => {
                if count < ON_STACK {
                    near[count] = (name, v);
                    count += 1;
                } else {
                    more.push((name, v));
                }
            }
            _ => {}
        }
    }
    let own = |name: &str| {
        near[..count]
            .iter()
            .chain(more.iter())
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    };
    let mut problems = Vec::new();
    let mut bad = |label: &str, message: String| {
        problems.push(LabelProblem {
            label: format!("HAPROXY_{index}_{label}"),
            message,
            disables: true,
        });
    };

    let group_value = own("GROUP").or_else(|| app.get("HAPROXY_GROUP"));
    let groups = group_value.map(groups).unwrap_or_default();
    let enabled = match own("ENABLED") {
        None => true,
        Some(v) => match boolean(v) {
            Some(b) => b,
            None => {
                bad("ENABLED", format!("{v:?} is not true or false"));
                true
            }
        },
    };
    if groups.is_empty() || !enabled {
        return PortOutcome::NotExposed;
    }

    let bind_port = own("PORT").and_then(|v| match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Some(p),
        _ => {
            bad(
                "PORT",
                format!("{v:?} is not a port number from 1 to 65535"),
            );
            None
        }
    });
    let bind_addr = own("BIND_ADDR").and_then(|v| match v.trim().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            bad("BIND_ADDR", format!("{v:?} is not an IP address"));
            None
        }
    });
    let mut vhosts: Vec<Arc<str>> = Vec::new();
    if let Some(v) = own("VHOST") {
        // Room for each named (mostly one), not four.
        vhosts.reserve_exact(v.split(',').count());
        for raw in v.split(',').filter(|s| !s.trim().is_empty()) {
            match vhost(raw) {
                Some(h) if !vhosts.contains(&h) => vhosts.push(h),
                Some(_) => {}
                None => bad("VHOST", format!("{raw:?} is not a host name")),
            }
        }
    }
    let path_label = own("PATH").and_then(|v| {
        path(v).or_else(|| {
            bad(
                "PATH",
                format!("{v:?} is not a path prefix (starts with /, no spaces, no ? or #)"),
            );
            None
        })
    });
    let proxypass_path = own("HTTP_BACKEND_PROXYPASS_PATH").and_then(|v| {
        path(v).or_else(|| {
            bad(
                "HTTP_BACKEND_PROXYPASS_PATH",
                format!("{v:?} is not a path prefix"),
            );
            None
        })
    });
    let http_needed = !vhosts.is_empty() || path_label.is_some();
    let mode = match own("MODE").map(|v| v.trim().to_ascii_lowercase()) {
        None => {
            if http_needed {
                Mode::Http
            } else {
                Mode::Tcp
            }
        }
        Some(m) if m == "http" => Mode::Http,
        Some(m) if m == "tcp" => {
            if http_needed {
                bad(
                    "MODE",
                    "tcp cannot serve a virtual host or path (they are HTTP routing)".into(),
                );
            }
            Mode::Tcp
        }
        Some(m) => {
            bad("MODE", format!("{m:?} is not tcp or http"));
            Mode::Tcp
        }
    };
    let balance = match own("BALANCE").map(|v| v.trim().to_ascii_lowercase()) {
        None => Balance::Roundrobin,
        Some(b) => match b.as_str() {
            "roundrobin" => Balance::Roundrobin,
            "leastconn" => Balance::Leastconn,
            "source" => Balance::Source,
            _ => {
                bad(
                    "BALANCE",
                    format!("{b:?} is not roundrobin, leastconn or source"),
                );
                Balance::Roundrobin
            }
        },
    };
    let mut flag = |name: &str| match own(name) {
        None => false,
        Some(v) => boolean(v).unwrap_or_else(|| {
            bad(name, format!("{v:?} is not true or false"));
            false
        }),
    };
    let sticky = flag("STICKY");
    let redirect_to_https = flag("REDIRECT_TO_HTTPS");
    let ssl_certs: Vec<String> = own("SSL_CERT")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for cert in &ssl_certs {
        if !cert.starts_with('/') {
            bad("SSL_CERT", format!("{cert:?} is not an absolute path"));
        }
    }
    let backend_weight = own("BACKEND_WEIGHT").map_or(0, |v| {
        v.trim().parse::<i32>().unwrap_or_else(|_| {
            bad("BACKEND_WEIGHT", format!("{v:?} is not an integer"));
            0
        })
    });
    let auth = own("AUTH").and_then(|v| match auth(v) {
        Ok(a) => Some(Box::new(a)),
        Err(e) => {
            bad("AUTH", e.to_string());
            None
        }
    });
    if mode == Mode::Tcp {
        for (name, set) in [
            ("STICKY", sticky),
            ("REDIRECT_TO_HTTPS", redirect_to_https),
            ("AUTH", auth.is_some()),
            ("HTTP_BACKEND_PROXYPASS_PATH", proxypass_path.is_some()),
        ] {
            if set {
                bad(
                    name,
                    "needs HAPROXY_{n}_MODE=http".replace("{n}", &index.to_string()),
                );
            }
        }
    }

    // Every other label of this port: a template (unsupported, ignored) or
    // unknown (most likely a typo: disables, as a wrong value would).
    const KNOWN: &[&str] = &[
        "GROUP",
        "ENABLED",
        "PORT",
        "BIND_ADDR",
        "MODE",
        "VHOST",
        "PATH",
        "HTTP_BACKEND_PROXYPASS_PATH",
        "BALANCE",
        "STICKY",
        "REDIRECT_TO_HTTPS",
        "SSL_CERT",
        "BACKEND_WEIGHT",
        "AUTH",
    ];
    let mut ignored = Vec::new();
    for &(name, _) in near[..count].iter().chain(more.iter()) {
        if KNOWN.contains(&name) {
            continue;
        }
        if TEMPLATE_LABELS.contains(&name) {
            ignored.push(LabelProblem {
                label: format!("HAPROXY_{index}_{name}"),
                message: "a raw HAProxy template label: unsupported, ignored".into(),
                disables: false,
            });
        } else {
            bad(name, "unknown label".into());
        }
    }
    problems.append(&mut ignored);

    if problems.iter().any(|p| p.disables) {
        problems.sort();
        return PortOutcome::Disabled { problems };
    }
    PortOutcome::Exposed {
        labels: PortLabels {
            groups,
            bind_port,
            bind_addr,
            mode,
            vhosts,
            path: path_label.map(Arc::from),
            proxypass_path,
            balance,
            sticky,
            redirect_to_https,
            ssl_certs,
            backend_weight,
            auth,
        },
        problems,
    }
}

/// App-wide labels that concern no one port: `HAPROXY_{n}_*` for a port
/// the task does not have, and `HAPROXY_*` templates. Reported, ignored.
pub fn app_problems(app: &Labels, port_count: usize) -> Vec<LabelProblem> {
    let mut out = Vec::new();
    for (key, _) in app.iter() {
        let Some(rest) = key.strip_prefix("HAPROXY_") else {
            continue;
        };
        // A slice, not a copy: this runs for every label of every app read.
        let digits = &rest[..rest.bytes().take_while(u8::is_ascii_digit).count()];
        if !digits.is_empty() && rest[digits.len()..].starts_with('_') {
            if digits.parse::<usize>().map_or(true, |n| n >= port_count) {
                out.push(LabelProblem {
                    label: key.to_string(),
                    message: format!("the task has {port_count} port(s): no port {digits}"),
                    disables: false,
                });
            }
            continue;
        }
        if rest == "GROUP" || rest.starts_with("DEPLOYMENT_") || rest == "APP_ID" {
            continue;
        }
        out.push(LabelProblem {
            label: key.to_string(),
            message: "unsupported app-wide HAProxy label, ignored".into(),
            disables: false,
        });
    }
    out
}

/// Marathon-LB's name for an app in backend names: the app id without its
/// leading `/`, `/` replaced by `_` (`/accedge` → `accedge`,
/// `/grp/web` → `grp_web`); anything outside `[A-Za-z0-9._-]` becomes `_`
/// so the name is safe in the CSV and the config dump.
pub fn backend_app_name(app: &str) -> String {
    let app = app.trim_start_matches('/');
    // Sized once (every character becomes at most itself): collecting
    // characters grows the string several times, for every app of a view.
    let mut out = String::with_capacity(app.len());
    out.extend(app.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
            c
        } else {
            '_'
        }
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn exposed(outcome: PortOutcome) -> PortLabels {
        match outcome {
            PortOutcome::Exposed { labels, .. } => labels,
            other => panic!("not exposed: {other:?}"),
        }
    }

    #[test]
    fn the_seed_articles_labels() {
        let app = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_0_MODE", "http"),
            ("HAPROXY_0_PORT", "3141"),
        ]);
        let p = exposed(parse_port(&app, 0));
        assert_eq!(p.groups, vec!["external"]);
        assert_eq!(p.mode, Mode::Http);
        assert_eq!(p.bind_port, Some(3141));
        // Port 1 has no labels of its own, but the app's group.
        let p1 = exposed(parse_port(&app, 1));
        assert_eq!(p1.mode, Mode::Tcp);
        assert_eq!(p1.bind_port, None);
    }

    #[test]
    fn a_vhost_means_http_and_tcp_with_one_is_refused() {
        let app = labels(&[
            ("HAPROXY_GROUP", "external"),
            (
                "HAPROXY_0_VHOST",
                "Web.Example.com, api.example.com,web.example.com",
            ),
        ]);
        let p = exposed(parse_port(&app, 0));
        assert_eq!(p.mode, Mode::Http);
        assert_eq!(
            p.vhosts,
            vec![Arc::from("web.example.com"), Arc::from("api.example.com")]
        );
        let app = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_0_VHOST", "web.example.com"),
            ("HAPROXY_0_MODE", "tcp"),
        ]);
        assert!(matches!(parse_port(&app, 0), PortOutcome::Disabled { .. }));
    }

    #[test]
    fn groups_enabled_and_port_groups() {
        assert_eq!(parse_port(&labels(&[]), 0), PortOutcome::NotExposed);
        let app = labels(&[
            ("HAPROXY_GROUP", "internal, external"),
            ("HAPROXY_1_GROUP", "external"),
            ("HAPROXY_2_ENABLED", "false"),
        ]);
        assert_eq!(
            exposed(parse_port(&app, 0)).groups,
            vec!["external", "internal"]
        );
        assert_eq!(exposed(parse_port(&app, 1)).groups, vec!["external"]);
        assert_eq!(parse_port(&app, 2), PortOutcome::NotExposed);
    }

    #[test]
    fn a_bad_label_disables_its_own_port_only() {
        let app = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_0_BALANCE", "fastest"),
            ("HAPROXY_1_VHOST", "ok.example.com"),
            ("HAPROXY_1_BACKEND_HEAD", "timeout server 5m"),
            ("HAPROXY_2_VHOSTT", "typo.example.com"),
        ]);
        match parse_port(&app, 0) {
            PortOutcome::Disabled { problems } => {
                assert_eq!(problems[0].label, "HAPROXY_0_BALANCE");
                assert!(problems[0].message.contains("fastest"));
            }
            other => panic!("{other:?}"),
        }
        match parse_port(&app, 1) {
            PortOutcome::Exposed { labels, problems } => {
                assert_eq!(labels.vhosts, vec![Arc::from("ok.example.com")]);
                assert_eq!(problems.len(), 1);
                assert!(!problems[0].disables);
                assert!(problems[0].message.contains("unsupported"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_port(&app, 2), PortOutcome::Disabled { .. }));
        assert!(matches!(parse_port(&app, 3), PortOutcome::Exposed { .. }));
    }

    #[test]
    fn auth_needs_a_crypt_hash() {
        let ok = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_0_MODE", "http"),
            ("HAPROXY_0_AUTH", "private:alice:$6$salt$hash:with:colons"),
        ]);
        let a = exposed(parse_port(&ok, 0)).auth.expect("auth");
        assert_eq!(
            (a.realm.as_str(), a.user.as_str(), a.password_hash.as_str()),
            ("private", "alice", "$6$salt$hash:with:colons")
        );
        let plain = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_0_MODE", "http"),
            ("HAPROXY_0_AUTH", "private:alice:secret"),
        ]);
        assert!(matches!(
            parse_port(&plain, 0),
            PortOutcome::Disabled { .. }
        ));
    }

    #[test]
    fn app_wide_problems() {
        let app = labels(&[
            ("HAPROXY_GROUP", "external"),
            ("HAPROXY_3_VHOST", "x.example.com"),
            ("HAPROXY_FRONTEND_HEAD", "x"),
            ("HAPROXY_DEPLOYMENT_GROUP", "blue"),
            ("VIP_0", "/x:80"),
        ]);
        let p = app_problems(&app, 1);
        let labels: Vec<&str> = p.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, vec!["HAPROXY_3_VHOST", "HAPROXY_FRONTEND_HEAD"]);
    }

    #[test]
    fn backend_names_as_marathon_lb() {
        assert_eq!(backend_app_name("/accedge"), "accedge");
        assert_eq!(backend_app_name("/grp/web"), "grp_web");
        assert_eq!(backend_app_name("/a b,c"), "a_b_c");
    }

    proptest::proptest! {
        /// Whatever the labels say, reading them never panics, and a port
        /// is exposed, unexposed or disabled on its own labels alone: the
        /// labels of other ports change nothing about it.
        #[test]
        fn ports_read_on_their_own(
            pairs in proptest::collection::vec(
                ("HAPROXY_[0-2]_(PORT|MODE|VHOST|PATH|BALANCE|STICKY|AUTH|GROUP|ENABLED|X)", ".{0,20}"),
                0..8,
            ),
        ) {
            let mut app: Labels = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            app.insert("HAPROXY_GROUP", "external");
            let before = parse_port(&app, 0);
            let only0: Labels = app
                .iter()
                .filter(|(k, _)| !k.starts_with("HAPROXY_1_") && !k.starts_with("HAPROXY_2_"))
                .collect();
            proptest::prop_assert_eq!(before, parse_port(&only0, 0));
        }
    }
}
