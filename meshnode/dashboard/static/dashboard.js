/* meshnode dashboard: polls the agent's api/overview and api/hosts and renders header, the
 * mesh's hosts, topology graph, traffic list, services and endpoints tables, per-service trends
 * and what runs on each host. Plain ES2020, no build step.
 * HTTP, HTTP/2 and gRPC services and edges carry `requests` (the agent's request figures: rate,
 * success_rate, p50/p95/p99_ms, retry_rate; success is the agent's rule, never decided here) and
 * are shown in requests; TCP ones in connections.
 * Test hooks: tr[data-edge="SRC->DST"][data-rate] (connections/s) [data-rps] [data-success],
 * tr[data-service], #requests tr[data-service][data-rps][data-success], body[data-updated],
 * #cluster tr[data-host][data-state][data-applied][data-current],
 * #endpoints tr[data-endpoint="SERVICE ADDR"][data-host], #k-rps, #k-success,
 * tr[data-service] .badges[data-route] .badge[data-badge="split"][data-shares="90/10"]
 * (and data-badge fault, mirror, rate_limit, route). */
'use strict';

(() => {
  const POLL_MS = 2000;
  const WINDOW_S = 10;
  const FETCH_TIMEOUT_MS = 5000;
  const API = `api/overview?window=${WINDOW_S}`;
  const HOSTS_API = 'api/hosts';
  const UNKNOWN = 'unknown';
  const GRAPH_MIN_HEIGHT = 380;
  const COLORS = {
    accent: '#2563eb', ok: '#16a34a', warn: '#d97706', err: '#dc2626',
    edge: '#64748b', idle: '#cbd5e1', muted: '#6b7280', grid: '#eef1f5',
    p50: '#0d9488', p99: '#9333ea',
  };

  const state = {
    polls: 0,        // successful polls (exposed as body[data-updated])
    lastOk: null,    // Date of the last successful poll
    data: null,      // the last overview rendered (re-laid out on resize)
    graph: null,     // ECharts instance of the topology
    trends: new Map(), // service name -> {card, rate, latency, now}
  };

  // -- formatting -------------------------------------------------------------------------
  const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);

  function fmtRate(v) {
    v = num(v) ?? 0;
    if (v >= 1000) return `${(v / 1000).toFixed(1)}k/s`;
    if (v >= 100) return `${Math.round(v)}/s`;
    if (v === 0) return '0/s';
    return `${v < 0.1 ? v.toFixed(2) : v.toFixed(1)}/s`;
  }

  function fmtPct(v) {
    v = num(v) ?? 0;
    if (v <= 0) return '0%';
    const p = v * 100;
    if (p < 0.1) return '<0.1%';
    return `${p >= 10 ? Math.round(p) : Number(p.toFixed(1))}%`;
  }

  function fmtMs(v) {
    v = num(v);
    if (v === null) return '—';
    if (v >= 1000) return `${(v / 1000).toFixed(2)} s`;
    if (v >= 10) return `${Math.round(v)} ms`;
    return `${v < 1 ? v.toFixed(2) : v.toFixed(1)} ms`;
  }

  function fmtBytes(v) {
    v = num(v) ?? 0;
    const units = ['B/s', 'kB/s', 'MB/s', 'GB/s'];
    let i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return `${i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
  }

  function fmtSuccess(v) {
    v = num(v);
    if (v === null) return '—';
    const p = v * 100;
    return `${Number(p.toFixed(p >= 99 && p < 100 ? 2 : 1))}%`;
  }

  // -- requests (HTTP, HTTP/2, gRPC) or connections (TCP) ---------------------------------
  const reqs = (x) => x.requests || null;
  /* What a service or edge carries per second: requests when it has them, else connections. */
  const busyRate = (x) => num(reqs(x) ? reqs(x).rate : x.rate) ?? 0;
  /* Its failed share: requests that did not succeed, else connections that never reached an
   * endpoint. */
  function errorShare(x) {
    const r = reqs(x);
    if (!r) return num(x.error_rate) ?? 0;
    return num(r.success_rate) === null ? 0 : 1 - r.success_rate;
  }
  const unit = (x) => h('span', { class: 'unit' }, reqs(x) ? 'req' : 'conn');

  const fmtVip = (s) => (s.vip ? (s.port == null ? s.vip : `${s.vip}:${s.port}`) : '—');
  const fmtClock = (d) => d.toLocaleTimeString([], { hour12: false });
  const fmtCapture = (c) => ({ ebpf: 'eBPF', iptables: 'iptables' }[c] || c || '–');
  const esc = (s) => String(s).replace(/[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

  // -- DOM helpers (text only: nothing from the API is parsed as HTML) ---------------------
  const $ = (id) => document.getElementById(id);

  function h(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (v === undefined || v === null) continue;
      if (k === 'class') node.className = v;
      else if (k === 'data') {
        for (const [dk, dv] of Object.entries(v)) if (dv !== undefined && dv !== null) node.dataset[dk] = dv;
      }
      else if (k === 'style') Object.assign(node.style, v);
      else node.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) {
        node.append(c instanceof Node ? c : String(c));
      }
    }
    return node;
  }

  const setText = (id, text) => { $(id).textContent = text; };

  function healthOf(endpoints) {
    const total = endpoints.length;
    const healthy = endpoints.filter((e) => e.health === 'healthy').length;
    const level = total === 0 ? 'none' : healthy === total ? 'ok' : healthy === 0 ? 'bad' : 'warn';
    return { total, healthy, level };
  }

  // -- header, KPIs, banner ---------------------------------------------------------------
  function renderHeader(d) {
    setText('m-node', d.node ?? '–');
    setText('m-instance', d.instance ?? '–');
    setText('m-capture', fmtCapture(d.capture));
    setText('m-version', d.version ?? '–');
    const ready = $('m-ready');
    ready.textContent = d.ready ? 'ready' : 'not ready';
    ready.className = `pill ${d.ready ? 'pill-ok' : 'pill-warn'}`;
    const t = num(d.time) !== null ? new Date(d.time * 1000) : new Date();
    setText('m-updated', fmtClock(t));
    for (const w of document.querySelectorAll('.js-window')) w.textContent = d.window ?? WINDOW_S;
  }

  function renderKpis(d) {
    const svcs = d.services || [];
    const sum = (f) => svcs.reduce((a, s) => a + (num(f(s)) ?? 0), 0);
    const rate = sum((s) => s.rate);
    const failed = sum((s) => (num(s.rate) ?? 0) * (num(s.error_rate) ?? 0));
    const errRate = rate > 0 ? failed / rate : 0;
    setText('k-services', svcs.length);
    const l7 = svcs.map(reqs).filter(Boolean);
    const asked = l7.reduce((a, r) => a + (num(r.requests) ?? 0), 0);
    const ok = l7.reduce((a, r) => a + (num(r.succeeded) ?? 0), 0);
    setText('k-rps', l7.length ? fmtRate(l7.reduce((a, r) => a + (num(r.rate) ?? 0), 0)) : '–');
    setText('k-success', asked > 0 ? fmtSuccess(ok / asked) : '–');
    $('k-success').classList.toggle('bad', asked > 0 && ok < asked);
    setText('k-rate', fmtRate(rate));
    setText('k-active', sum((s) => s.active));
    setText('k-errors', fmtPct(errRate));
    $('k-errors').classList.toggle('bad', errRate > 0);
    setText('k-bytes', fmtBytes(sum((s) => s.bytes_up_rate) + sum((s) => s.bytes_down_rate)));
    const cluster = d.cluster?.hosts;
    setText('k-hosts', (cluster || d.hosts || []).length);
    const behind = (cluster || []).filter((x) => !x.current).length;
    setText('k-hosts-note', !cluster ? '' : behind ? `${behind} behind` : 'all current');
    $('k-hosts-note').classList.toggle('bad', behind > 0);
  }

  function showBanner(message, title = 'Agent unreachable.') {
    const banner = $('banner');
    if (message === null) {
      banner.hidden = true;
      document.body.classList.remove('stale');
      return;
    }
    const since = state.lastOk ? `showing data from ${fmtClock(state.lastOk)}` : 'no data yet';
    setText('banner-title', title);
    setText('banner-detail', `${message} — retrying every ${POLL_MS / 1000} s; ${since}.`);
    banner.hidden = false;
    document.body.classList.toggle('stale', state.lastOk !== null);
    const ready = $('m-ready');
    ready.textContent = 'unreachable';
    ready.className = 'pill pill-err';
  }

  // -- topology graph ---------------------------------------------------------------------
  /* Nodes: every service plus every edge endpoint that is not one (client-only services and
   * "unknown"). Kind decides the look: service (has a VIP), client, unknown. */
  function graphNodes(d) {
    const nodes = new Map();
    for (const s of d.services || []) nodes.set(s.name, { name: s.name, kind: 'service', svc: s });
    for (const e of d.edges || []) {
      for (const n of [e.src, e.dst]) {
        if (!nodes.has(n)) nodes.set(n, { name: n, kind: n === UNKNOWN ? 'unknown' : 'client' });
      }
    }
    return [...nodes.values()];
  }

  /* The edges of a DAG: self loops and DFS back edges (cycles) dropped, for ranking only. */
  function forwardEdges(names, edges) {
    const out = new Map(names.map((n) => [n, []]));
    for (const e of edges) if (e.src !== e.dst) out.get(e.src).push(e.dst);
    const hasIn = new Set(edges.filter((e) => e.src !== e.dst).map((e) => e.dst));
    const order = [...names.filter((n) => !hasIn.has(n)), ...names.filter((n) => hasIn.has(n))];
    const mark = new Map(); // 1 = on the DFS stack, 2 = done
    const kept = [];
    const visit = (n) => {
      mark.set(n, 1);
      for (const m of out.get(n)) {
        if (mark.get(m) === 1) continue; // back edge
        kept.push([n, m]);
        if (!mark.has(m)) visit(m);
      }
      mark.set(n, 2);
    };
    for (const n of order) if (!mark.has(n)) visit(n);
    return kept;
  }

  /* Rank = longest path from a source, so callers sit left of their callees. */
  function ranks(names, edges) {
    const dag = forwardEdges(names, edges);
    const rank = new Map(names.map((n) => [n, 0]));
    for (let i = 0; i < names.length; i += 1) {
      let changed = false;
      for (const [a, b] of dag) {
        if (rank.get(a) + 1 > rank.get(b)) { rank.set(b, rank.get(a) + 1); changed = true; }
      }
      if (!changed) break;
    }
    return rank;
  }

  /* Columns of node names, left to right; services without traffic join the last column,
   * and with no traffic at all the nodes wrap in columns of a grid `perRow` wide. Within a
   * column, nodes follow the mean row of their callers (fewer crossings), then name. */
  function columnsOf(names, edges, perRow) {
    const linked = new Set(edges.flatMap((e) => [e.src, e.dst]));
    const sorted = [...names].sort(byNameUnknownLast);
    if (linked.size === 0) {
      const cols = Math.min(perRow, sorted.length);
      return Array.from({ length: cols }, (_, c) => sorted.filter((_, i) => i % cols === c));
    }
    const rank = ranks(names, edges);
    const maxRank = Math.max(...[...linked].map((n) => rank.get(n)));
    const byRank = new Map();
    for (const n of sorted) {
      const r = linked.has(n) ? rank.get(n) : Math.max(maxRank, 1);
      if (!byRank.has(r)) byRank.set(r, []);
      byRank.get(r).push(n);
    }
    const columns = [...byRank.keys()].sort((a, b) => a - b).map((r) => byRank.get(r));
    const row = new Map();
    for (const col of columns) {
      const bary = (n) => {
        const rows = edges.filter((e) => e.dst === n && row.has(e.src)).map((e) => row.get(e.src));
        return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : Infinity;
      };
      const keyed = col.map((n, i) => [bary(n), i, n]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
      col.splice(0, col.length, ...keyed.map((k) => k[2]));
      col.forEach((n, i) => row.set(n, i - (col.length - 1) / 2));
    }
    return columns;
  }

  /* Pixel positions inside a w x h box, columns and rows centred with capped gaps. */
  function layeredLayout(columns, w, h) {
    const colGap = columns.length > 1 ? Math.min(w / (columns.length - 1), 340) : 0;
    const x0 = (w - colGap * (columns.length - 1)) / 2;
    const pos = new Map();
    columns.forEach((col, c) => {
      const rowGap = col.length > 1 ? Math.min(h / (col.length - 1), 120) : 0;
      const y0 = (h - rowGap * (col.length - 1)) / 2;
      col.forEach((n, i) => pos.set(n, { x: x0 + c * colGap, y: y0 + i * rowGap }));
    });
    return pos;
  }

  function byNameUnknownLast(a, b) {
    if (a === UNKNOWN || b === UNKNOWN) return (a === UNKNOWN) - (b === UNKNOWN);
    return a.localeCompare(b);
  }

  function nodeStyle(n) {
    if (n.kind === 'unknown') {
      return { color: '#ffffff', borderColor: '#94a3b8', borderWidth: 2, borderType: 'dashed' };
    }
    if (n.kind === 'client') return { color: '#f1f5f9', borderColor: '#64748b', borderWidth: 2 };
    const border = { ok: COLORS.accent, warn: COLORS.warn, bad: COLORS.err, none: '#94a3b8' };
    return { color: '#dbeafe', borderColor: border[healthOf(n.svc.endpoints || []).level],
      borderWidth: 2.5 };
  }

  /* Invisible corner nodes pin the layout box, so ECharts maps it 1:1 onto the canvas
   * (positions are pixels; a lone row or column would otherwise be stretched). */
  const anchor = (name, x, y) => ({ name, x, y, symbolSize: 0, label: { show: false },
    tooltip: { show: false }, silent: true, itemStyle: { opacity: 0 } });

  /* Grows the graph box so that crowded columns keep ~95 px per node; returns the inner
   * height. */
  function fitGraphHeight(rows, padY) {
    const el = $('graph');
    const want = `${Math.max(GRAPH_MIN_HEIGHT, rows * 95 + 2 * padY)}px`;
    if (el.style.height !== want) {
      el.style.height = want;
      state.graph.resize();
    }
    return el.clientHeight - 2 * padY;
  }

  function graphOption(d) {
    const edges = d.edges || [];
    const nodes = graphNodes(d);
    const el = $('graph');
    const [padX, padY] = [80, 45];
    const w = Math.max(el.clientWidth - 2 * padX, 50);
    const columns = columnsOf(nodes.map((n) => n.name), edges, Math.max(1, Math.floor(w / 150)));
    const hgt = fitGraphHeight(Math.max(...columns.map((c) => c.length), 1), padY);
    const pos = layeredLayout(columns, w, hgt);
    const maxRate = Math.max(0, ...edges.map(busyRate));
    const pairs = new Set(edges.map((e) => `${e.src}\u0000${e.dst}`));
    return {
      animation: false, // redrawn every poll: no re-growing edges
      tooltip: { confine: true, formatter: graphTooltip },
      series: [{
        id: 'topology',
        type: 'graph',
        layout: 'none',
        roam: true,
        left: padX, right: padX, top: padY, bottom: padY,
        edgeSymbol: ['none', 'arrow'],
        edgeSymbolSize: [0, 9],
        label: { show: true, position: 'bottom', distance: 6, fontSize: 13, color: '#1f2937',
          fontWeight: 600, lineHeight: 17,
          // a Route's marks under the name, smaller: "split 90/10 · fault"
          formatter: (p) => (p.data.mark ? `${p.name}\n{mark|${p.data.mark}}` : p.name),
          rich: { mark: { fontSize: 11, fontWeight: 600, color: '#1e40af', lineHeight: 15 } } },
        edgeLabel: { show: true, fontSize: 12, color: '#334155', backgroundColor: '#ffffff',
          padding: [1, 4], borderRadius: 3, formatter: (p) => edgeLabel(p.data.edge) },
        emphasis: { focus: 'adjacency', lineStyle: { opacity: 1 } },
        data: [anchor('\u0000nw', 0, 0), anchor('\u0000se', w, hgt), ...nodes.map((n) => ({
          name: n.name, kind: n.kind, svc: n.svc, mark: n.svc ? routeMarks(n.svc).join(' · ') : '',
          ...pos.get(n.name),
          symbolSize: n.kind === 'service' ? 46 : 38,
          itemStyle: nodeStyle(n),
          label: n.kind === 'unknown' ? { fontStyle: 'italic', color: COLORS.muted } : undefined,
        }))],
        links: edges.map((e) => ({
          source: e.src, target: e.dst, edge: e,
          lineStyle: edgeStyle(e, maxRate, pairs.has(`${e.dst}\u0000${e.src}`)),
        })),
      }],
    };
  }

  const edgeLabel = (e) => `${fmtRate(busyRate(e))}${reqs(e) ? ' req' : ''} · ${fmtPct(errorShare(e))}`;

  function edgeStyle(e, maxRate, hasReverse) {
    const rate = busyRate(e);
    const width = 1.5 + (maxRate > 0 ? 5.5 * Math.sqrt(rate / maxRate) : 0);
    const color = errorShare(e) > 0 ? COLORS.err : rate > 0 ? COLORS.edge : COLORS.idle;
    return { width, color, opacity: 0.9, curveness: hasReverse || e.src === e.dst ? 0.25 : 0,
      type: rate > 0 ? 'solid' : 'dashed' };
  }

  function graphTooltip(p) {
    if (p.dataType === 'edge') {
      const e = p.data.edge;
      const r = reqs(e);
      const head = `<b>${esc(e.src)} → ${esc(e.dst)}</b><br>`;
      const conns = `connections ${fmtRate(e.rate)} · active ${e.active ?? 0} · ` +
        `${fmtBytes(e.bytes_rate)}`;
      if (r) {
        return `${head}requests ${fmtRate(r.rate)} · success ${fmtSuccess(r.success_rate)}<br>` +
          `p50 ${fmtMs(r.p50_ms)} · p99 ${fmtMs(r.p99_ms)} · retries ${fmtRate(r.retry_rate)}` +
          `<br>${conns}`;
      }
      return `${head}rate ${fmtRate(e.rate)} · errors ${fmtPct(e.error_rate)}<br>${conns}`;
    }
    const s = p.data.svc;
    if (!s) {
      const what = p.data.kind === 'unknown' ? 'clients of no known service' : 'client (no VIP)';
      return `<b>${esc(p.name)}</b><br>${what}`;
    }
    const hl = healthOf(s.endpoints || []);
    const head = `<b>${esc(s.name)}</b> ${esc(fmtVip(s))}<br>endpoints ${hl.healthy}/${hl.total}` +
      ` healthy${routeText(s)}<br>`;
    const r = reqs(s);
    if (r) {
      return `${head}requests ${fmtRate(r.rate)} · success ${fmtSuccess(r.success_rate)}<br>` +
        `p50 ${fmtMs(r.p50_ms)} · p99 ${fmtMs(r.p99_ms)}`;
    }
    return `${head}rate ${fmtRate(s.rate)} · errors ${fmtPct(s.error_rate)}<br>p50 ${fmtMs(s.p50_ms)}` +
      ` · p99 ${fmtMs(s.p99_ms)}`;
  }

  function renderGraph(d) {
    if (!state.graph) state.graph = echarts.init($('graph'), null, { renderer: 'svg' });
    state.graph.setOption(graphOption(d), { replaceMerge: ['series'] });
    $('graph').classList.toggle('is-empty', !(d.services || []).length && !(d.edges || []).length);
  }

  // -- traffic list -----------------------------------------------------------------------
  function edgeName(name) {
    return h('span', { class: name === UNKNOWN ? 'unknown' : null }, name);
  }

  function renderTraffic(d) {
    const edges = [...(d.edges || [])].sort((a, b) => busyRate(b) - busyRate(a)
      || `${a.src}${a.dst}`.localeCompare(`${b.src}${b.dst}`));
    const maxRate = Math.max(0, ...edges.map(busyRate));
    const rows = edges.map((e) => {
      const bad = errorShare(e) > 0;
      const share = maxRate > 0 ? busyRate(e) / maxRate : 0;
      const r = reqs(e);
      return h('tr', { data: { edge: `${e.src}->${e.dst}`, rate: String(num(e.rate) ?? 0),
        rps: r ? String(num(r.rate) ?? 0) : undefined,
        success: r && num(r.success_rate) !== null ? String(r.success_rate) : undefined } },
        h('td', {}, h('span', { class: 'edge' }, edgeName(e.src), h('span', { class: 'arrow' }, '→'),
          edgeName(e.dst)), pathBadge(e)),
        h('td', { class: 'num rate-cell' }, fmtRate(busyRate(e)), unit(e), h('span', {
          class: `rate-bar${bad ? ' err' : ''}`, style: { width: `${Math.round(share * 100)}%` } })),
        h('td', { class: `num${bad ? ' err' : ' dim'}` }, fmtPct(errorShare(e))),
        h('td', { class: 'num' }, e.active ?? 0),
        h('td', { class: 'num dim' }, fmtBytes(e.bytes_rate)));
    });
    $('traffic').tBodies[0].replaceChildren(...rows);
    $('traffic-empty').hidden = rows.length > 0;
  }

  // -- services table ---------------------------------------------------------------------
  function healthCell(endpoints) {
    const hl = healthOf(endpoints || []);
    const cls = { ok: 'ok', warn: 'warn', bad: 'bad', none: '' }[hl.level];
    const title = (endpoints || []).map((e) => `${e.addr} ${e.node ? `@${e.node} ` : ''}${e.health}`)
      .join('\n');
    return h('span', { class: 'health', title: title || 'no endpoints' },
      h('i', { class: `hdot ${cls}` }), `${hl.healthy}/${hl.total}`);
  }

  /* A Route's marks on a service (overview's services[].route, agent/routes_api.py): one
   * "split 90/10" badge per rule splitting over two or more backends (shares in percent, the
   * backends in its title), then "fault", "mirror" and "rate limit" when a rule has one. */
  function splitShares(weights) {
    const total = weights.reduce((a, b) => a + b, 0) || 1;
    return weights.map((w) => Math.round((w * 100) / total)).join('/');
  }

  function routeBadges(s) {
    const r = s.route;
    if (!r) return null;
    const badges = (r.splits || []).map((x) => h('span', {
      class: 'badge badge-split', data: { badge: 'split', shares: splitShares(x.weights) },
      title: `Route ${r.route}, ${x.rule === 'tcp' ? 'TCP connections' : `rule ${x.rule}`}:\n` +
        x.backends.map((b, i) => `${b} weight ${x.weights[i]}`).join('\n'),
    }, `split ${splitShares(x.weights)}`));
    const marks = [['fault', 'fault', 'badge-fault'], ['mirror', 'mirror', 'badge-mirror'],
      ['rate_limit', 'rate limit', 'badge-limit']];
    for (const [key, label, cls] of marks) {
      const rules = r[key] || [];
      if (rules.length) {
        badges.push(h('span', { class: `badge ${cls}`, data: { badge: key },
          title: `Route ${r.route}: rule${rules.length > 1 ? 's' : ''} ${rules.join(', ')}` }, label));
      }
    }
    if (!badges.length) {
      badges.push(h('span', { class: 'badge', data: { badge: 'route' },
        title: `Route ${r.route}: ${r.rules} rule${r.rules === 1 ? '' : 's'}` }, 'route'));
    }
    return h('span', { class: 'badges', data: { route: r.route } }, badges);
  }

  function routeMarks(s) {
    const r = s.route;
    if (!r) return [];
    const marks = (r.splits || []).map((x) => `split ${splitShares(x.weights)}`);
    for (const [key, label] of [['fault', 'fault'], ['mirror', 'mirror'], ['rate_limit', 'rate limit']]) {
      if ((r[key] || []).length) marks.push(label);
    }
    return marks;
  }

  function routeText(s) {
    if (!s.route) return '';
    const marks = routeMarks(s);
    return `<br>Route ${esc(s.route.route)}${marks.length ? `: ${esc(marks.join(' · '))}` : ''}`;
  }

  /* A "kernel" badge on a service or edge whose connections take the kernel path (`path`
   * "kernel" or "proxy+kernel": the connect hook balanced them, no proxy; no connect latency,
   * the kernel's smoothed RTT instead). */
  function pathBadge(x) {
    if (!String(x.path || '').includes('kernel')) return null;
    const rtt = num(x.rtt_ms);
    return h('span', { class: 'badges' }, h('span', { class: 'badge badge-kernel',
      data: { badge: 'kernel', path: x.path },
      title: `${x.path}: balanced in the kernel, no proxy on the path` +
        (rtt !== null ? `\nRTT ${fmtMs(rtt)}` : '') }, 'kernel'));
  }

  function serviceRow(s) {
    const bad = (num(s.error_rate) ?? 0) > 0;
    return h('tr', { data: { service: s.name } },
      h('td', {}, h('span', { class: 'svc-name' }, s.name), routeBadges(s), pathBadge(s),
        h('span', { class: 'svc-lb' }, s.lb || '')),
      h('td', { class: 'mono' }, fmtVip(s)),
      h('td', {}, healthCell(s.endpoints)),
      h('td', { class: 'num' }, fmtRate(s.rate)),
      h('td', { class: 'num' }, s.active ?? 0),
      h('td', { class: `num${bad ? ' err' : ' dim'}` }, fmtPct(s.error_rate)),
      h('td', { class: 'num' }, fmtMs(s.p50_ms)),
      h('td', { class: 'num' }, fmtMs(s.p95_ms)),
      h('td', { class: 'num' }, fmtMs(s.p99_ms)),
      h('td', { class: 'num dim' }, `${fmtBytes(s.bytes_up_rate)} / ${fmtBytes(s.bytes_down_rate)}`));
  }

  function requestRow(s) {
    const r = reqs(s);
    const bad = num(r.success_rate) !== null && r.success_rate < 1;
    return h('tr', { data: { service: s.name, rps: String(num(r.rate) ?? 0),
      success: num(r.success_rate) === null ? undefined : String(r.success_rate) } },
    h('td', {}, h('span', { class: 'svc-name' }, s.name), routeBadges(s),
      h('span', { class: 'svc-lb' }, s.lb || '')),
    h('td', { class: 'mono' }, fmtVip(s)),
    h('td', {}, healthCell(s.endpoints)),
    h('td', { class: 'num' }, fmtRate(r.rate)),
    h('td', { class: `num${bad ? ' err' : ''}` }, fmtSuccess(r.success_rate)),
    h('td', { class: 'num' }, fmtMs(r.p50_ms)),
    h('td', { class: 'num' }, fmtMs(r.p95_ms)),
    h('td', { class: 'num' }, fmtMs(r.p99_ms)),
    h('td', { class: 'num dim' }, fmtRate(r.retry_rate)),
    h('td', { class: 'num' }, s.active ?? 0));
  }

  /* HTTP and gRPC services in requests, TCP ones in connections: each table only when it has
   * rows (the TCP one also says when there is no service at all). */
  function renderServices(d) {
    const svcs = [...(d.services || [])].sort((a, b) => a.name.localeCompare(b.name));
    const l7 = svcs.filter(reqs);
    const l4 = svcs.filter((s) => !reqs(s));
    $('requests').tBodies[0].replaceChildren(...l7.map(requestRow));
    $('requests-card').hidden = l7.length === 0;
    $('services').tBodies[0].replaceChildren(...l4.map(serviceRow));
    $('services-card').hidden = l4.length === 0 && svcs.length > 0;
    $('services-empty').hidden = svcs.length > 0;
  }

  // -- per-service trends -----------------------------------------------------------------
  function lineChartBase(unit) {
    return {
      animation: false,
      grid: { top: 14, right: 12, bottom: 22, left: 46 },
      tooltip: { trigger: 'axis', confine: true, valueFormatter: (v) => (unit === 'ms' ? fmtMs(v)
        : num(v) === null ? '—' : fmtRate(v)) },
      xAxis: { type: 'time', axisLabel: { color: COLORS.muted, fontSize: 10, hideOverlap: true },
        axisLine: { lineStyle: { color: '#cbd5e1' } }, splitLine: { show: false } },
      yAxis: { type: 'value', min: 0, axisLabel: { color: COLORS.muted, fontSize: 10 },
        splitLine: { lineStyle: { color: COLORS.grid } } },
      legend: { show: false },
    };
  }

  function points(t, values) {
    return (t || []).map((ts, i) => [ts * 1000, num(values?.[i])]);
  }

  function lineSeries(name, data, color, area) {
    return { name, type: 'line', data, showSymbol: false, connectNulls: false,
      lineStyle: { width: 1.8, color }, itemStyle: { color },
      areaStyle: area ? { color, opacity: 0.12 } : undefined };
  }

  function trendCard(name) {
    const rateEl = h('div', { class: 'chart chart-rate' });
    const latEl = h('div', { class: 'chart chart-latency' });
    const rateTitle = h('div', { class: 'chart-title' });
    const latTitle = h('div', { class: 'chart-title' });
    const now = h('span', { class: 'trend-now' });
    const card = h('section', { class: 'card trend', data: { trend: name } },
      h('div', { class: 'trend-head' }, h('h2', {}, name), now),
      h('div', { class: 'trend-charts' }, h('div', {}, rateTitle, rateEl), h('div', {}, latTitle, latEl)));
    $('trends').append(card);
    return {
      card, now, rateEl, latEl, rateTitle, latTitle,
      rate: echarts.init(rateEl, null, { renderer: 'svg' }),
      latency: echarts.init(latEl, null, { renderer: 'svg' }),
    };
  }

  /* What a trend card plots: requests for HTTP and gRPC services, connections for TCP ones. */
  function trendView(s, ser) {
    const r = reqs(s);
    if (r) {
      return { rate: ser.requests, p50: ser.request_p50_ms, p99: ser.request_p99_ms,
        rateTitle: 'Requests / s', latTitle: 'Request latency p50 / p99 (ms)',
        rateEmpty: 'no requests yet', latEmpty: 'no requests yet',
        now: `now ${fmtRate(r.rate)}${num(r.success_rate) === null ? ''
          : ` · ${fmtSuccess(r.success_rate)} ok`} · p99 ${fmtMs(r.p99_ms)}` };
    }
    return { rate: ser.rate, p50: ser.p50_ms, p99: ser.p99_ms,
      rateTitle: 'Connections / s', latTitle: 'Connect latency p50 / p99 (ms)',
      rateEmpty: 'no traffic yet', latEmpty: 'no connections yet',
      now: `now ${fmtRate(s.rate)} · p99 ${fmtMs(s.p99_ms)}` };
  }

  const hasValues = (...lists) => lists.some((l) => (l || []).some((v) => num(v) !== null));

  function renderTrend(t, s, series) {
    const ser = series || {};
    const v = trendView(s, ser);
    t.rateTitle.textContent = v.rateTitle;
    t.latTitle.textContent = v.latTitle;
    t.rateEl.dataset.empty = v.rateEmpty;
    t.latEl.dataset.empty = v.latEmpty;
    t.card.classList.toggle('no-rate', !hasValues(v.rate));
    t.card.classList.toggle('no-latency', !hasValues(v.p50, v.p99));
    t.now.textContent = v.now;
    t.rate.setOption({ ...lineChartBase('rate'),
      series: [lineSeries('rate', points(ser.t, v.rate), COLORS.accent, true)] });
    t.latency.setOption({ ...lineChartBase('ms'),
      series: [lineSeries('p50', points(ser.t, v.p50), COLORS.p50, false),
        lineSeries('p99', points(ser.t, v.p99), COLORS.p99, false)] });
  }

  function renderTrends(d) {
    const svcs = [...(d.services || [])].sort((a, b) => a.name.localeCompare(b.name));
    const wanted = new Set(svcs.map((s) => s.name));
    for (const [name, t] of state.trends) {
      if (wanted.has(name)) continue;
      t.rate.dispose();
      t.latency.dispose();
      t.card.remove();
      state.trends.delete(name);
    }
    for (const s of svcs) {
      if (!state.trends.has(s.name)) state.trends.set(s.name, trendCard(s.name));
      const t = state.trends.get(s.name);
      $('trends').append(t.card); // keeps cards in name order
      renderTrend(t, s, (d.series || {})[s.name]);
    }
  }

  // -- the mesh's hosts (api/hosts) -------------------------------------------------------
  /* One row per agent that reports to the registry. "Current": ready, and its applied
   * revision reaches the registry's (the newest change to served data; a rollout has
   * converged when every row is). */
  function clusterRow(x, newest) {
    const applied = num(x.applied_revision) ?? 0;
    const state = x.ready ? 'ready' : 'not ready';
    const sync = x.current ? h('span', { class: 'pill pill-ok' }, 'current')
      : !x.ready ? h('span', { class: 'pill pill-muted' }, 'not routing')
        : h('span', { class: 'pill pill-warn', title: `registry revision r${newest}` },
          `behind r${newest}`);
    const at = num(x.applied_at) ? `applied at ${fmtClock(new Date(x.applied_at * 1000))}` : '';
    return h('tr', { data: { host: x.node, state, applied: String(applied),
      current: String(Boolean(x.current)) } },
    h('td', {}, h('span', { class: 'host-name' }, x.node),
      x.local ? h('span', { class: 'pill pill-muted host-local' }, 'this node') : null),
    h('td', { class: x.zone ? null : 'dim' }, x.zone || '—'),
    h('td', {}, h('span', { class: 'health' }, h('i', { class: `hdot ${x.ready ? 'ok' : 'bad'}` }),
      state)),
    h('td', {}, fmtCapture(x.capture)),
    h('td', { title: at }, h('span', { class: 'rev mono' }, `r${applied}`), sync),
    h('td', { class: 'num' }, x.services ?? '—'),
    h('td', { class: 'num' }, x.local_endpoints ?? '—'),
    h('td', { class: 'num' }, x.workers ?? '—'),
    h('td', { class: 'mono dim' }, x.version || '—'));
  }

  function renderCluster(d) {
    const c = d.cluster || {};
    const hosts = [...(c.hosts || [])].sort((a, b) => (b.local - a.local) || a.node.localeCompare(b.node));
    $('cluster').tBodies[0].replaceChildren(...hosts.map((x) => clusterRow(x, c.current_revision ?? 0)));
    const empty = $('cluster-empty');
    empty.hidden = hosts.length > 0;
    empty.textContent = c.error ? `Hosts unavailable: ${c.error}.` : 'No agent has reported yet.';
    const current = hosts.filter((x) => x.current).length;
    setText('cluster-hint', c.error ? 'every agent in the registry'
      : `${current} of ${hosts.length} current · registry revision r${c.revision ?? 0}`);
  }

  // -- endpoints, with the host each runs on ---------------------------------------------
  function renderEndpoints(d) {
    const rows = [];
    const svcs = [...(d.services || [])].sort((a, b) => a.name.localeCompare(b.name));
    for (const s of svcs) {
      for (const e of s.endpoints || []) {
        const ok = e.health === 'healthy';
        rows.push(h('tr', { data: { endpoint: `${s.name} ${e.addr}`, host: e.node || '' } },
          h('td', { class: 'svc-name' }, s.name),
          h('td', { class: 'mono' }, e.addr),
          h('td', {}, h('span', { class: 'host-name' }, e.node || '?'),
            e.node && e.node === d.node ? h('span', { class: 'pill pill-muted host-local' }, 'this node')
              : null),
          h('td', { class: e.zone ? null : 'dim' }, e.zone || '—'),
          h('td', {}, h('span', { class: 'health' }, h('i', { class: `hdot ${ok ? 'ok' : 'bad'}` }),
            e.health || '—'))));
      }
    }
    $('endpoints').tBodies[0].replaceChildren(...rows);
    $('endpoints-empty').hidden = rows.length > 0;
  }

  // -- what runs on each host -------------------------------------------------------------
  function endpointHealth(d) {
    const m = new Map();
    for (const s of d.services || []) {
      for (const e of s.endpoints || []) m.set(`${s.name} ${e.addr}`, e.health);
    }
    return m;
  }

  function enrolledTable(procs) {
    if (!procs.length) return h('p', { class: 'empty' }, 'No enrolled processes.');
    return h('table', { class: 'table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'PID'), h('th', {}, 'Service'), h('th', {}, 'Command'),
        h('th', {}, 'Listening'))),
      h('tbody', {}, procs.map((p) => h('tr', { data: { pid: String(p.pid) } },
        h('td', { class: 'mono' }, p.pid),
        h('td', { class: 'svc-name' }, p.service),
        h('td', {}, h('div', { class: 'cmd mono', title: p.cmd || '' }, p.cmd || '')),
        h('td', { class: 'mono dim' }, (p.ports || []).join(', ') || '—')))));
  }

  function hostCard(host, health) {
    const eps = host.endpoints || [];
    const chips = eps.map((e) => {
      const hv = health.get(`${e.service} ${e.addr}`);
      const cls = hv === undefined ? '' : hv === 'healthy' ? 'ok' : 'bad';
      return h('span', { class: 'chip', title: hv || '' }, h('i', { class: `hdot ${cls}` }),
        h('b', {}, e.service), h('span', { class: 'mono' }, e.addr));
    });
    return h('section', { class: 'card host', data: { host: host.node } },
      h('div', { class: 'host-head' }, h('h3', {}, host.node),
        host.local ? h('span', { class: 'pill pill-ok' }, 'this node') : null,
        host.zone ? h('span', { class: 'pill pill-muted' }, `zone ${host.zone}`) : null),
      h('div', { class: 'host-sub' }, `Endpoints (${eps.length})`),
      eps.length ? h('div', { class: 'chips' }, chips) : h('p', { class: 'empty' }, 'No endpoints.'),
      // only this agent knows its enrolled processes: another host's are on its own dashboard
      host.local ? [h('div', { class: 'host-sub' }, `Enrolled processes (${(host.enrolled || []).length})`),
        enrolledTable(host.enrolled || [])] : null);
  }

  /* The overview's hosts (those with endpoints, and this one), plus every agent that reports
   * to the registry but has no endpoint yet. */
  function renderHosts(d) {
    const health = endpointHealth(d);
    const byNode = new Map((d.hosts || []).map((x) => [x.node, x]));
    for (const x of d.cluster?.hosts || []) {
      if (!byNode.has(x.node)) {
        byNode.set(x.node, { node: x.node, zone: x.zone, local: x.local, endpoints: [], enrolled: [] });
      }
    }
    const hosts = [...byNode.values()].sort((a, b) => (b.local - a.local) || a.node.localeCompare(b.node));
    $('hosts').replaceChildren(...hosts.map((x) => hostCard(x, health)));
  }

  // -- polling ----------------------------------------------------------------------------
  function render(d) {
    renderHeader(d);
    renderKpis(d);
    renderCluster(d);
    renderGraph(d);
    renderTraffic(d);
    renderServices(d);
    renderEndpoints(d);
    renderTrends(d);
    renderHosts(d);
  }

  async function fetchJson(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const res = await fetch(url, { cache: 'no-store', signal: ctl.signal });
      if (!res.ok) throw new Error(`HTTP ${res.status} from ${url}`);
      return await res.json();
    } finally {
      clearTimeout(timer);
    }
  }

  const why = (err) => (err.name === 'AbortError' ? 'request timed out' : err.message || String(err));

  async function poll() {
    // both at once; the hosts failing (an older agent, a busy registry) costs only their panel
    const [overview, cluster] = await Promise.allSettled([fetchJson(API), fetchJson(HOSTS_API)]);
    if (overview.status === 'rejected') {
      showBanner(why(overview.reason));
      return;
    }
    const data = overview.value;
    data.cluster = cluster.status === 'fulfilled' ? cluster.value : { error: why(cluster.reason) };
    try {
      render(data);
    } catch (err) {
      console.error('render failed', err);
      showBanner(`cannot render the agent's answer (${err.message})`, 'Dashboard error.');
      return;
    }
    state.data = data;
    state.polls += 1;
    state.lastOk = num(data.time) !== null ? new Date(data.time * 1000) : new Date();
    showBanner(null);
    document.body.dataset.updated = String(state.polls);
  }

  async function loop() {
    const started = Date.now();
    await poll();
    setTimeout(loop, Math.max(0, POLL_MS - (Date.now() - started)));
  }

  function resizeAll() {
    if (state.graph) {
      state.graph.resize();
      if (state.data) renderGraph(state.data);
    }
    for (const t of state.trends.values()) { t.rate.resize(); t.latency.resize(); }
  }

  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(resizeAll, 100);
  });

  if (typeof echarts === 'undefined') {
    showBanner('static/vendor/echarts.min.js did not load.', 'Dashboard broken.');
  } else {
    loop();
  }
})();
