// The Switchyard dashboard: reads the admin API's live stats (`GET /events`, server-sent events,
// read with fetch so that a bearer token can be sent) and its dead letters, and draws them.
// Everything a client or an operator wrote (route names, reasons, bodies) is put in as text,
// never as markup.
'use strict';

const KEEP_SECONDS = 300;   // the traffic chart's span
const RATE_WINDOW = 10;     // seconds behind the rates and percentiles of the tiles and table
const SPARK_SECONDS = 60;   // the routes' sparklines
const TOKEN_KEY = 'switchyard-admin-token';

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let bounds = [];
const snapshots = [];       // {t, routes: Map(route -> {requests, s5, counts}), total, errors, p99}
let deadTick = 0;
const armed = new Set();    // dead letters whose delete button was clicked once

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function headers() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function needToken() {
  $('login').hidden = false;
  $('live').textContent = 'token needed';
  $('live').classList.add('off');
}

async function api(path, method = 'GET') {
  const r = await fetch(path, { method, headers: headers() });
  if (r.status === 401) {
    needToken();
    throw new Error('unauthorized');
  }
  const body = await r.json().catch(() => ({}));
  return { status: r.status, body };
}

// ---- formatting ------------------------------------------------------------------------------

function fmtRate(v) {
  if (v === null || Number.isNaN(v)) return '–';
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 10) return v.toFixed(0);
  return v.toFixed(v === 0 ? 0 : 1);
}

function fmtSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return '–';
  if (s < 0.001) return `${(s * 1000).toFixed(2)} ms`;
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  return `${s.toFixed(2)} s`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function fmtPercent(v) {
  if (v === null || Number.isNaN(v)) return '–';
  if (v === 0) return '0 %';
  return v < 0.001 ? '<0.1 %' : `${(v * 100).toFixed(1)} %`;
}

function ago(iso) {
  if (!iso) return '';
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

// ---- the numbers -----------------------------------------------------------------------------

// The q-quantile of a histogram's counts (per bucket, not cumulative), interpolated within its
// bucket as Prometheus's histogram_quantile does.
function quantile(q, counts) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const target = q * total;
  let cum = 0;
  for (let i = 0; i < counts.length; i++) {
    if (cum + counts[i] >= target && counts[i] > 0) {
      const lower = i === 0 ? 0 : bounds[i - 1];
      if (i >= bounds.length) return lower; // the +Inf bucket
      return lower + (bounds[i] - lower) * ((target - cum) / counts[i]);
    }
    cum += counts[i];
  }
  return bounds[bounds.length - 1];
}

// The snapshot about `seconds` before the latest (the oldest one kept if none is that old);
// with `routes`, only one that has the routes' counts (not a sample of the history).
function behind(seconds, routes = false) {
  const last = snapshots[snapshots.length - 1];
  const usable = (s) => s !== last && (!routes || s.routes);
  for (let i = snapshots.length - 2; i >= 0; i--) {
    if (last.t - snapshots[i].t >= seconds * 1000 && usable(snapshots[i])) return snapshots[i];
  }
  return snapshots.find(usable) || null;
}

function delta(now, then, route) {
  const a = now.routes.get(route);
  const b = then && then.routes && then.routes.get(route);
  if (!a) return null;
  const zero = { requests: 0, s5: 0, counts: a.counts.map(() => 0) };
  const base = b || zero;
  return {
    requests: a.requests - base.requests,
    s5: a.s5 - base.s5,
    counts: a.counts.map((c, i) => c - (base.counts[i] || 0)),
  };
}

// Per-second values of `f(a, b)` over the last `seconds`, from consecutive snapshots (a pair
// for which `f` has no value, null, is left out).
function series(seconds, f) {
  const out = [];
  const last = snapshots[snapshots.length - 1];
  for (let i = 1; i < snapshots.length; i++) {
    const a = snapshots[i - 1], b = snapshots[i];
    if (last.t - b.t > seconds * 1000) continue;
    const dt = (b.t - a.t) / 1000;
    const v = f(a, b);
    if (v !== null) out.push(dt > 0 ? v / dt : 0);
  }
  return out;
}

function record(s) {
  bounds = s.latency_bounds;
  const routes = new Map();
  let total = 0, errors = 0;
  const all = new Array(bounds.length + 1).fill(0);
  for (const r of s.routes) {
    routes.set(r.route, { requests: r.requests, s5: r.status['5xx'], counts: r.latency });
    total += r.requests;
    errors += r.status['5xx'];
    r.latency.forEach((c, i) => { all[i] += c; });
  }
  snapshots.push({ t: s.at_ms, routes, total, errors, all });
  trim();
}

