// The cloudlet's dashboard: what /v1/cloudlet, /v1/vms and /v1/handoffs
// say, kept current by /v1/events (read with fetch, so that the request
// carries the same bearer credential as every API call). No build step,
// no dependency: served from the daemon's binary.
'use strict';

const PHASE_COLORS = {
  preparing: '#94a3b8', disk: '#f59e0b', memory: '#0ea5e9', switchover: '#dc2626',
  committing: '#8b5cf6', commit: '#8b5cf6', moved: '#1d4ed8', failed: '#b91c1c',
};
const SERIES = [
  { key: 'sent', name: 'sent (MB)', color: '#0f766e', scale: v => v / 1e6 },
  { key: 'rate', name: 'link (Mbit/s)', color: '#f59e0b', scale: v => v / 1e6 },
  { key: 'dirty', name: 'dirty (MB/s)', color: '#dc2626', scale: v => v / 1e6 },
];

const mb = b => (b / 1e6).toFixed(1) + ' MB';
const mbit = b => (b / 1e6).toFixed(1) + ' Mbit/s';
const secs = ms => (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + ' s';

const state = {
  token: null,
  vms: [],
  // handoff id -> { last: ProgressEvent, points: [{t, sent, rate, dirty, stage}] }
  live: new Map(),
  // vm id -> the synthesis' last ProgressEvent
  synth: new Map(),
  refreshTimer: null,
};

function headers() {
  return authHeaders(state.token);
}

async function api(path) {
  const r = await fetch(path, { headers: headers() });
  if (r.status === 401) {
    $('#login').hidden = false;
    throw new Error('unauthorized');
  }
  if (!r.ok) throw new Error(path + ': ' + r.status);
  return r.json();
}

// --- this cloudlet ---------------------------------------------------------

function bar(label, used, total, unit) {
  const pct = total > 0 ? Math.min(100, 100 * used / total) : 0;
  return `<div class="label">${esc(label)}</div><div class="bar" data-used="${used}" data-total="${total}">` +
    `<div class="used" style="width:${pct.toFixed(1)}%"></div>` +
    `<div class="text">${esc(used)} of ${esc(total)} ${esc(unit)} in use, ${esc(total - used)} free</div></div>`;
}

async function refreshCloudlet() {
  const c = await api('/v1/cloudlet');
  $('#cloudlet-name').textContent = c.name;
  document.title = 'cloudlet ' + c.name;
  const l = c.location;
  $('#where').textContent = l.label ||
    (l.latitude || l.longitude ? `${l.latitude.toFixed(3)}, ${l.longitude.toFixed(3)}` : 'no location set');
  $('#accel').textContent = c.accel;
  $('#version').textContent = c.version + ' (handoff protocol ' + c.handoff_protocol + ')';
  $('#load').textContent = c.load
    ? `${c.load.load1.toFixed(2)} / ${c.load.load5.toFixed(2)} / ${c.load.load15.toFixed(2)} on ${c.load.cpus} CPUs`
    : 'unknown';
  const d = c.directory;
  $('#directory').textContent = !d ? 'none'
    : d.registered ? `registered (${d.urls.join(', ')}), ${d.peers.length} peers`
    : `not registered${d.last_error ? ': ' + d.last_error : ''}`;
  const cap = c.capacity, free = c.free;
  $('#capacity').innerHTML =
    bar('vCPUs', cap.vcpus - free.vcpus, cap.vcpus, 'vCPUs') +
    bar('memory', cap.memory_mib - free.memory_mib, cap.memory_mib, 'MiB') +
    bar('VMs', cap.vms - free.vms, cap.vms, 'VMs');
  $('#bases tbody').innerHTML = c.base_vms.map(b =>
    `<tr data-base="${esc(b.name)}"><td>${esc(b.name)}</td><td class="id" title="${esc(b.id)}">${esc(b.id.slice(0, 12))}</td>` +
    `<td class="num">${esc(b.memory_mib)} MiB</td><td class="num">${mb(b.disk_size)}</td>` +
    `<td class="spare">${b.spare_disk ? 'ready' : 'being made'}</td></tr>`).join('');
}

// --- VMs -------------------------------------------------------------------

function age(createdUnix) {
  const s = Math.max(0, Date.now() / 1000 - createdUnix);
  if (s < 120) return Math.round(s) + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  return (s / 3600).toFixed(1) + ' h';
}

function synthesisCell(vm) {
  const live = state.synth.get(vm.id);
  if (vm.state === 'synthesizing' && live) {
    const p = live.progress;
    const of = p.bytes_total ? ` ${mb(p.bytes_fetched)} of ${mb(p.bytes_total)}` : '';
    return `<span class="stage">${esc(live.stage)}</span>${of}`;
  }
  const t = vm.timings || [];
  return '<span class="chips">' + t.map(s => `<span>${esc(s.stage)} ${esc(s.ms)} ms</span>`).join('') + '</span>';
}

function renderVms() {
  const rows = state.vms.map(vm => {
    const endpoint = vm.ports.map(p => `${p.guest} → ${p.endpoint}`).join(', ');
    const where = vm.state === 'moved' && vm.moved_to ? ` → ${vm.moved_to}` : '';
    const err = vm.error ? ` title="${esc(vm.error)}"` : '';
    return `<tr data-vm="${esc(vm.id)}" data-name="${esc(vm.name)}"><td>${esc(vm.name)}</td><td class="id">${esc(vm.id)}</td>` +
      `<td class="state" data-state="${esc(vm.state)}"${err}>${esc(vm.state)}${esc(where)}</td>` +
      `<td class="num generation">${esc(vm.generation)}</td><td class="endpoint">${esc(endpoint)}</td>` +
      `<td>${esc(vm.flavor)}</td><td class="num">${age(vm.created_unix)}</td><td class="synthesis">${synthesisCell(vm)}</td></tr>`;
  });
  $('#vms tbody').innerHTML = rows.join('');
  $('#no-vms').hidden = state.vms.length > 0;
}

async function refreshVms() {
  state.vms = await api('/v1/vms');
  renderVms();
}

// --- charts ----------------------------------------------------------------

// A line chart of `points` ({t, sent, rate, dirty}) as SVG text: each series
// on its own scale (its maximum at the top, written in the legend), time in
// seconds along the bottom, the switchover marked.
function chart(points, switchoverT, w = 520, h = 150) {
  const pad = { l: 8, r: 8, t: 8, b: 20 };
  const tMax = Math.max(0.001, ...points.map(p => p.t));
  const x = t => pad.l + (w - pad.l - pad.r) * t / tMax;
  let svg = `<svg class="chart" viewBox="0 0 ${w} ${h}" width="${w}" height="${h}" role="img">`;
  svg += `<rect x="${pad.l}" y="${pad.t}" width="${w - pad.l - pad.r}" height="${h - pad.t - pad.b}" fill="#fafbfc" stroke="#e3e6ec"/>`;
  for (let i = 0; i <= 4; i++) {
    const t = tMax * i / 4;
    const anchor = i === 0 ? 'start' : i === 4 ? 'end' : 'middle';
    svg += `<text x="${x(t)}" y="${h - 5}" text-anchor="${anchor}">${t.toFixed(1)} s</text>`;
  }
  const legend = [];
  for (const s of SERIES) {
    const vals = points.map(p => s.scale(p[s.key] || 0));
    const max = Math.max(...vals, 0);
    if (max <= 0) continue;
    const y = v => pad.t + (h - pad.t - pad.b) * (1 - v / max);
    const d = points.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(vals[i]).toFixed(1)}`).join('');
    svg += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.8" data-series="${s.key}"/>`;
    legend.push(`<span><i style="background:${s.color}"></i>${esc(s.name)}, top ${max.toFixed(1)}</span>`);
  }
  if (switchoverT != null) {
    svg += `<line x1="${x(switchoverT)}" x2="${x(switchoverT)}" y1="${pad.t}" y2="${h - pad.b}" stroke="#dc2626" stroke-dasharray="4 3"/>`;
    svg += `<text x="${x(switchoverT) + 3}" y="${pad.t + 11}" style="fill:#dc2626">switchover</text>`;
  }
  return svg + '</svg><div class="legend">' + legend.join('') + '</div>';
}

