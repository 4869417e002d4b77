// skein's UI: one page per tab, each drawn from this node's own replica
// through the entry point, refreshed every 2 s. No dependencies.
"use strict";

const REFRESH_MS = 2000;
const $ = (sel) => document.querySelector(sel);

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function get(path) {
  const r = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (r.status === 401) {
    location.href = "/login";
    throw new Error("signed out");
  }
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
    const e = new Error(why);
    e.status = r.status;
    throw e;
  }
  return r.json();
}

function table(caption, heads, rows, empty) {
  if (!rows.length) return `<p class="muted">${esc(empty)}</p>`;
  const th = heads.map((h) => `<th scope="col"${h.num ? ' class="num"' : ""}>${esc(h.label ?? h)}</th>`).join("");
  const body = rows.map((r) => `<tr>${r.map((c, i) => `<td${heads[i].num ? ' class="num"' : ""}>${c}</td>`).join("")}</tr>`).join("");
  return `<table><caption>${esc(caption)}</caption><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
}

// Successes and failures per minute over the last hour, as bars.
function chart(perMinute) {
  if (!perMinute.length) return `<p class="muted">No connections in the last hour.</p>`;
  const now = Math.floor(Date.now() / 60000);
  const max = Math.max(1, ...perMinute.map((m) => m.successes + m.failures));
  const bars = perMinute.map((m) => {
    const x = 600 - (now - m.minute + 1) * 10;
    const hs = (m.successes / max) * 100, hf = (m.failures / max) * 100;
    return `<rect x="${x}" y="${110 - hs - hf}" width="8" height="${hs}" class="s"><title>${m.successes} successes</title></rect>` +
      `<rect x="${x}" y="${110 - hf}" width="8" height="${hf}" class="f"><title>${m.failures} failures</title></rect>`;
  }).join("");
  const total = perMinute.reduce((a, m) => [a[0] + m.successes, a[1] + m.failures], [0, 0]);
  return `<h2>The last hour, per minute</h2><figure><svg viewBox="0 0 600 120" role="img" aria-label="${total[0]} successes and ${total[1]} failures in the last hour">` +
    `<line x1="0" y1="110" x2="600" y2="110" class="axis"/>${bars}</svg>` +
    `<figcaption>${total[0]} successes, ${total[1]} failures in the last hour (green: successes, red: failures; now at the right)</figcaption></figure>`;
}

function state(ok, text) {
  return `<span class="${ok ? "ok" : "bad"}">${esc(text)}</span>`;
}

function uptime(s) {
  if (s == null) return '<span class="muted">unknown</span>';
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return esc(d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`);
}

