// The dashboard's script, served as its own file so the page's Content-Security-Policy
// can forbid inline scripts.
(function () {
  "use strict";
  var HISTORY = 120;
  var $ = function (id) { return document.getElementById(id); };
  var prev = null;
  var series = { connections: [], messages: [], deliveries: [], fanout: [] };
  var lastAt = 0;

  function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }
  function fmt(v, digits) {
    if (v === null) return "–";
    if (digits === undefined) digits = Math.abs(v) < 10 && v % 1 !== 0 ? 1 : 0;
    return v.toFixed(digits);
  }
  // Every figure: textContent is the formatted number (no separators), data-value the raw one.
  function fig(id, v, digits) {
    var el = $(id);
    el.setAttribute("data-value", v === null ? "" : String(v));
    el.textContent = fmt(v, digits);
  }
  function text(id, s) { var el = $(id); el.setAttribute("data-value", s === null ? "" : String(s)); el.textContent = s === null ? "–" : String(s); }
  // Per-second rate of a counter between two samples; null when unknown or the counter went back.
  function rate(cur, old, dt) {
    cur = num(cur); old = num(old);
    if (cur === null || old === null || !(dt > 0) || cur < old) return null;
    return (cur - old) / dt;
  }
  function push(name, v) {
    var s = series[name];
    s.push(v);
    if (s.length > HISTORY) s.shift();
  }
  function draw(name, chartId, maxId, unit) {
    var s = series[name], max = 0, i;
    for (i = 0; i < s.length; i++) if (s[i] !== null && s[i] > max) max = s[i];
    var top = max > 0 ? max * 1.1 : 1, pts = [], off = HISTORY - s.length;
    for (i = 0; i < s.length; i++) {
      if (s[i] === null) continue;
      pts.push((off + i) + "," + (40 - (s[i] / top) * 38 - 1).toFixed(2));
    }
    $(chartId).querySelector("polyline").setAttribute("points", pts.join(" "));
    $(maxId).textContent = s.length ? "max " + fmt(max) + unit + " over " + s.length + " s" : "";
  }

  function update(d) {
    var dt = prev && num(d.at_ms) !== null && num(prev.at_ms) !== null ? (d.at_ms - prev.at_ms) / 1000 : 0;
    var p = prev || {};

    var st = $("server-status");
    st.textContent = d.status || "–";
    st.setAttribute("data-value", d.status || "");
    st.className = "pill " + (d.status === "ok" ? "ok" : d.status ? "bad" : "");

    fig("connections", num(d.connections));
    fig("rooms", num(d.rooms));
    var mps = rate(d.messages_in, p.messages_in, dt);
    var dps = rate(d.deliveries, p.deliveries, dt);
    var wps = rate(d.writes, p.writes, dt);
    fig("messages-per-s", mps);
    fig("deliveries-per-s", dps);
    fig("writes-per-s", wps);
    var dw = prev ? num(d.writes) - num(p.writes) : null;
    var df = prev ? num(d.frames_out) - num(p.frames_out) : null;
    var fpw = dw !== null && dw > 0 && df !== null && df >= 0 && !isNaN(dw) && !isNaN(df) ? df / dw : null;
    fig("frames-per-write", fpw, 2);
    fig("slow-closes", num(d.slow_consumers_closed));
    fig("dropped", num(d.dropped));
    text("backplane", typeof d.backplane === "string" ? d.backplane : null);
    fig("backplane-dropped", num(d.backplane_dropped));
    var fo = d.fanout_us && typeof d.fanout_us === "object" ? d.fanout_us : null;
    var p99 = fo && num(fo.count) !== 0 ? num(fo.p99) : null;
    fig("fanout-p99", p99);
    fig("fanout-p50", fo && num(fo.count) !== 0 ? num(fo.p50) : null);
    var rss = num(d.rss_bytes);
    fig("rss", rss === null ? null : rss / 1048576, 1);
    $("rss").setAttribute("data-bytes", rss === null ? "" : String(rss));
    var cpu = rate(d.cpu_seconds, p.cpu_seconds, dt);
    fig("cpu", cpu === null ? null : cpu * 100, 0);

    refusals(d.refused_by || {}, p.refused_by || {}, dt);

    push("connections", num(d.connections));
    push("messages", mps);
    push("deliveries", dps);
    push("fanout", p99);
    draw("connections", "chart-connections", "max-connections", "");
    draw("messages", "chart-messages", "max-messages", "/s");
    draw("deliveries", "chart-deliveries", "max-deliveries", "/s");
    draw("fanout", "chart-fanout", "max-fanout", " µs");

    $("updated").textContent = "Last sample " + new Date(num(d.at_ms) || Date.now()).toLocaleTimeString() + ".";
    prev = d;
  }

  function refusals(cur, old, dt) {
    var body = $("refusals").tBodies[0];
    var reasons = Object.keys(cur).sort();
    while (body.firstChild) body.removeChild(body.firstChild);
    if (!reasons.length) {
      var tr0 = document.createElement("tr");
      tr0.className = "none";
      var td0 = document.createElement("td");
      td0.colSpan = 3; td0.textContent = "none";
      tr0.appendChild(td0); body.appendChild(tr0);
      return;
    }
    reasons.forEach(function (r) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-reason", r);
      var total = num(cur[r]), per = rate(cur[r], old[r] === undefined ? 0 : old[r], dt);
      var cells = [[r, null, "reason"], [fmt(total), total, "total"], [fmt(per), per, "rate"]];
      cells.forEach(function (c, i) {
        var td = document.createElement("td");
        td.textContent = c[0];
        td.className = c[2] + (i ? " n" : "");
        if (i) td.setAttribute("data-value", c[1] === null ? "" : String(c[1]));
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  function streamStatus(s, cls) {
    var el = $("stream-status");
    el.textContent = s;
    el.className = "pill " + cls;
  }

  var es = null, retry = null;
  function open() {
    retry = null;
    es = new EventSource("/dashboard/events");
    es.onopen = function () { streamStatus("live", "ok"); };
    es.onmessage = function (e) {
      var d;
      try { d = JSON.parse(e.data); } catch (err) { return; }
      if (!d || typeof d !== "object") return;
      lastAt = Date.now();
      streamStatus("live", "ok");
      update(d);
    };
    es.onerror = function () {
      streamStatus("disconnected, retrying", "bad");
      // The browser retries by itself unless the answer was not an event stream (CLOSED).
      if (es.readyState === 2 && !retry) { es.close(); retry = setTimeout(open, 2000); }
    };
  }
  // A stream that goes quiet without an error (a proxy holding it) counts as disconnected too.
  setInterval(function () {
    if (lastAt && Date.now() - lastAt > 5000) {
      streamStatus("disconnected, retrying", "bad");
      if (!retry) { es.close(); lastAt = 0; retry = setTimeout(open, 1000); }
    }
  }, 1000);
  open();
})();