// The stages of a handoff from its course (each from its first point to
// the next stage's), the last one ending at `total` ms.
function stageSpans(samples, total) {
  const spans = [];
  for (const s of samples) {
    const last = spans[spans.length - 1];
    if (last && last.stage === s.stage) continue;
    if (last) last.end = s.t_ms;
    spans.push({ stage: s.stage, start: s.t_ms, end: total });
  }
  // The end ('moved', 'failed') is a moment, not a stage.
  return spans.filter(s => s.stage !== 'moved' && s.stage !== 'failed');
}

// The stages as one bar, each one's width its share of the whole, and
// their names and durations below.
function timeline(spans, total, w = 300, h = 16) {
  const sum = Math.max(1, total);
  let svg = `<svg class="timeline" viewBox="0 0 ${w} ${h}" width="${w}" height="${h}">`;
  for (const s of spans) {
    const x = w * s.start / sum, pw = Math.max(1, w * (s.end - s.start) / sum);
    svg += `<rect x="${x.toFixed(1)}" y="0" width="${pw.toFixed(1)}" height="${h}" fill="${PHASE_COLORS[s.stage] || '#64748b'}" data-stage="${esc(s.stage)}"><title>${esc(s.stage)} ${esc(s.end - s.start)} ms</title></rect>`;
  }
  const names = spans.map(s => `<span><i style="background:${PHASE_COLORS[s.stage] || '#64748b'}"></i>${esc(s.stage)} ${secs(s.end - s.start)}</span>`);
  return svg + '</svg><div class="legend">' + names.join('') + '</div>';
}

