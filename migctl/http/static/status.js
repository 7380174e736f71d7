// The status page: fetches /stats, /ready and the admin API's reads, renders with
// textContent only (nothing fetched is ever parsed as HTML), and refreshes itself.
"use strict";

const REFRESH_MS = 5000;
const STATE_ORDER = ["READY", "IDLE", "BUSY", "STARTING", "BOOTING", "CONNECTING", "DRAINING",
  "STOPPING", "STOPPED", "SUSPENDED", "UNHEALTHY", "ERROR", "DELETING"];

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok && url !== "/ready") {
    throw new Error(`${url}: ${response.status} ${body.error || response.statusText}`);
  }
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function setText(id, value) {
  const node = document.getElementById(id);
  if (node) node.textContent = value === undefined || value === null ? "–" : String(value);
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

function clock(ts) {
  if (!ts) return "–";
  return new Date(ts * 1000).toISOString().slice(11, 19) + "Z";
}

function badge(state) {
  return el("span", state, `badge s-${String(state).toLowerCase()}`);
}

function fill(tableId, rows, empty) {
  const body = document.querySelector(`#${tableId} tbody`);
  const width = document.querySelectorAll(`#${tableId} thead th`).length;
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", empty, "muted");
    td.colSpan = width;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const cell of cells) {
      const td = el("td");
      if (cell instanceof Node) td.append(cell); else td.textContent = cell ?? "–";
      tr.append(td);
    }
    body.append(tr);
  }
}

function renderStats(stats) {
  setText("pool", stats.pool_id);
  document.title = `migctl ${stats.pool_id}`;
  for (const name of ["queue_length", "connected_vms", "assigned_jobs", "failed_jobs",
    "started_vms", "created_vms"]) {
    setText(name, stats[name]);
  }
  const pool = stats.pool_stats;
  setText("dead_letters", pool.dead_letters);
  setText("running", pool.jobs_by_state.RUNNING);
  setText("vm-total", `(${pool.total_vms})`);
  const states = document.getElementById("vm-states");
  states.replaceChildren();
  for (const state of STATE_ORDER) {
    const n = pool.vms_by_state[state] || 0;
    if (!n) continue;
    const chip = el("span", null, "chip");
    chip.append(badge(state), el("b", n));
    chip.dataset.state = state;
    states.append(chip);
  }
  if (!states.children.length) states.append(el("span", "no VMs", "muted"));
}

function renderReady(ready) {
  const node = document.getElementById("ready");
  if (ready.ready) {
    node.textContent = "ready";
    node.className = "badge s-ready";
  } else {
    const failing = (ready.failing || []).map((name) => `${name}: ${ready.checks[name]}`);
    node.textContent = `not ready — ${failing.join("; ") || "unknown"}`;
    node.className = "badge s-error";
  }
}

function renderVms(vms, now) {
  fill("vms", vms.map((vm) => [
    vm.id, badge(vm.state), vm.agent || "–", vm.job_id || "–", vm.reserved_job || "–",
    vm.heartbeat_age_s === null ? "–" : `${seconds(vm.heartbeat_age_s)} ago`,
  ]), "no VMs yet");
}

function renderJobs(active, finished) {
  fill("active-jobs", active.map((job) => [
    job.id, badge(job.state), job.repo || "–", job.vm_id || "–",
    job.waiting ? `${seconds(job.wait_s)} so far` : seconds(job.wait_s), job.reason || "",
  ]), "no job waiting or running");
  fill("recent-jobs", finished.map((job) => [
    job.id, badge(job.state), job.repo || "–", job.vm_id || "–", seconds(job.wait_s),
    clock(job.finished_at), job.reason || job.conclusion || "",
  ]), "no finished job yet");
}

function renderFailures(finished, dead) {
  const rows = [];
  for (const job of finished.filter((j) => j.state === "FAILED")) {
    rows.push([job.finished_at, clock(job.finished_at), "failed job", job.id, job.reason]);
  }
  for (const record of dead) {
    rows.push([record.at || 0, clock(record.at), "dead letter", record.message_id || "–",
      record.reason]);
  }
  rows.sort((a, b) => b[0] - a[0]);
  fill("failures", rows.map((row) => row.slice(1)), "no failures");
}

async function refresh() {
  const banner = document.getElementById("error");
  try {
    const stats = await getJSON("/stats");
    const pool = encodeURIComponent(stats.pool_id);
    const api = `/api/v1/pools/${pool}`;
    const [ready, vms, active, finished, dead] = await Promise.all([
      getJSON("/ready"),
      getJSON(`${api}/vms`),
      getJSON(`${api}/jobs?state=RUNNING,ASSIGNED,QUEUED&limit=50`),
      getJSON(`${api}/jobs?state=COMPLETED,FAILED,CANCELLED&limit=20`),
      getJSON(`${api}/deadletters?limit=10`),
    ]);
    renderStats(stats);
    renderReady(ready);
    renderVms(vms.vms, stats.at);
    renderJobs(active.jobs, finished.jobs);
    renderFailures(finished.jobs, dead.dead_letters);
    setText("updated", `updated ${clock(stats.at)}`);
    banner.hidden = true;
    document.body.dataset.state = "loaded";
  } catch (error) {
    banner.textContent = `Could not refresh: ${error.message}. Showing the last known state.`;
    banner.hidden = false;
    document.body.dataset.state = "error";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
