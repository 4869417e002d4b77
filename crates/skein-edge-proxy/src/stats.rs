//! The stats port: Marathon-LB's endpoints, Prometheus metrics, and the
//! status document `skein edge status` prints.
//!
//! Tools written for Marathon-LB (zdd, telegraf, haproxy_exporter) read
//! `/haproxy?stats;csv` by column name, so the CSV has HAProxy 2.6's exact
//! header (129 columns, as `haproxy` 2.6.12 prints it) with the counters
//! this proxy keeps filled in and the rest left empty, as HAProxy leaves
//! what does not apply.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use skein_edge::{Mode, ServerState};
use tokio::net::TcpListener;

use crate::proxy::RespBody;
use crate::state::{Counters, ServerRt, Table};
use crate::{Shared, APPLY_BUCKETS_MICROS};

/// HAProxy 2.6's `show stat` CSV header line (column names only).
pub(crate) const CSV_HEADER: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,";

/// `skein edge status`'s document (`/_skein/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: u64,
    pub pid: u32,
    pub source: String,
    pub applied: u64,
    pub rejected: u64,
    /// Why the last route set was rejected, while no newer one applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<String>,
    pub last_apply_micros: u64,
    pub frontends: Vec<FrontendStatus>,
    pub backends: Vec<BackendStatus>,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrontendStatus {
    pub name: String,
    pub bind: String,
    pub mode: String,
    pub scur: i64,
    pub stot: u64,
    pub req_tot: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub app: String,
    pub mode: String,
    pub balance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_port: Option<u16>,
    pub routes: Vec<String>,
    pub scur: i64,
    pub stot: u64,
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    pub addr: String,
    /// UP, DOWN, MAINT or DRAIN, as the CSV says.
    pub status: String,
    pub scur: i64,
    pub stot: u64,
    pub econ: u64,
    pub eresp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Frontend {
    name: String,
    bind: String,
    mode: Mode,
    c: Arc<Counters>,
}

fn frontends(shared: &Shared, table: &Table) -> Vec<Frontend> {
    let addrs = *shared.addrs.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = vec![
        Frontend {
            name: "marathon_http_in".into(),
            bind: addrs.http.to_string(),
            mode: Mode::Http,
            c: shared.http_fe.clone(),
        },
        Frontend {
            name: "marathon_https_in".into(),
            bind: addrs.https.to_string(),
            mode: Mode::Http,
            c: shared.https_fe.clone(),
        },
    ];
    let listeners = shared.listeners.lock().unwrap_or_else(|e| e.into_inner());
    for ((_, port), l) in &listeners.ports {
        let (name, mode) = match table.by_port.get(port) {
            Some(b) => (b.spec.name.to_string(), b.spec.labels.mode),
            None => (format!("port_{port}"), Mode::Tcp),
        };
        out.push(Frontend {
            name,
            bind: l.addr.to_string(),
            mode,
            c: l.counters.clone(),
        });
    }
    out.push(Frontend {
        name: "stats".into(),
        bind: addrs.stats.to_string(),
        mode: Mode::Http,
        c: shared.stats_fe.clone(),
    });
    out
}

fn columns() -> Vec<&'static str> {
    CSV_HEADER
        .trim_start_matches("# ")
        .trim_end_matches(',')
        .split(',')
        .collect()
}

type Row = BTreeMap<&'static str, String>;

fn counters_into(row: &mut Row, c: &Counters, http: bool, with_req_tot: bool) {
    let g = Counters::get;
    row.insert("qcur", "0".into());
    row.insert("qmax", "0".into());
    row.insert("scur", c.scur().to_string());
    row.insert("smax", c.smax.load(Ordering::Relaxed).to_string());
    row.insert("stot", g(&c.stot).to_string());
    row.insert("bin", g(&c.bin).to_string());
    row.insert("bout", g(&c.bout).to_string());
    if http {
        let names = [
            "hrsp_1xx",
            "hrsp_2xx",
            "hrsp_3xx",
            "hrsp_4xx",
            "hrsp_5xx",
            "hrsp_other",
        ];
        for (i, n) in names.iter().enumerate() {
            row.insert(n, g(&c.hrsp[i]).to_string());
        }
        if with_req_tot {
            row.insert("req_tot", g(&c.req_tot).to_string());
        }
    }
}