// The gateway's own history of the last minutes, drawn at once (whole-gateway totals only).
async function seed() {
  try {
    const r = await api('/stats/history');
    if (r.status !== 200 || snapshots.length) return;
    bounds = r.body.latency_bounds;
    for (const h of r.body.samples) {
      snapshots.push({ t: h.at_ms, routes: null, total: h.requests, errors: h.errors, all: h.latency });
    }
  } catch { /* the live stream still runs */ }
}

function trim() {
  while (snapshots.length > 2 && snapshots[snapshots.length - 1].t - snapshots[0].t > (KEEP_SECONDS + 5) * 1000) {
    snapshots.shift();
  }
}

// ---- drawing ---------------------------------------------------------------------------------

function spark(node, values) {
  node.replaceChildren();
  if (values.length < 2) return;
  const max = Math.max(...values, 1e-9);
  const w = 120, h = 30;
  const pts = values.map((v, i) => `${(i / (values.length - 1)) * w},${h - 2 - (v / max) * (h - 4)}`);
  node.append(svg('polyline', { points: pts.join(' ') }));
}

// The chart's span: what is kept, at least a minute, at most KEEP_SECONDS.
function span() {
  if (snapshots.length < 2) return 60;
  const have = (snapshots[snapshots.length - 1].t - snapshots[0].t) / 1000;
  return Math.min(KEEP_SECONDS, Math.max(60, Math.ceil(have / 60) * 60));
}

function area(values, max, w, h, cls) {
  if (values.length < 2) return null;
  const step = w / (span() - 1);
  const x0 = w - (values.length - 1) * step;
  const pts = values.map((v, i) => `${x0 + i * step},${h - (v / max) * (h - 12)}`);
  return svg('path', { d: `M${x0},${h} L${pts.join(' L')} L${w},${h} Z`, class: cls });
}

function drawChart() {
  const node = $('chart');
  node.replaceChildren();
  const w = 800, h = 180;
  const seconds = span();
  $('window-label').textContent = seconds >= 120 ? `last ${seconds / 60} minutes` : 'last minute';
  const rate = series(seconds, (a, b) => b.total - a.total);
  const errs = series(seconds, (a, b) => b.errors - a.errors);
  const max = Math.max(...rate, ...errs, 1) * 1.15;
  for (const f of [0.5, 1]) {
    const y = h - f * (h - 12);
    node.append(svg('line', { x1: 0, x2: w, y1: y, y2: y, class: 'grid' }));
    const label = svg('text', { x: 4, y: y - 3 });
    label.textContent = `${fmtRate(max * f)}/s`;
    node.append(label);
  }
  node.append(svg('line', { x1: 0, x2: w, y1: h - 0.5, y2: h - 0.5, class: 'grid' }));
  for (const [values, cls] of [[rate, 'ok'], [errs, 'err']]) {
    const p = area(values, max, w, h, cls);
    if (p) node.append(p);
  }
}

function renderTiles(stats) {
  const now = snapshots[snapshots.length - 1];
  const then = behind(RATE_WINDOW);
  let rate = null, errRate = null, p99 = null;
  if (then) {
    const dt = (now.t - then.t) / 1000;
    const n = now.total - then.total;
    rate = dt > 0 ? n / dt : 0;
    errRate = n > 0 ? (now.errors - then.errors) / n : 0;
    p99 = quantile(0.99, now.all.map((c, i) => c - then.all[i]));
  }
  $('t-rate').textContent = fmtRate(rate);
  $('t-errors').textContent = fmtPercent(errRate);
  $('t-errors').classList.toggle('bad', errRate > 0);
  $('t-p99').textContent = fmtSeconds(p99);
  spark($('s-rate'), series(SPARK_SECONDS, (a, b) => b.total - a.total));
  spark($('s-errors'), series(SPARK_SECONDS, (a, b) => b.errors - a.errors));
  const p99s = [];
  for (let i = Math.max(1, snapshots.length - SPARK_SECONDS); i < snapshots.length; i++) {
    const a = snapshots[i - 1], b = snapshots[i];
    const q = quantile(0.99, b.all.map((c, j) => c - a.all[j]));
    p99s.push(q === null ? 0 : q);
  }
  spark($('s-p99'), p99s);
  const backends = Object.values(stats.backends);
  const ready = backends.filter((b) => b.ready).length;
  $('t-ready').textContent = `${ready} / ${backends.length}`;
  $('t-ready').classList.toggle('bad', ready < backends.length);
  const open = backends.filter((b) => b.breaker === 'open').length;
  $('t-ready-sub').textContent = open ? `${open} breaker${open > 1 ? 's' : ''} open` : 'no breaker open';
  const spool = stats.spool ? Object.values(stats.spool) : [];
  const waiting = spool.reduce((a, s) => a + s.messages, 0);
  $('t-spool').textContent = stats.spool ? String(waiting) : '–';
  $('t-spool-sub').textContent = stats.spool
    ? `${fmtBytes(spool.reduce((a, s) => a + s.bytes, 0))} waiting`
    : 'no route spools';
}

