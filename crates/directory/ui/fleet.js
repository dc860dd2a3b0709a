// The fleet view: every live cloudlet the directory holds (GET /v1/fleet,
// read every second), on a map by its location, with its lease, its free
// capacity, and which VM moved where (each cloudlet's latest handoffs out).
// No build step, no dependency, no map tiles (a latitude/longitude grid):
// served from the directory's binary.
'use strict';

let token = null;

async function fetchFleet() {
  const r = await fetch('/v1/fleet', { headers: authHeaders(token) });
  if (r.status === 401 || r.status === 403) {
    $('#login').hidden = false;
    throw new Error('credential');
  }
  if (!r.ok) throw new Error('fleet: ' + r.status);
  return r.json();
}

// Where each cloudlet goes on the map: the fleet's bounding box (at least
// ~2 km across), longitude shrunk by the cosine of the mean latitude.
function projection(sites, w, h, pad) {
  const lats = sites.map(s => s.location.latitude), lons = sites.map(s => s.location.longitude);
  let [la0, la1, lo0, lo1] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
  const k = Math.cos(((la0 + la1) / 2) * Math.PI / 180) || 1;
  const span = Math.max(la1 - la0, (lo1 - lo0) * k, 0.02);
  const cla = (la0 + la1) / 2, clo = (lo0 + lo1) / 2;
  const scale = Math.min(w - 2 * pad, h - 2 * pad) / span;
  return {
    x: lon => w / 2 + (lon - clo) * k * scale,
    y: lat => h / 2 - (lat - cla) * scale,
    degrees: span,
  };
}

function renderMap(fleet) {
  const w = 1000, h = 420, pad = 60;
  const sites = fleet.cloudlets.map(c => c.registration);
  if (!sites.length) {
    $('#map').innerHTML = '<p class="quiet">No cloudlet to show.</p>';
    return;
  }
  const p = projection(sites, w, h, pad);
  let svg = `<svg viewBox="0 0 ${w} ${h}" role="img" aria-label="cloudlets by location">`;
  svg += '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#1d4ed8"/></marker></defs>';
  // The grid: a line every tenth of the shown span, rounded.
  const step = Math.pow(10, Math.floor(Math.log10(p.degrees / 2)));
  const lat0 = Math.floor(Math.min(...sites.map(s => s.location.latitude)) / step - 6) * step;
  const lon0 = Math.floor(Math.min(...sites.map(s => s.location.longitude)) / step - 12) * step;
  for (let i = 0; i < 40; i++) {
    const y = p.y(lat0 + i * step), x = p.x(lon0 + i * step);
    if (y > 0 && y < h) svg += `<line x1="0" x2="${w}" y1="${y.toFixed(1)}" y2="${y.toFixed(1)}" stroke="#e2e8f0"/><text x="4" y="${(y - 3).toFixed(1)}">${(lat0 + i * step).toFixed(3)}°</text>`;
    if (x > 0 && x < w) svg += `<line y1="0" y2="${h}" x1="${x.toFixed(1)}" x2="${x.toFixed(1)}" stroke="#e2e8f0"/><text x="${(x + 3).toFixed(1)}" y="${h - 4}">${(lon0 + i * step).toFixed(3)}°</text>`;
  }
  const byUrl = new Map(sites.map(s => [s.api_url.replace(/\/$/, ''), s]));
  const at = s => [p.x(s.location.longitude), p.y(s.location.latitude)];
  // Moves, as arcs from where a VM was to where it went.
  for (const s of sites) {
    for (const m of s.recent_moves || []) {
      const to = byUrl.get(m.to.replace(/\/$/, ''));
      if (!m.moved || !to || to === s) continue;
      const [x0, y0] = at(s), [x1, y1] = at(to);
      const mx = (x0 + x1) / 2 - (y1 - y0) * 0.2, my = (y0 + y1) / 2 + (x1 - x0) * 0.2;
      svg += `<path class="move" data-move="${esc(m.vm_id)}" data-from="${esc(s.name)}" data-to="${esc(to.name)}" d="M${x0.toFixed(1)},${y0.toFixed(1)} Q${mx.toFixed(1)},${my.toFixed(1)} ${x1.toFixed(1)},${y1.toFixed(1)}" marker-end="url(#arrow)"><title>${esc(m.vm_name)}: ${esc(s.name)} → ${esc(to.name)}</title></path>`;
    }
  }
  for (const c of fleet.cloudlets) {
    const s = c.registration, [x, y] = at(s);
    const r = 6 + Math.min(10, s.capacity.vms);
    const color = !s.accepting ? '#b45309' : s.free.vms > 0 ? '#15803d' : '#b91c1c';
    svg += `<g class="site" data-site="${esc(s.name)}"><circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="${r}" fill="${color}"><title>${esc(s.name)}: ${s.free.vms} of ${s.capacity.vms} VMs free</title></circle>` +
      `<text x="${(x + r + 4).toFixed(1)}" y="${(y + 4).toFixed(1)}">${esc(s.name)} · ${s.free.vms}/${s.capacity.vms} free</text></g>`;
  }
  $('#map').innerHTML = svg + '</svg>';
}