fn server_row(
    rt: &ServerRt,
    mode: Mode,
    sticky: bool,
    now: Instant,
    iid: usize,
    sid: usize,
) -> Row {
    let mut row = Row::new();
    row.insert("pxname", rt.backend.clone());
    row.insert("svname", rt.name.clone());
    counters_into(&mut row, &rt.c, mode == Mode::Http, false);
    let g = Counters::get;
    row.insert("econ", g(&rt.c.econ).to_string());
    row.insert("eresp", g(&rt.c.eresp).to_string());
    row.insert("wretr", g(&rt.c.wretr).to_string());
    row.insert("wredis", "0".into());
    let status = rt.status_word(now);
    row.insert("status", status.into());
    let up = status == "UP";
    row.insert("weight", if up { "1" } else { "0" }.into());
    row.insert("act", "1".into());
    row.insert("bck", "0".into());
    row.insert("chkfail", g(&rt.c.ejections).to_string());
    row.insert("chkdown", g(&rt.c.ejections).to_string());
    let lastchg = unix_now().saturating_sub(rt.lastchg.load(Ordering::Relaxed));
    row.insert("lastchg", lastchg.to_string());
    row.insert("pid", "1".into());
    row.insert("iid", iid.to_string());
    row.insert("sid", sid.to_string());
    row.insert("lbtot", g(&rt.c.stot).to_string());
    row.insert("type", "2".into());
    row.insert("check_status", rt.check_status(now).into());
    row.insert("addr", rt.addr.to_string());
    if sticky {
        row.insert("cookie", rt.cookie.clone());
    }
    row.insert("mode", mode.to_string());
    row.insert("uweight", if up { "1" } else { "0" }.into());
    row
}