function renderRoutes(stats) {
  const body = $('routes').tBodies[0];
  body.replaceChildren();
  const now = snapshots[snapshots.length - 1];
  const then = behind(RATE_WINDOW, true);
  for (const r of stats.routes) {
    const d = then ? delta(now, then, r.route) : null;
    const dt = then ? (now.t - then.t) / 1000 : 0;
    const rate = d && dt > 0 ? d.requests / dt : null;
    const err = d && d.requests > 0 ? d.s5 / d.requests : (d ? 0 : null);
    const counts = d && d.requests > 0 ? d.counts : r.latency;
    const sparkNode = svg('svg', { class: 'spark', viewBox: '0 0 120 30', preserveAspectRatio: 'none' });
    spark(sparkNode, series(SPARK_SECONDS, (a, b) => {
      if (!a.routes || !b.routes) return null; // history samples have no per-route counts
      const x = b.routes.get(r.route), y = a.routes.get(r.route);
      return x ? x.requests - (y ? y.requests : 0) : 0;
    }));
    const total = Object.values(r.status).reduce((a, b) => a + b, 0) || 1;
    const bar = el('div', { class: 'bar', title: Object.entries(r.status).map(([k, v]) => `${k}: ${v}`).join(', ') });
    for (const k of ['2xx', '3xx', '4xx', '5xx']) {
      if (r.status[k] > 0) {
        const part = el('span', { class: `s${k[0]}` });
        part.style.width = `${(r.status[k] / total) * 100}%`;
        bar.append(part);
      }
    }
    const errCell = el('td', { class: 'num', text: fmtPercent(err) });
    if (err > 0) errCell.classList.add('bad');
    body.append(el('tr', { 'data-route': r.route },
      el('td', { class: 'route', text: r.route }),
      el('td', { class: 'num', text: fmtRate(rate) }),
      el('td', {}, sparkNode),
      errCell,
      el('td', {}, bar),
      el('td', { class: 'num', text: fmtSeconds(quantile(0.5, counts)) }),
      el('td', { class: 'num', text: fmtSeconds(quantile(0.99, counts)) }),
      el('td', { class: 'num', text: String(r.requests) }),
    ));
  }
  $('routes-empty').hidden = stats.routes.length > 0;
}

function renderBackends(stats) {
  const node = $('backends');
  node.replaceChildren();
  for (const [name, b] of Object.entries(stats.backends)) {
    const head = el('div', { class: 'name' }, el('span', { class: `dot${b.ready ? '' : ' down'}` }), el('span', { text: name }));
    if (b.breaker) {
      head.append(el('span', { class: `breaker ${b.breaker}`, text: `breaker ${b.breaker.replace('_', '-')}` }));
    }
    const card = el('div', { class: 'backend', 'data-backend': name }, head,
      el('div', { class: 'kind', text: `${b.type}${b.used_by_routes ? '' : ' · unused'} · ${b.ready ? 'ready' : 'unavailable'}` }));
    if (b.problem) card.append(el('div', { class: 'problem', text: b.problem }));
    node.append(card);
  }
  if (!Object.keys(stats.backends).length) node.append(el('p', { class: 'empty', text: 'No backends.' }));
}

function renderSpool(stats) {
  const node = $('spool');
  node.replaceChildren();
  const entries = stats.spool ? Object.entries(stats.spool) : [];
  const max = Math.max(1, ...entries.map(([, s]) => s.messages));
  for (const [route, s] of entries) {
    const meter = el('div', { class: 'meter' }, el('span'));
    meter.firstChild.style.width = `${(s.messages / max) * 100}%`;
    const detail = `${s.messages} msg · ${fmtBytes(s.bytes)}${s.oldest_age_seconds ? ` · oldest ${Math.round(s.oldest_age_seconds)} s` : ''}`;
    node.append(el('div', { class: 'spool-row', 'data-spool': route, title: s.last_error || '' },
      el('span', { class: 'route', text: route }), meter, el('span', { class: 'muted', text: detail })));
  }
  $('spool-empty').hidden = entries.some(([, s]) => s.messages > 0);
}