const pages = {
  async nodes() {
    const h = await get("/system/health/v1");
    const rows = h.nodes.map((n) => [
      esc(n.node_id),
      esc(n.ip ?? ""),
      state(n.status === "alive", n.status),
      esc(n.version ?? ""),
      uptime(n.uptime_s),
      state(n.healthy, n.healthy ? "healthy" : "unhealthy") + (n.reason ? `<br><span class="muted">${esc(n.reason)}</span>` : ""),
      `<ul class="chips">${n.components.map((c) => `<li class="${c.healthy ? "ok" : "bad"}" title="${esc(c.reason)}">${esc(c.id)}: ${c.healthy ? "ok" : esc(c.reason)}</li>`).join("")}</ul>`,
    ]);
    return `<h2>Nodes</h2>` + table(
      `${h.nodes.length} node(s), as this node sees them; the cluster is ${h.healthy ? "healthy" : "not healthy"}`,
      ["Node", "Address", "Status", "Version", "Uptime", "Health", "Components"],
      rows, "No nodes known yet.");
  },

  async vips(arg) {
    const [vips, stats] = await Promise.all([get("/net/v1/vips"), get("/net/v1/vips/stats").catch(() => null)]);
    // dcos-net's name: `<app>.<framework>.l4lb.thisdcos.directory:<port>`.
    const key = (v) => v.vip;
    const statsOf = (name) => (stats || []).find((s) => s.vip === name);
    const pct = (o) => (o.successes + o.failures ? ((100 * o.failures) / (o.successes + o.failures)).toFixed(1) + " %" : "–");
    const ms = (v) => (v == null ? "–" : v >= 100 ? `${Math.round(v)} ms` : `${v} ms`);
    const note = stats ? "" : `<p class="muted">Connection counts are not measured on this node (no VIP dataplane, --vip-counts off, or conntrack cannot be read).</p>`;
    if (arg) {
      const v = vips.find((v) => key(v) === arg);
      if (!v) return `<h2>${esc(arg)}</h2><p class="error">No such service address (any more).</p><p><a href="#/vips">All service addresses</a></p>`;
      const st = statsOf(arg);
      const counted = (b) => st?.backends.find((x) => x.backend === `${b.ip}:${b.port}`);
      const heads = ["Backend", "Node", "Task", "Status", "In use"].concat(stats ? [{ label: "Successes (1 min)", num: 1 }, { label: "Failures (1 min)", num: 1 }, { label: "p99 connect (1 min)", num: 1 }, { label: "Failures (total)", num: 1 }] : []);
      const rows = v.backend.map((b) => {
        const c = counted(b);
        const row = [
          esc(`${b.ip}:${b.port}`), esc(b.node_id), esc(b.task_id),
          state(b.node_status === "alive" && b.healthy, b.node_status !== "alive" ? `node ${b.node_status}` : b.healthy ? "healthy" : "unhealthy"),
          b.in_use ? "yes" : "no",
        ];
        return stats ? row.concat([esc(c?.last_minute.successes ?? 0), esc(c?.last_minute.failures ?? 0), esc(ms(c?.connect_p99_ms)), esc(c?.total.failures ?? 0)]) : row;
      });
      return `<h2>${esc(arg)}</h2><p><a href="#/vips">All service addresses</a></p>
        <p>Address <strong>${esc(v.address ?? "not allocated yet")}</strong>, ${esc(v.protocol)}</p>` + note +
        table(`Backends of ${arg}`, heads, rows, "No backends.") + (st ? chart(st.per_minute) : "");
    }
    const heads = ["Name", "Address", "Protocol", "Backends"].concat(stats ? [{ label: "Successes", num: 1 }, { label: "Failures", num: 1 }, { label: "Failure %", num: 1 }, { label: "p99 connect", num: 1 }] : []);
    const rows = vips.map((v) => {
      const used = v.backend.filter((b) => b.in_use).length;
      const row = [
        `<a href="#/vips/${encodeURIComponent(key(v))}">${esc(key(v))}</a>`,
        esc(v.address ?? "not allocated yet"), esc(v.protocol),
        state(used > 0, `${used} of ${v.backend.length} in use`),
      ];
      const st = statsOf(key(v));
      const o = st?.last_minute ?? { successes: 0, failures: 0 };
      return stats ? row.concat([esc(o.successes), esc(o.failures), esc(pct(o)), esc(ms(st?.connect_p99_ms))]) : row;
    });
    return `<h2>Service Addresses</h2>` + note +
      table(`${vips.length} VIP(s)${stats ? "; connections from this node for the past minute" : ""}`, heads, rows, "No VIPs: give a task's port a VIP_0 label.");
  },

  async networks() {
    const [s, t] = await Promise.all([get("/overlay-master/state"), get("/skein/v1/tasks")]);
    const inSubnet = (ip, cidr) => {
      const [base, len] = cidr.split("/");
      const n = (a) => a.split(".").reduce((x, o) => x * 256 + Number(o), 0);
      if (!ip.includes(".") || !base.includes(".")) return false;
      const size = 2 ** (32 - Number(len));
      return Math.floor(n(ip) / size) === Math.floor(n(base) / size);
    };
    let out = `<h2>Networks</h2>`;
    for (const o of s.network.overlays) {
      const agents = s.agents.map((a) => {
        const mine = a.overlays.find((x) => x.info.name === o.name);
        return [esc(a.node_id), esc(a.ip), esc(mine?.subnet ?? "none"), esc(mine?.backend.vxlan.vtep_ip ?? ""), esc(mine?.backend.vxlan.vtep_mac ?? ""),
          state(a.state.status === "STATUS_OK", a.state.status.replace(/^STATUS_/, "").replace(/_/g, " ").toLowerCase()) + (a.state.error ? `<br><span class="muted">${esc(a.state.error)}</span>` : "")];
      });
      const attached = (t.tasks || []).filter((x) => inSubnet(x.ip, o.subnet)).map((x) => [esc(x.id), esc(x.app), esc(x.node_id), esc(x.ip)]);
      out += `<h2>${esc(o.name)} <span class="muted">${esc(o.subnet)}</span></h2>` +
        table(`Agents on ${o.name}`, ["Node", "Address", "Subnet", "VTEP", "VTEP MAC", "Status"], agents, "No agents.") +
        table(`Containers on ${o.name}`, ["Task", "App", "Node", "Address"], attached, "No containers attached.");
    }
    if (!s.network.overlays.length) out += `<p class="muted">No overlay networks configured.</p>`;
    return out;
  },

  async dns() {
    const rows = await get("/net/v1/records");
    const q = $("#q").value.trim().toLowerCase();
    const hits = rows.filter((r) => !q || `${r.name} ${r.type} ${r.rdata}`.toLowerCase().includes(q));
    return table(q ? `${hits.length} of ${rows.length} records match "${q}"` : `${rows.length} records`,
      ["Name", "Type", "Data"], hits.slice(0, 500).map((r) => [esc(r.name), esc(r.type), esc(r.rdata)]), "No records match.");
  },

  async edge() {
    let s;
    try {
      s = await get("/skein/v1/edge");
    } catch (e) {
      if (e.status === 503 || e.status === 502) return `<h2>Edge</h2><p class="muted">${esc(e.message)}</p>`;
      throw e;
    }
    const now = Date.now(), before = edgeSeen;
    edgeSeen = { at: now, req: Object.fromEntries(s.frontends.map((f) => [f.name, f.req_tot || f.stot])) };
    const rate = (f) => {
      if (!before || !(f.name in before.req)) return "…";
      const secs = (now - before.at) / 1000;
      return esc(Math.max(0, ((f.req_tot || f.stot) - before.req[f.name]) / secs).toFixed(1));
    };
    const fronts = s.frontends.map((f) => [esc(f.name), esc(f.bind), esc(f.mode), esc(f.scur), esc(f.stot), rate(f)]);
    let out = `<h2>Edge</h2><p>Routes version ${esc(s.version)}, ${esc(s.applied)} applied, ${esc(s.rejected)} rejected; source: ${esc(s.source)}</p>` +
      table("Frontends", ["Name", "Bind", "Mode", { label: "Current", num: 1 }, { label: "Total", num: 1 }, { label: "Req/s", num: 1 }], fronts, "No frontends.");
    for (const b of s.backends) {
      const servers = b.servers.map((x) => [esc(x.name), esc(x.addr), state(x.status === "UP", x.status), esc(x.scur), esc(x.stot), esc(x.econ + x.eresp)]);
      out += `<h2>${esc(b.name)} <span class="muted">${esc(b.mode)}, ${esc(b.balance)}${b.routes.length ? ", " + esc(b.routes.join(" ")) : ""}</span></h2>` +
        table(`Servers of ${b.name}`, ["Server", "Address", "Status", { label: "Current", num: 1 }, { label: "Total", num: 1 }, { label: "Errors", num: 1 }], servers, "No servers.");
    }
    if (s.problems.length) out += `<h2>Problems</h2><ul>${s.problems.map((p) => `<li>${esc(p)}</li>`).join("")}</ul>`;
    return out;
  },
};