function renderTable(fleet) {
  $('#fleet tbody').innerHTML = fleet.cloudlets.map(c => {
    const s = c.registration;
    const lease = c.lease_left_ms == null ? 'kept by the store' : (c.lease_left_ms / 1000).toFixed(1) + ' s left';
    const low = c.lease_left_ms != null && c.lease_left_ms < fleet.heartbeat_ms;
    return `<tr data-cloudlet="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.location.label)}</td>` +
      `<td class="lease" data-low="${low}">${esc(lease)}</td><td class="accepting">${s.accepting ? 'yes' : 'draining'}</td>` +
      `<td class="num">${s.free.vcpus} / ${s.capacity.vcpus}</td><td class="num">${s.free.memory_mib} / ${s.capacity.memory_mib} MiB</td>` +
      `<td class="num free-vms">${s.free.vms} / ${s.capacity.vms}</td><td class="num">${s.load.toFixed(2)}</td><td>${esc(s.accel)}</td><td>${esc(s.release)}</td></tr>`;
  }).join('');
  $('#no-cloudlets').hidden = fleet.cloudlets.length > 0;
}

function renderMoves(fleet) {
  const byUrl = new Map(fleet.cloudlets.map(c => [c.registration.api_url.replace(/\/$/, ''), c.registration.name]));
  const moves = fleet.cloudlets.flatMap(c => (c.registration.recent_moves || []).map(m => ({ from: c.registration.name, ...m })));
  moves.sort((a, b) => b.started_unix_ms - a.started_unix_ms);
  $('#moves tbody').innerHTML = moves.map(m =>
    `<tr data-vm="${esc(m.vm_id)}" data-from="${esc(m.from)}" data-to="${esc(byUrl.get(m.to.replace(/\/$/, '')) || m.to)}">` +
    `<td>${esc(new Date(m.started_unix_ms).toLocaleTimeString())}</td><td>${esc(m.vm_name)}</td><td>${esc(m.from)}</td>` +
    `<td>${esc(byUrl.get(m.to.replace(/\/$/, '')) || m.to)}</td><td>${m.moved ? 'moved' : 'failed'}</td>` +
    `<td class="num">${m.downtime_ms != null ? m.downtime_ms + ' ms' : '–'}</td></tr>`).join('');
  $('#no-moves').hidden = moves.length > 0;
}

async function run() {
  for (;;) {
    try {
      const fleet = await fetchFleet();
      renderMap(fleet);
      renderTable(fleet);
      renderMoves(fleet);
      $('#status').dataset.status = 'live';
      $('#status').textContent = 'live';
    } catch (e) {
      $('#status').dataset.status = 'reconnecting';
      $('#status').textContent = 'reconnecting';
    }
    await sleep(1000);
  }
}

onLogin(t => { token = t; });

token = takeToken();
run();