function renderConfig(stats) {
  const c = stats.config;
  $('version').textContent = `config v${c.version}`;
  $('version').title = `${c.path} (${c.hash})`;
  $('reloaded').textContent = c.last_reload ? `reloaded ${ago(c.last_reload)}` : '';
  $('reload-error').hidden = !c.last_error;
  $('reload-error-text').textContent = c.last_error || '';
}

// ---- dead letters ----------------------------------------------------------------------------

function notice(text) {
  $('notice').textContent = text;
}

async function loadDead() {
  let r;
  try {
    r = await api('/dead-letters?limit=100');
  } catch {
    return;
  }
  const body = $('dead').tBodies[0];
  body.replaceChildren();
  if (r.status !== 200) {
    $('t-dead').textContent = '–';
    $('dead-empty').textContent = r.body.detail || 'The dead letters cannot be read.';
    $('dead-empty').hidden = false;
    return;
  }
  const items = r.body.dead_letters;
  $('t-dead').textContent = r.body.next_after ? `${items.length}+` : String(items.length);
  $('t-dead').classList.toggle('bad', items.length > 0);
  $('dead-empty').textContent = 'No dead letters.';
  $('dead-empty').hidden = items.length > 0;
  for (const d of items.slice().reverse()) {
    const inspect = el('button', { type: 'button', text: 'Inspect', 'data-inspect': d.id });
    inspect.addEventListener('click', () => showDead(d.id));
    const replay = el('button', { type: 'button', text: 'Replay', 'data-replay': d.id });
    replay.addEventListener('click', () => act(d.id, 'replay'));
    const del = el('button', { type: 'button', class: 'danger', text: armed.has(d.id) ? 'Confirm delete' : 'Delete', 'data-delete': d.id });
    del.addEventListener('click', () => {
      if (!armed.has(d.id)) {
        armed.add(d.id);
        del.textContent = 'Confirm delete';
        return;
      }
      armed.delete(d.id);
      act(d.id, 'delete');
    });
    body.append(el('tr', { 'data-dead': d.id },
      el('td', { text: ago(d.dead_at), title: d.dead_at }),
      el('td', { class: 'route', text: d.route }),
      el('td', { text: d.source }),
      el('td', { text: d.reason }),
      el('td', { class: 'num', text: String(d.attempts) }),
      el('td', { class: 'actions' }, inspect, replay, del)));
  }
}

async function showDead(id) {
  const r = await api(`/dead-letters/${encodeURIComponent(id)}`);
  if (r.status !== 200) {
    notice(r.body.detail || `Dead letter ${id} cannot be read.`);
    return;
  }
  const d = { ...r.body };
  try {
    const bytes = Uint8Array.from(atob(d.body_base64 || ''), (c) => c.charCodeAt(0));
    const text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    try { d.body = JSON.parse(text); } catch { d.body = text; }
    delete d.body_base64;
  } catch { /* binary: kept as base64 */ }
  $('inspect-title').textContent = `${d.route} · ${d.id}`;
  $('inspect-body').textContent = JSON.stringify(d, null, 2);
  $('inspect').hidden = false;
}

async function act(id, what) {
  const r = what === 'replay'
    ? await api(`/dead-letters/${encodeURIComponent(id)}/replay`, 'POST')
    : await api(`/dead-letters/${encodeURIComponent(id)}`, 'DELETE');
  if (r.status >= 400) {
    notice(r.body.detail || `${what} failed (${r.status}).`);
  } else {
    notice(what === 'replay' ? `Replayed ${id} into route ${r.body.route}.` : `Deleted ${id}.`);
  }
  await loadDead();
}

// ---- the live stream -------------------------------------------------------------------------

function onStats(stats) {
  record(stats);
  renderConfig(stats);
  renderTiles(stats);
  renderRoutes(stats);
  renderBackends(stats);
  renderSpool(stats);
  drawChart();
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  if (deadTick++ % 5 === 0) loadDead();
}

async function stream() {
  for (;;) {
    try {
      const r = await fetch('/events', { headers: headers() });
      if (r.status === 401) {
        needToken();
        return;
      }
      if (!r.ok || !r.body) throw new Error(`status ${r.status}`);
      $('live').textContent = 'live';
      $('live').classList.remove('off');
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = frame.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
          if (data) onStats(JSON.parse(data));
        }
      }
    } catch (e) {
      if (e.message === 'unauthorized') return;
    }
    $('live').textContent = 'reconnecting…';
    $('live').classList.add('off');
    await new Promise((res) => setTimeout(res, 2000));
  }
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $('login').hidden = true;
  stream();
});
$('inspect-close').addEventListener('click', () => { $('inspect').hidden = true; });

seed().then(stream);