let edgeSeen = null;
let timer = null;
// Each draw's number: only the latest one shows its page and schedules the
// next refresh (typing in the search or changing pages while a fetch is
// under way would otherwise start a second refresh loop).
let drawing = 0;
// The page as last drawn: a refresh that changes nothing leaves the DOM
// (and a keyboard user's focus, and a screen reader) alone.
let drawn = null;

// Replaces the page; the element that had focus in it (a link, by its
// href; a field, by its id) gets it back in the new one.
function show(html) {
  if (html === drawn) return;
  const page = $("#page");
  const f = document.activeElement;
  const mark = (el) => el.getAttribute("href") || el.id || null;
  const had = f && page.contains(f) ? mark(f) : null;
  page.innerHTML = html;
  drawn = html;
  if (had) {
    const again = [...page.querySelectorAll("a[href], [id]")].find((el) => mark(el) === had);
    if (again) again.focus();
  }
}

function route() {
  const [, page = "nodes", ...rest] = location.hash.split("/");
  return { page: pages[page] ? page : "nodes", arg: rest.length ? decodeURIComponent(rest.join("/")) : "" };
}

async function draw() {
  clearTimeout(timer);
  const mine = ++drawing;
  const { page, arg } = route();
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  $("#search").hidden = page !== "dns";
  try {
    const html = await pages[page](arg);
    if (mine !== drawing) return;
    if (route().page === page) show(html);
    $("#updated").textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`;
  } catch (e) {
    if (mine !== drawing) return;
    show(`<p class="error">Could not load this page: ${esc(e.message)}</p>`);
  }
  timer = setTimeout(draw, REFRESH_MS);
}

async function whoami() {
  try {
    const v = await get("/net/v1/version");
    $("#whoami").textContent = `${v.node_id} of cluster ${v.cluster_id}, skein ${v.version}`;
    document.title = `skein: ${v.node_id}`;
  } catch (_) { /* shown by the page */ }
}

window.addEventListener("hashchange", () => { edgeSeen = null; draw(); $("#main").focus(); });
$("#q").addEventListener("input", () => draw());
whoami();
draw();