// --- handoffs under way ----------------------------------------------------

function renderLive() {
  const cards = [...state.live.entries()].map(([hid, h]) => {
    const p = h.last, c = p.progress;
    const sw = h.points.find(q => q.stage === 'switchover');
    const outcome = p.done ? (p.error ? 'failed' : 'moved') : '';
    let end = '';
    if (p.done && !p.error) end = `<div class="end">moved to ${esc(p.destination)}: downtime <span class="downtime" data-ms="${p.downtime_ms}">${esc(p.downtime_ms)} ms</span>, in ${secs(p.elapsed_ms)}</div>`;
    if (p.done && p.error) end = `<div class="end error">failed, the VM runs here again: ${esc(p.error)}</div>`;
    return `<div class="handoff" data-handoff="${esc(hid)}" data-vm="${esc(p.vm_id)}" data-phase="${esc(p.stage)}" data-sent="${c.bytes_fetched}" data-done="${p.done}" data-outcome="${outcome}">` +
      `<div class="head"><strong>${esc(p.name)}</strong> <span class="quiet">→ ${esc(p.destination || '')}</span> <span class="phase">${esc(p.stage)}</span> <span class="quiet">${secs(p.elapsed_ms)}</span></div>` +
      `<div class="numbers"><span>sent <b class="sent">${mb(c.bytes_fetched)}</b></span><span>link <b class="rate">${mbit(c.rate_bps)}</b></span>` +
      `<span>dirty <b class="dirty">${mb(c.dirty_rate_bps)}/s</b></span><span>iteration <b class="iteration">${c.iteration}</b></span>` +
      `<span>remaining <b class="remaining">${mb(c.remaining_bytes)}</b></span></div>` +
      chart(h.points, sw ? sw.t : null) + end + '</div>';
  });
  $('#live').innerHTML = cards.join('');
  $('#no-live').hidden = cards.length > 0;
}