/// The `/haproxy?stats;csv` document.
pub(crate) fn csv(shared: &Shared) -> String {
    let table = shared.table.load_full();
    let cols = columns();
    let mut out = String::with_capacity(4096);
    out.push_str(CSV_HEADER);
    out.push('\n');
    let mut emit = |row: &Row| {
        for c in &cols {
            if let Some(v) = row.get(c) {
                out.push_str(&v.replace(',', ";"));
            }
            out.push(',');
        }
        out.push('\n');
    };
    let mut iid = 0;
    for fe in frontends(shared, &table) {
        iid += 1;
        let mut row = Row::new();
        row.insert("pxname", fe.name);
        row.insert("svname", "FRONTEND".into());
        counters_into(&mut row, &fe.c, fe.mode == Mode::Http, true);
        row.insert("slim", String::new());
        row.insert("status", "OPEN".into());
        row.insert("pid", "1".into());
        row.insert("iid", iid.to_string());
        row.insert("sid", "0".into());
        row.insert("type", "0".into());
        row.insert("mode", fe.mode.to_string());
        row.insert("conn_tot", Counters::get(&fe.c.stot).to_string());
        emit(&row);
    }
    let now = Instant::now();
    let draining = shared.registry.draining();
    for (name, b) in &table.backends {
        iid += 1;
        let mode = b.spec.labels.mode;
        let mut sid = 0;
        let mut ups = 0;
        for s in &b.servers {
            sid += 1;
            let row = server_row(&s.rt, mode, b.spec.labels.sticky, now, iid, sid);
            if row.get("status").map(String::as_str) == Some("UP") {
                ups += 1;
            }
            emit(&row);
        }
        for rt in draining.iter().filter(|rt| *rt.backend == **name) {
            sid += 1;
            emit(&server_row(rt, mode, b.spec.labels.sticky, now, iid, sid));
        }
        let mut row = Row::new();
        row.insert("pxname", name.to_string());
        row.insert("svname", "BACKEND".into());
        counters_into(&mut row, &b.rt.c, mode == Mode::Http, true);
        let g = Counters::get;
        row.insert("econ", g(&b.rt.c.econ).to_string());
        row.insert("eresp", g(&b.rt.c.eresp).to_string());
        row.insert("wretr", g(&b.rt.c.wretr).to_string());
        row.insert("wredis", "0".into());
        row.insert("status", if ups > 0 { "UP" } else { "DOWN" }.into());
        row.insert("weight", ups.to_string());
        row.insert("act", ups.to_string());
        row.insert("bck", "0".into());
        row.insert("pid", "1".into());
        row.insert("iid", iid.to_string());
        row.insert("sid", "0".into());
        row.insert("lbtot", g(&b.rt.c.stot).to_string());
        row.insert("type", "1".into());
        row.insert("mode", mode.to_string());
        row.insert("algo", b.spec.labels.balance.to_string());
        if b.spec.labels.sticky {
            row.insert("cookie", crate::proxy::STICKY_COOKIE.into());
        }
        row.insert("uweight", ups.to_string());
        emit(&row);
    }
    // Servers draining from backends that are gone altogether.
    for rt in draining
        .iter()
        .filter(|rt| !table.backends.contains_key(rt.backend.as_str()))
    {
        iid += 1;
        emit(&server_row(rt, Mode::Tcp, false, now, iid, 1));
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `/haproxy?stats` page: the CSV's main columns as HTML tables.
pub(crate) fn html(shared: &Shared) -> String {
    let csv = csv(shared);
    let mut lines = csv.lines();
    let cols: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let shown = [
        "svname",
        "status",
        "scur",
        "smax",
        "stot",
        "bin",
        "bout",
        "econ",
        "eresp",
        "wretr",
        "hrsp_2xx",
        "hrsp_3xx",
        "hrsp_4xx",
        "hrsp_5xx",
        "lastchg",
        "check_status",
        "addr",
    ];
    let idx: Vec<usize> = shown
        .iter()
        .filter_map(|n| cols.iter().position(|c| c == n))
        .collect();
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><head><title>Statistics Report for skein edge</title>\n\
         <style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;margin-bottom:1em}\
         td,th{border:1px solid #999;padding:2px 6px;text-align:right}th{background:#ddd}\
         td:first-child{text-align:left}.UP{background:#c0ffc0}.DOWN{background:#ffc0c0}\
         .MAINT{background:#c0c0ff}.DRAIN{background:#ffe0a0}</style></head><body>\n",
    );
    let _ = writeln!(
        out,
        "<h1>skein edge</h1><p>pid {}, routes version {}</p>",
        std::process::id(),
        shared.table.load().version
    );
    let mut current = String::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let px = fields.first().copied().unwrap_or_default();
        if px != current {
            if !current.is_empty() {
                out.push_str("</table>\n");
            }
            current = px.to_string();
            let _ = writeln!(out, "<h2>{}</h2><table><tr>", html_escape(px));
            for n in &shown {
                let _ = write!(out, "<th>{n}</th>");
            }
            out.push_str("</tr>\n");
        }
        let status = idx
            .get(1)
            .and_then(|i| fields.get(*i))
            .copied()
            .unwrap_or_default();
        let _ = write!(out, "<tr class=\"{}\">", html_escape(status));
        for i in &idx {
            let _ = write!(
                out,
                "<td>{}</td>",
                html_escape(fields.get(*i).copied().unwrap_or_default())
            );
        }
        out.push_str("</tr>\n");
    }
    if !current.is_empty() {
        out.push_str("</table>\n");
    }
    // What is not served, and why: labels, conflicts lost, ports refused.
    let table = shared.table.load();
    let problems: Vec<String> = table
        .problems
        .iter()
        .map(|p| p.to_string())
        .chain(table.local_problems.iter().cloned())
        .collect();
    if !problems.is_empty() {
        out.push_str("<h2>Problems</h2><ul class=\"problems\">\n");
        for p in &problems {
            let _ = writeln!(out, "<li>{}</li>", html_escape(p));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// `/_haproxy_getconfig`: the routes in use, rendered as the HAProxy
/// configuration Marathon-LB would have written for them.
pub(crate) fn config(shared: &Shared) -> String {
    let table = shared.table.load_full();
    let addrs = *shared.addrs.lock().unwrap_or_else(|e| e.into_inner());
    let t = &shared.cfg.timeouts;
    let mut out = String::new();
    let _ = writeln!(out, "# skein edge, routes version {}", table.version);
    let _ = writeln!(
        out,
        "defaults\n  timeout connect {}ms\n  timeout client {}ms\n  timeout server {}ms\n  timeout tunnel {}ms\n  option forwardfor\n  option redispatch\n  retries 3\n",
        t.connect.as_millis(),
        t.client.as_millis(),
        t.server.as_millis(),
        t.tunnel.as_millis()
    );
    let _ = writeln!(
        out,
        "frontend marathon_http_in\n  bind {}\n  mode http",
        addrs.http
    );
    for (i, r) in table.http_routes.iter().enumerate() {
        let name = &r.backend.spec.name;
        let mut conds = Vec::new();
        if let Some(h) = &r.host {
            match h.strip_prefix("*.") {
                Some(d) => {
                    let _ = writeln!(
                        out,
                        "  acl host_{i} hdr(host),lower,regsub(:.*$,) -m end .{d}"
                    );
                }
                None => {
                    let _ = writeln!(out, "  acl host_{i} hdr(host),lower,regsub(:.*$,) -i {h}");
                }
            }
            conds.push(format!("host_{i}"));
        }
        if let Some(p) = &r.path {
            let _ = writeln!(out, "  acl path_{i} path_beg {p}");
            conds.push(format!("path_{i}"));
        }
        if r.backend.spec.labels.redirect_to_https {
            let _ = writeln!(
                out,
                "  redirect scheme https code 301 if !{{ ssl_fc }} {}",
                conds.join(" ")
            );
        }
        let _ = writeln!(out, "  use_backend {name} if {}", conds.join(" "));
    }
    let mut crts: Vec<&str> = Vec::new();
    for b in table.backends.values() {
        for c in &b.spec.labels.ssl_certs {
            if !crts.contains(&c.as_str()) {
                crts.push(c);
            }
        }
    }
    let crt_text: String = crts.iter().map(|c| format!(" crt {c}")).collect();
    let _ = writeln!(
        out,
        "\nfrontend marathon_https_in\n  bind {} ssl{crt_text}\n  mode http",
        addrs.https
    );
    for (i, r) in table.http_routes.iter().enumerate() {
        let name = &r.backend.spec.name;
        let mut conds = Vec::new();
        if let Some(h) = &r.host {
            let _ = writeln!(out, "  acl host_{i} ssl_fc_sni -i {h}");
            conds.push(format!("host_{i}"));
        }
        if let Some(p) = &r.path {
            let _ = writeln!(out, "  acl path_{i} path_beg {p}");
            conds.push(format!("path_{i}"));
        }
        let _ = writeln!(out, "  use_backend {name} if {}", conds.join(" "));
    }
    let mut ports: Vec<(&u16, &Arc<crate::state::BackendEntry>)> = table.by_port.iter().collect();
    ports.sort_by_key(|(p, _)| **p);
    for (port, b) in ports {
        let ip = b.spec.labels.bind_addr.unwrap_or(shared.cfg.bind);
        let _ = writeln!(
            out,
            "\nfrontend {}\n  bind {}\n  mode {}\n  use_backend {}",
            b.spec.name,
            std::net::SocketAddr::new(ip, *port),
            b.spec.labels.mode,
            b.spec.name
        );
    }
    for b in table.backends.values() {
        let l = &b.spec.labels;
        let _ = writeln!(
            out,
            "\nbackend {}\n  balance {}\n  mode {}",
            b.spec.name, l.balance, l.mode
        );
        if l.mode == Mode::Http {
            out.push_str("  option forwardfor\n  http-request set-header X-Forwarded-Port %[dst_port]\n  http-request add-header X-Forwarded-Proto https if { ssl_fc }\n");
        }
        if let Some(p) = &l.proxypass_path {
            let _ = writeln!(out, "  http-request set-path %[path,regsub(^{p},/)]");
        }
        if let Some(a) = &l.auth {
            let _ = writeln!(
                out,
                "  acl auth_ok http_auth(user_{}) # realm {:?}, user {}",
                b.spec.name, a.realm, a.user
            );
            let _ = writeln!(out, "  http-request auth realm \"{}\" if !auth_ok", a.realm);
        }
        if l.sticky {
            let _ = writeln!(
                out,
                "  cookie {} insert indirect nocache",
                crate::proxy::STICKY_COOKIE
            );
        }
        for s in &b.servers {
            let state = match s.spec.state {
                ServerState::Up => "",
                ServerState::Unhealthy => " # unhealthy",
                ServerState::NodeDown => " disabled # node down",
            };
            let cookie = if l.sticky {
                format!(" cookie {}", s.rt.cookie)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  server {} {} check{cookie}{state}",
                s.spec.name(),
                s.spec.addr
            );
        }
    }
    out
}

/// `/_haproxy_getvhostmap`: `<vhost> <backend>`, first route per host.
pub(crate) fn vhost_map(shared: &Shared) -> String {
    let table = shared.table.load_full();
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for r in &table.http_routes {
        if let Some(h) = &r.host {
            if seen.insert(h.clone()) {
                let _ = writeln!(out, "{h} {}", r.backend.spec.name);
            }
        }
    }
    out
}

/// `/_haproxy_getappmap`: `<app id> <backend>`.
pub(crate) fn app_map(shared: &Shared) -> String {
    let table = shared.table.load_full();
    let mut out = String::new();
    for b in table.backends.values() {
        let _ = writeln!(out, "{} {}", b.spec.app, b.spec.name);
    }
    out
}

fn label_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics`: Prometheus text.
pub(crate) fn metrics(shared: &Shared) -> String {
    let table = shared.table.load_full();
    let mut out = String::new();
    let g = Counters::get;
    let a = &shared.apply;
    let _ = writeln!(out, "# HELP skein_edge_route_version Version of the route set in use.\n# TYPE skein_edge_route_version gauge\nskein_edge_route_version {}", table.version);
    let _ = writeln!(out, "# HELP skein_edge_route_applies_total Route sets applied.\n# TYPE skein_edge_route_applies_total counter\nskein_edge_route_applies_total {}", g(&a.count));
    let _ = writeln!(out, "# HELP skein_edge_route_rejects_total Route sets rejected (the previous stayed).\n# TYPE skein_edge_route_rejects_total counter\nskein_edge_route_rejects_total {}", g(&a.rejected));
    let _ = writeln!(out, "# HELP skein_edge_route_apply_last_seconds Time the last route apply took.\n# TYPE skein_edge_route_apply_last_seconds gauge\nskein_edge_route_apply_last_seconds {}", g(&a.last_micros) as f64 / 1e6);
    out.push_str("# HELP skein_edge_route_apply_seconds Time to apply a route set (compile, swap, ports, certificates).\n# TYPE skein_edge_route_apply_seconds histogram\n");
    for (i, le) in APPLY_BUCKETS_MICROS.iter().enumerate() {
        let _ = writeln!(
            out,
            "skein_edge_route_apply_seconds_bucket{{le=\"{}\"}} {}",
            *le as f64 / 1e6,
            g(&a.buckets[i])
        );
    }
    let _ = writeln!(
        out,
        "skein_edge_route_apply_seconds_bucket{{le=\"+Inf\"}} {}",
        g(&a.count)
    );
    let _ = writeln!(
        out,
        "skein_edge_route_apply_seconds_sum {}",
        g(&a.sum_micros) as f64 / 1e6
    );
    let _ = writeln!(out, "skein_edge_route_apply_seconds_count {}", g(&a.count));

    let fes = frontends(shared, &table);
    out.push_str("# HELP skein_edge_frontend_connections Open client connections per frontend.\n# TYPE skein_edge_frontend_connections gauge\n");
    for f in &fes {
        let _ = writeln!(
            out,
            "skein_edge_frontend_connections{{frontend=\"{}\"}} {}",
            label_escape(&f.name),
            f.c.scur()
        );
    }
    out.push_str("# HELP skein_edge_frontend_connections_total Client connections accepted per frontend.\n# TYPE skein_edge_frontend_connections_total counter\n");
    for f in &fes {
        let _ = writeln!(
            out,
            "skein_edge_frontend_connections_total{{frontend=\"{}\"}} {}",
            label_escape(&f.name),
            g(&f.c.stot)
        );
    }
    out.push_str("# HELP skein_edge_frontend_requests_total HTTP requests per frontend.\n# TYPE skein_edge_frontend_requests_total counter\n");
    for f in fes.iter().filter(|f| f.mode == Mode::Http) {
        let _ = writeln!(
            out,
            "skein_edge_frontend_requests_total{{frontend=\"{}\"}} {}",
            label_escape(&f.name),
            g(&f.c.req_tot)
        );
    }
    out.push_str("# HELP skein_edge_backend_responses_total HTTP responses per backend and status class.\n# TYPE skein_edge_backend_responses_total counter\n");
    for (name, b) in &table.backends {
        if b.spec.labels.mode == Mode::Http {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx", "other"]
                .iter()
                .enumerate()
            {
                let _ = writeln!(
                    out,
                    "skein_edge_backend_responses_total{{backend=\"{}\",code=\"{class}\"}} {}",
                    label_escape(name),
                    g(&b.rt.c.hrsp[i])
                );
            }
        }
    }
    type Metric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Counters) -> f64,
    );
    let per: [Metric; 6] = [
        (
            "skein_edge_server_sessions",
            "gauge",
            "Requests in flight or connections open per server.",
            |c| c.scur() as f64,
        ),
        (
            "skein_edge_server_sessions_total",
            "counter",
            "Requests or connections per server.",
            |c| c.stot.load(Ordering::Relaxed) as f64,
        ),
        (
            "skein_edge_server_connect_errors_total",
            "counter",
            "Failed connects per server.",
            |c| c.econ.load(Ordering::Relaxed) as f64,
        ),
        (
            "skein_edge_server_response_errors_total",
            "counter",
            "Failed or timed-out responses per server.",
            |c| c.eresp.load(Ordering::Relaxed) as f64,
        ),
        (
            "skein_edge_server_retries_total",
            "counter",
            "Requests or connections sent to this server after another failed to connect.",
            |c| c.wretr.load(Ordering::Relaxed) as f64,
        ),
        (
            "skein_edge_server_ejections_total",
            "counter",
            "Times this server was taken out for 10 s after 3 connect failures.",
            |c| c.ejections.load(Ordering::Relaxed) as f64,
        ),
    ];
    let draining = shared.registry.draining();
    for (metric, kind, help, f) in per {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, b) in &table.backends {
            for s in &b.servers {
                let _ = writeln!(
                    out,
                    "{metric}{{backend=\"{}\",server=\"{}\"}} {}",
                    label_escape(name),
                    label_escape(&s.spec.name()),
                    f(&s.rt.c)
                );
            }
        }
        for rt in &draining {
            let _ = writeln!(
                out,
                "{metric}{{backend=\"{}\",server=\"{}\"}} {}",
                label_escape(&rt.backend),
                label_escape(&rt.name),
                f(&rt.c)
            );
        }
    }
    out.push_str("# HELP skein_edge_backend_requests_total Requests (HTTP) or connections (TCP) per backend.\n# TYPE skein_edge_backend_requests_total counter\n");
    for (name, b) in &table.backends {
        let v = if b.spec.labels.mode == Mode::Http {
            g(&b.rt.c.req_tot)
        } else {
            g(&b.rt.c.stot)
        };
        let _ = writeln!(
            out,
            "skein_edge_backend_requests_total{{backend=\"{}\"}} {v}",
            label_escape(name)
        );
    }
    out.push_str("# HELP skein_edge_backend_retries_total Retries to another server after a connect failure.\n# TYPE skein_edge_backend_retries_total counter\n");
    for (name, b) in &table.backends {
        let _ = writeln!(
            out,
            "skein_edge_backend_retries_total{{backend=\"{}\"}} {}",
            label_escape(name),
            g(&b.rt.c.wretr)
        );
    }
    out
}

/// The status document.
pub(crate) fn status(shared: &Shared) -> StatusDoc {
    let table = shared.table.load_full();
    let now = Instant::now();
    let frontends = frontends(shared, &table)
        .into_iter()
        .map(|f| FrontendStatus {
            name: f.name,
            bind: f.bind,
            mode: f.mode.to_string(),
            scur: f.c.scur(),
            stot: Counters::get(&f.c.stot),
            req_tot: Counters::get(&f.c.req_tot),
        })
        .collect();
    let draining = shared.registry.draining();
    let server = |rt: &ServerRt| ServerStatus {
        name: rt.name.clone(),
        addr: rt.addr.to_string(),
        status: rt.status_word(now).to_string(),
        scur: rt.c.scur(),
        stot: Counters::get(&rt.c.stot),
        econ: Counters::get(&rt.c.econ),
        eresp: Counters::get(&rt.c.eresp),
    };
    let backends = table
        .backends
        .values()
        .map(|b| {
            let routes = table
                .http_routes
                .iter()
                .filter(|r| Arc::ptr_eq(&r.backend, b))
                .map(|r| {
                    format!(
                        "{}{}",
                        r.host.as_deref().unwrap_or("*"),
                        r.path.as_deref().unwrap_or("")
                    )
                })
                .collect();
            let mut servers: Vec<ServerStatus> = b.servers.iter().map(|s| server(&s.rt)).collect();
            servers.extend(
                draining
                    .iter()
                    .filter(|rt| *rt.backend == *b.spec.name)
                    .map(|rt| server(rt)),
            );
            BackendStatus {
                name: b.spec.name.to_string(),
                app: b.spec.app.to_string(),
                mode: b.spec.labels.mode.to_string(),
                balance: b.spec.labels.balance.to_string(),
                bind_port: table
                    .by_port
                    .iter()
                    .find(|(_, e)| Arc::ptr_eq(e, b))
                    .map(|(p, _)| *p),
                routes,
                scur: b.rt.c.scur(),
                stot: Counters::get(&b.rt.c.stot),
                servers,
            }
        })
        .collect();
    let mut problems: Vec<String> = table.problems.iter().map(|p| p.to_string()).collect();
    problems.extend(table.local_problems.iter().cloned());
    problems.extend(
        shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .values()
            .cloned(),
    );
    StatusDoc {
        version: table.version,
        pid: std::process::id(),
        source: shared
            .source_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        applied: Counters::get(&shared.apply.count),
        rejected: Counters::get(&shared.apply.rejected),
        last_rejection: shared
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        last_apply_micros: Counters::get(&shared.apply.last_micros),
        frontends,
        backends,
        problems,
    }
}

fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `skein edge status`'s tables.
pub fn print_status(doc: &StatusDoc) -> String {
    let mut out = format!(
        "edge pid {}, routes version {} ({} applied, {} rejected, last apply {} µs)\nsource: {}\n",
        doc.pid, doc.version, doc.applied, doc.rejected, doc.last_apply_micros, doc.source
    );
    if let Some(r) = &doc.last_rejection {
        let _ = writeln!(out, "last route set REJECTED: {r}");
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = doc
        .frontends
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.bind.clone(),
                f.mode.clone(),
                f.scur.to_string(),
                f.stot.to_string(),
                f.req_tot.to_string(),
            ]
        })
        .collect();
    out.push_str(&table_text(
        &["FRONTEND", "BIND", "MODE", "CONNS", "TOTAL", "REQUESTS"],
        &rows,
    ));
    out.push('\n');
    let mut rows = Vec::new();
    for b in &doc.backends {
        let ups = b.servers.iter().filter(|s| s.status == "UP").count();
        rows.push(vec![
            b.name.clone(),
            b.mode.clone(),
            b.balance.clone(),
            b.bind_port.map_or("-".into(), |p| p.to_string()),
            if b.routes.is_empty() {
                "-".into()
            } else {
                b.routes.join(",")
            },
            format!("{ups}/{}", b.servers.len()),
            b.scur.to_string(),
            b.stot.to_string(),
        ]);
    }
    out.push_str(&table_text(
        &[
            "BACKEND", "MODE", "BALANCE", "PORT", "ROUTES", "UP", "CUR", "TOTAL",
        ],
        &rows,
    ));
    out.push('\n');
    let mut rows = Vec::new();
    for b in &doc.backends {
        for s in &b.servers {
            rows.push(vec![
                b.name.clone(),
                s.name.clone(),
                s.addr.clone(),
                s.status.clone(),
                s.scur.to_string(),
                s.stot.to_string(),
                s.econ.to_string(),
                s.eresp.to_string(),
            ]);
        }
    }
    out.push_str(&table_text(
        &[
            "BACKEND", "SERVER", "ADDRESS", "STATUS", "CUR", "TOTAL", "ECON", "ERESP",
        ],
        &rows,
    ));
    if !doc.problems.is_empty() {
        out.push_str("\nproblems:\n");
        for p in &doc.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<RespBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    shared.stats_fe.req_tot.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let text = "text/plain; charset=utf-8";
    let resp = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/haproxy") if query.starts_with("stats;csv") => {
            reply(StatusCode::OK, "text/csv; charset=utf-8", csv(&shared))
        }
        (&Method::GET | &Method::HEAD, "/haproxy") if query.starts_with("stats") => {
            reply(StatusCode::OK, "text/html; charset=utf-8", html(&shared))
        }
        (_, "/_haproxy_health_check") => reply(StatusCode::OK, text, "OK\n".into()),
        (_, "/_haproxy_getconfig") => reply(StatusCode::OK, text, config(&shared)),
        (_, "/_haproxy_getvhostmap") => reply(StatusCode::OK, text, vhost_map(&shared)),
        (_, "/_haproxy_getappmap") => reply(StatusCode::OK, text, app_map(&shared)),
        (_, "/_haproxy_getpids") => {
            reply(StatusCode::OK, text, format!("{}\n", std::process::id()))
        }
        (_, "/_mlb_signal/hup") | (_, "/_mlb_signal/usr1") => {
            tracing::info!(signal = path, "re-fetching routes on request");
            shared.refetch.notify_one();
            reply(
                StatusCode::OK,
                text,
                "Sent SIGHUP signal to marathon-lb\n".replace(
                    "SIGHUP",
                    if path.ends_with("usr1") {
                        "SIGUSR1"
                    } else {
                        "SIGHUP"
                    },
                ),
            )
        }
        (_, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics(&shared),
        ),
        (_, "/_skein/status") => match serde_json::to_string_pretty(&status(&shared)) {
            Ok(s) => reply(StatusCode::OK, "application/json", s),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, e.to_string()),
        },
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n".into()),
    };
    shared.stats_fe.status(resp.status().as_u16());
    Ok(resp)
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the stats port");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _session =
                crate::state::Session::open(crate::state::CounterSet::of(&[&shared.stats_fe]));
            let svc = {
                let shared = shared.clone();
                service_fn(move |req| handle(shared.clone(), req))
            };
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(shared.cfg.timeouts.client);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "stats connection ended");
            }
        });
    }
}
