// The conveyor dashboard: polls api/snapshot and keeps the page in step with it, in place
// (rows are kept by key, so nothing flickers and a button under the mouse stays where it is).
// Rates are worked out here, from successive snapshots timed by the server's clock, and drawn
// as small SVG sparklines. Every text from the server goes in with textContent, never as HTML.
"use strict";

(() => {
  const body = document.body;
  const ACTIONS = body.dataset.actions === "true";
  const TOKEN = body.dataset.csrfToken || "";
  const INTERVAL_MS = Math.max(250, Number(body.dataset.intervalMs) || 2000);
  const HISTORY = 60; // points per sparkline
  const WINDOW_MS = 5000; // each point is the rate over this long: steadier than look to look
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const streamsEl = $("streams");
  const banner = $("banner");
  const notice = $("notice");

  /** A sparkline's rate history per key ("in stream", "out stream", "out stream group"). */
  const series = new Map();
  /** The parts of each stream's section, by stream name. */
  const sections = new Map();
  /** The rows of each table body, by key. */
  const rowsOf = new WeakMap();
  let lastSeen = null;

  // -- small helpers --------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function count(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  /** A duration for people, as the command line shows it: 850ms, 12.3s, 4m05s, 2h03m, 3d04h. */
  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return `${ms}ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)}s`;
    const pad = (n) => String(n).padStart(2, "0");
    let minutes = Math.floor(ms / 60000);
    const seconds = Math.floor(ms / 1000) % 60;
    if (minutes < 60) return `${minutes}m${pad(seconds)}s`;
    let hours = Math.floor(minutes / 60);
    minutes %= 60;
    if (hours < 24) return `${hours}h${pad(minutes)}m`;
    const days = Math.floor(hours / 24);
    hours %= 24;
    return `${days}d${pad(hours)}h`;
  }

  function perSecond(rate) {
    if (rate === null || rate === undefined) return "–";
    return `${rate >= 100 ? rate.toFixed(0) : rate.toFixed(1)}/s`;
  }

  function clock(ms) {
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  /** The CSS class of a verdict or a consumer status. */
  function tone(statusText) {
    if (!statusText) return "unknown";
    if (statusText === "OK") return "ok";
    if (statusText.startsWith("WARNING")) return "warn";
    if (statusText === "CRITICAL" || statusText === "DEAD") return "bad";
    return "unknown";
  }

  function badge(node, statusText) {
    setText(node, statusText);
    const wanted = `badge ${tone(statusText)}`;
    if (node.className !== wanted) node.className = wanted;
  }

  // -- rates and sparklines -------------------------------------------------------------------

  function seriesOf(key) {
    let s = series.get(key);
    if (!s) {
      s = { samples: [], rates: [], added: false, waiting: false };
      series.set(key, s);
    }
    return s;
  }

  function push(s, rate) {
    s.rates.push(rate);
    if (s.rates.length > HISTORY) s.rates.shift();
    s.added = true;
  }

  /** Record a counter's value at the server time timeMs, and its rate over the last
   * WINDOW_MS (at least since the previous value: a rate needs two looks). Returns the series;
   * its "added" is true when this value made a new point. */
  function track(key, timeMs, value) {
    const s = seriesOf(key);
    s.added = false;
    if (value === null || value === undefined) {
      s.samples = [];
      s.waiting = false;
      return s;
    }
    const samples = s.samples;
    const last = samples[samples.length - 1];
    if (last && timeMs <= last.t) return s; // the same snapshot again
    if (last && value < last.v) {
      samples.length = 0; // the counter went back: the stream or group was made again
      s.rates = [];
    }
    samples.push({ t: timeMs, v: value });
    while (samples.length > 2 && samples[1].t <= timeMs - WINDOW_MS) samples.shift();
    s.waiting = samples.length < 2;
    if (samples.length >= 2) push(s, ((value - samples[0].v) * 1000) / (timeMs - samples[0].t));
    return s;
  }

  function sparkline() {
    const box = el("span", "spark");
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 100 24");
    svg.setAttribute("width", "100");
    svg.setAttribute("height", "24");
    svg.setAttribute("aria-hidden", "true");
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", "");
    svg.appendChild(line);
    const label = el("span", "rate", "–");
    box.append(svg, label);
    return box;
  }

  function drawSpark(box, s) {
    const rates = s ? s.rates : [];
    const line = box.querySelector("polyline");
    const label = box.querySelector(".rate");
    if (!rates.length) {
      line.setAttribute("points", "");
      setText(label, s && s.waiting ? "…" : "–"); // "…": a rate needs two looks
      return;
    }
    const top = Math.max(...rates, 1e-9);
    const step = 100 / (HISTORY - 1);
    const start = 100 - step * (rates.length - 1);
    const points = rates.map((r, i) => {
      const x = start + step * i;
      const y = 22 - (20 * r) / top;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (points.length === 1) points.unshift(`${(start - step).toFixed(1)},${points[0].split(",")[1]}`);
    line.setAttribute("points", points.join(" "));
    setText(label, perSecond(rates[rates.length - 1]));
  }

  // -- tables kept by key ---------------------------------------------------------------------

  function table(headers, className) {
    const t = el("table", className);
    const head = t.createTHead().insertRow();
    for (const h of headers) head.appendChild(el("th", null, h));
    const tbody = t.createTBody();
    const empty = el("p", "empty muted", "none");
    const wrap = el("div", "table-wrap");
    wrap.append(t, empty);
    return { wrap, tbody, empty };
  }

  /** Make tbody's rows those of items, in order: a row per key, made once, updated after. */
  function syncRows(parts, items, keyOf, make, update) {
    const { tbody, empty } = parts;
    const old = rowsOf.get(tbody) || new Map();
    const now = new Map();
    items.forEach((item, i) => {
      const key = keyOf(item);
      let row = old.get(key);
      if (!row) row = make(item);
      update(row, item);
      now.set(key, row);
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
    });
    for (const [key, row] of old) if (!now.has(key)) row.remove();
    rowsOf.set(tbody, now);
    empty.hidden = items.length > 0;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    const parts = {};
    for (const [name, node] of cells) {
      const td = el("td", `c-${name}`);
      if (node) td.appendChild(node);
      tr.appendChild(td);
      parts[name] = td;
    }
    tr.cells_ = parts;
    return tr;
  }

  // -- a stream's section ---------------------------------------------------------------------

  function actionButton(action, text, stream, question) {
    const button = el("button", `action ${action}`, text);
    button.type = "button";
    button.dataset.action = action;
    button.dataset.stream = stream;
    button.addEventListener("click", () => act(button, action, stream, question()));
    return button;
  }

  function card(label, content) {
    const box = el("div", "card");
    box.append(el("div", "card-label", label), content);
    return box;
  }

  function makeSection(name) {
    const section = el("section", "stream");
    section.dataset.stream = name;
    const parts = { section, name, deadCount: 0 };

    const head = el("h2");
    parts.health = el("span", "badge unknown", "…");
    head.append(el("span", "s-name", name), parts.health);
    parts.reasons = el("ul", "reasons");
    parts.error = el("p", "s-error");
    parts.error.hidden = true;

    parts.length = el("span", "figure s-length", "–");
    parts.lastId = el("span", "figure small s-last-id", "–");
    parts.inSpark = sparkline();
    parts.inSpark.classList.add("s-in");
    parts.outSpark = sparkline();
    parts.outSpark.classList.add("s-out");
    parts.deadFigure = el("span", "figure s-dead", "–");
    const cards = el("div", "cards");
    cards.append(
      card("length", parts.length),
      card("in (added)", parts.inSpark),
      card("out (acked, slowest group)", parts.outSpark),
      card("dead letters", parts.deadFigure),
      card("last id", parts.lastId),
    );

    parts.groups = table(
      ["group", "health", "lag", "pending", "oldest pending", "consumers", "out (acked)"],
      "groups",
    );
    parts.consumers = table(
      ["group", "consumer", "status", "idle", "pending", "heartbeat age"],
      "consumers",
    );
    parts.dead = table(
      ["dead-lettered", "origin id", "group", "consumer", "deliveries", "error", "fields"],
      "dead-letters",
    );

    const consumersHead = el("h3", null, "Consumers");
    const deadHead = el("h3");
    parts.deadKey = el("span", "key");
    deadHead.append(el("span", null, "Dead letters"), parts.deadKey);
    parts.buttons = [];
    if (ACTIONS) {
      const cleanup = actionButton(
        "cleanup",
        "Clean up dead consumers",
        name,
        () =>
          `Clean up the consumers of ${name}? The pending entries of DEAD consumers move to ` +
          "live ones, and consumers that own nothing and are dead (or idle without heartbeats) " +
          "are removed. No entry is lost.",
      );
      consumersHead.appendChild(cleanup);
      parts.replay = actionButton(
        "replay",
        "Replay all",
        name,
        () =>
          `Replay the ${count(parts.deadCount)} dead letters of ${name} to their origin ` +
          "streams? They are added there as new entries and leave the dead-letter stream.",
      );
      parts.purge = actionButton(
        "purge",
        "Purge all",
        name,
        () => `Delete the ${count(parts.deadCount)} dead letters of ${name} for good? It cannot be undone.`,
      );
      deadHead.append(parts.replay, parts.purge);
    }

    section.append(
      head,
      parts.reasons,
      parts.error,
      cards,
      el("h3", null, "Groups"),
      parts.groups.wrap,
      consumersHead,
      parts.consumers.wrap,
      deadHead,
      parts.dead.wrap,
    );
    return parts;
  }

  function setReasons(list, reasons) {
    const text = reasons.join("\n");
    if (list.dataset.text === text) return;
    list.dataset.text = text;
    list.replaceChildren(...reasons.map((r) => el("li", null, r)));
  }

  function groupRow() {
    const health = el("span", "badge unknown");
    const tr = row([
      ["name", null],
      ["health", health],
      ["lag", null],
      ["pending", null],
      ["oldest", null],
      ["consumers", null],
      ["out", sparkline()],
    ]);
    tr.health_ = health;
    return tr;
  }

  function consumerRow() {
    const statusBadge = el("span", "badge unknown");
    const tr = row([
      ["group", null],
      ["name", null],
      ["status", statusBadge],
      ["idle", null],
      ["pending", null],
      ["heartbeat", null],
    ]);
    tr.status_ = statusBadge;
    return tr;
  }

  function deadRow() {
    return row([
      ["time", null],
      ["origin", null],
      ["group", null],
      ["consumer", null],
      ["deliveries", null],
      ["error", null],
      ["fields", null],
    ]);
  }

  function renderStream(view) {
    let parts = sections.get(view.name);
    if (!parts) {
      parts = makeSection(view.name);
      sections.set(view.name, parts);
    }
    streamsEl.appendChild(parts.section); // keeps the order of the views
    badge(parts.health, view.health.status);
    setReasons(parts.reasons, view.health.reasons);
    parts.error.hidden = !view.error;
    setText(parts.error, view.error || "");

    const snap = view.snapshot;
    const groups = snap ? snap.groups : [];
    const time = snap ? snap.time_ms : 0;
    // a group's rate out: entries that left its pending list (acked or dead-lettered)
    const outOf = new Map();
    for (const g of groups) {
      const done = g.entries_read === null ? null : g.entries_read - g.pending;
      outOf.set(g.name, track(`out ${view.name} ${g.name}`, time, done));
    }
    if (snap) {
      setText(parts.length, count(snap.stream.length));
      setText(parts.lastId, snap.stream.last_generated_id || "–");
      drawSpark(parts.inSpark, track(`in ${view.name}`, time, snap.stream.entries_added));
      // the stream's rate out: its slowest group's (each group reads every entry)
      const out = seriesOf(`out ${view.name}`);
      const fresh = [...outOf.values()];
      out.waiting = fresh.length > 0;
      if (fresh.length && fresh.every((s) => s.added)) {
        push(out, Math.min(...fresh.map((s) => s.rates[s.rates.length - 1])));
      }
      drawSpark(parts.outSpark, out);
    }

    syncRows(
      parts.groups,
      groups,
      (g) => g.name,
      groupRow,
      (tr, g) => {
        const c = tr.cells_;
        setText(c.name, g.name);
        const health = view.group_health[g.name];
        badge(tr.health_, health ? health.status : "UNKNOWN");
        tr.health_.title = health ? health.reasons.join("\n") : "";
        let lag = g.lag === null ? "?" : count(g.lag);
        if (g.lag !== null && g.lag_estimated) lag = `≈${lag}`;
        setText(c.lag, lag);
        setText(c.pending, count(g.pending));
        setText(c.oldest, g.pending ? duration(g.oldest_pending_age_ms) : "–");
        setText(c.consumers, count(g.consumers_count));
        drawSpark(c.out.firstChild, outOf.get(g.name));
      },
    );

    const consumers = groups.flatMap((g) => g.consumers);
    syncRows(
      parts.consumers,
      consumers,
      (c) => `${c.group}\u0000${c.name}`,
      consumerRow,
      (tr, c) => {
        tr.dataset.group = c.group;
        tr.dataset.consumer = c.name;
        const cells = tr.cells_;
        setText(cells.group, c.group);
        setText(cells.name, c.name);
        badge(tr.status_, c.status);
        setText(cells.idle, duration(c.idle_ms));
        setText(cells.pending, count(c.pending));
        setText(cells.heartbeat, duration(c.heartbeat_age_ms));
      },
    );

    const dead = view.dead_letters;
    parts.deadCount = dead ? dead.count : 0;
    setText(parts.deadFigure, dead ? count(dead.count) : "–");
    setText(parts.deadKey, dead ? dead.error || dead.stream : "");
    parts.deadKey.classList.toggle("error", Boolean(dead && dead.error));
    if (parts.replay) {
      parts.replay.disabled = !parts.deadCount;
      parts.purge.disabled = !parts.deadCount;
    }
    syncRows(
      parts.dead,
      dead ? dead.newest : [],
      (d) => d.id,
      deadRow,
      (tr, d) => {
        tr.dataset.id = d.id;
        const c = tr.cells_;
        setText(c.time, d.time_ms ? clock(d.time_ms) : d.id);
        setText(c.origin, d.origin_id ? `${d.origin_stream} ${d.origin_id}` : "–");
        setText(c.group, d.group || "–");
        setText(c.consumer, d.consumer || "–");
        setText(c.deliveries, count(d.deliveries));
        setText(c.error, d.error || "–");
        const fields = Object.entries(d.fields).map(([k, v]) => `${k}=${v}`);
        if (d.more_fields) fields.push(`… ${d.more_fields} more`);
        setText(c.fields, fields.join(" "));
      },
    );
  }

  const RANK = { ok: 0, warn: 1, bad: 2, unknown: 3 };

  function render(view) {
    lastSeen = view.taken_ms;
    setText($("server"), view.server);
    setText($("updated"), `updated ${new Date(view.taken_ms).toLocaleTimeString()}`);
    for (const stream of view.streams) renderStream(stream);
    for (const [name, parts] of sections) {
      if (!view.streams.some((s) => s.name === name)) {
        parts.section.remove();
        sections.delete(name);
      }
    }
    let worst = "OK";
    for (const s of view.streams) {
      if (RANK[tone(s.health.status)] > RANK[tone(worst)]) worst = s.health.status;
    }
    badge($("overall"), worst);
    document.title = `${worst} · conveyor`;
  }

  // -- the banner, notices, polling -----------------------------------------------------------

  function showBanner(text) {
    const since = lastSeen ? ` The figures below are from ${new Date(lastSeen).toLocaleTimeString()}.` : "";
    setText(banner, `${text} Retrying every ${INTERVAL_MS / 1000} s.${since}`);
    banner.hidden = false;
    body.classList.add("stale");
    badge($("overall"), "UNKNOWN");
    document.title = "UNKNOWN · conveyor";
  }

  function hideBanner() {
    banner.hidden = true;
    body.classList.remove("stale");
  }

  function showNotice(text, ok) {
    setText(notice, text);
    notice.className = `notice ${ok ? "ok" : "bad"}`;
    notice.hidden = false;
  }

  let timer = null;
  let polling = false;
  let again = false;

  async function poll() {
    if (polling) {
      again = true;
      return;
    }
    polling = true;
    clearTimeout(timer);
    try {
      const reply = await fetch("api/snapshot", { cache: "no-store", credentials: "same-origin" });
      let view = null;
      try {
        view = await reply.json();
      } catch {
        view = null;
      }
      if (reply.ok && view && view.reachable) {
        hideBanner();
        render(view);
      } else {
        showBanner((view && view.error) || `The dashboard answered ${reply.status}.`);
      }
    } catch {
      showBanner("The dashboard does not answer (was it stopped?).");
    } finally {
      polling = false;
      if (again) {
        again = false;
        poll();
      } else {
        timer = setTimeout(poll, INTERVAL_MS);
      }
    }
  }

  function summary(done) {
    if (done.action === "replay") {
      let text = `replayed ${done.replayed} of ${done.matched} dead letters of ${done.stream}`;
      if (done.skipped) text += `, ${done.skipped} skipped without provenance`;
      if (done.failed) text += `, ${done.failed} failed (still dead letters)`;
      return text;
    }
    if (done.action === "purge") return `purged ${done.purged} dead letters of ${done.stream}`;
    const removed = done.removed.map((r) => `${r.consumer} (${r.group})`).join(", ") || "none";
    return `cleanup of ${done.stream}: moved ${done.moved} pending entries; removed consumers: ${removed}`;
  }

  async function act(button, action, stream, question) {
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      const reply = await fetch(`api/actions/${action}`, {
        method: "POST",
        cache: "no-store",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": TOKEN },
        body: JSON.stringify({ stream }),
      });
      let done = null;
      try {
        done = await reply.json();
      } catch {
        done = null;
      }
      if (reply.ok && done) showNotice(summary(done), true);
      else showNotice((done && done.error) || `${action} failed: the dashboard answered ${reply.status}`, false);
    } catch {
      showNotice(`${action} failed: the dashboard does not answer`, false);
    } finally {
      button.disabled = false;
      poll();
    }
  }

  setText(
    $("footer"),
    ACTIONS
      ? "Actions are on: replay and purge dead letters, clean up dead consumers (each asks first)."
      : "Read-only: start with --allow-actions to replay or purge dead letters and clean up dead consumers.",
  );
  poll();
})();