// --- history ---------------------------------------------------------------

async function refreshHistory() {
  const list = await api('/v1/handoffs?limit=20');
  $('#history tbody').innerHTML = list.map(r => {
    const when = new Date(r.started_unix_ms).toLocaleTimeString();
    const points = r.samples.map(s => ({ t: s.t_ms / 1000, sent: s.bytes_sent, rate: s.rate_bps, dirty: s.dirty_rate_bps, stage: s.stage }));
    const course = points.length > 1 ? chart(points, r.switchover_ms != null ? r.switchover_ms / 1000 : null, 300, 80) : '';
    return `<tr data-history="${esc(r.handoff_id)}" data-outcome="${esc(r.outcome)}"><td>${esc(when)}</td><td>${esc(r.name)}</td><td>${esc(r.destination)}</td>` +
      `<td class="outcome"${r.error ? ` title="${esc(r.error)}"` : ''}>${esc(r.outcome)}</td><td class="num">${secs(r.total_ms)}</td>` +
      `<td class="num downtime">${r.downtime_ms != null ? esc(r.downtime_ms) + ' ms' : '–'}</td><td class="num">${mb(r.wire_bytes)}</td>` +
      `<td class="phases">${timeline(stageSpans(r.samples, r.total_ms), r.total_ms)}</td><td class="course">${course}</td></tr>`;
  }).join('');
  $('#no-history').hidden = list.length > 0;
}

// --- events ----------------------------------------------------------------

function refreshSoon() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    await Promise.all([refreshVms(), refreshCloudlet()]).catch(() => {});
  }, 100);
}

function onProgress(p) {
  if (p.operation === 'synthesis') {
    state.synth.set(p.vm_id, p);
    if (p.done) refreshSoon(); else renderVms();
    return;
  }
  const h = state.live.get(p.handoff_id) || { points: [] };
  h.last = p;
  const c = p.progress;
  h.points.push({ t: p.elapsed_ms / 1000, sent: c.bytes_fetched, rate: c.rate_bps, dirty: c.dirty_rate_bps, stage: p.stage });
  state.live.set(p.handoff_id, h);
  renderLive();
  if (p.done) {
    refreshHistory().catch(() => {});
    refreshSoon();
  }
}

function onFrame(frame) {
  let name = 'message';
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (line.startsWith(':')) continue;
    const k = line.indexOf(':');
    const field = k < 0 ? line : line.slice(0, k);
    let value = k < 0 ? '' : line.slice(k + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  if (!data.length) return;
  const text = data.join('\n');
  if (name === 'message') refreshSoon();
  else if (name === 'progress') onProgress(JSON.parse(text));
  else if (name === 'lagged') refreshAll();
}

function setStatus(s) {
  const el = $('#status');
  el.dataset.status = s;
  el.textContent = s;
}

async function follow() {
  for (;;) {
    try {
      const r = await fetch('/v1/events', { headers: headers() });
      if (r.status === 401) $('#login').hidden = false;
      if (!r.ok) throw new Error('events: ' + r.status);
      setStatus('live');
      // What changed while we were not listening.
      refreshAll();
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i).replace(/^\r?\n\r?\n/, '');
          onFrame(frame);
        }
      }
    } catch (e) {
      // fall through: reconnect
    }
    setStatus('reconnecting');
    await sleep(1000);
  }
}

function refreshAll() {
  refreshCloudlet().catch(() => {});
  refreshVms().catch(() => {});
  refreshHistory().catch(() => {});
}

onLogin(token => {
  state.token = token;
  refreshAll();
});

state.token = takeToken();
refreshAll();
follow();
// Ages and load move on by themselves.
setInterval(() => { renderVms(); refreshCloudlet().catch(() => {}); }, 5000);
