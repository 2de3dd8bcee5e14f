// The demo chat page's script, served as its own file so the page's Content-Security-Policy
// can forbid inline scripts.
(function () {
  "use strict";
  var MAX_ROWS = 500, MAX_BATCH = 200, RING = 1000;
  var $ = function (id) { return document.getElementById(id); };
  var now = function () { return performance.timeOrigin + performance.now(); };
  // Messages this demo page sends look like "name: text"; load generators' do not.
  var PAGE_MSG = /^[^:\n]{1,64}: /;

  function Ring(n) { this.n = n; this.a = []; this.i = 0; }
  Ring.prototype.push = function (x) {
    if (this.a.length < this.n) this.a.push(x); else { this.a[this.i] = x; this.i = (this.i + 1) % this.n; }
  };
  Ring.prototype.list = function () { return this.a.slice(this.i).concat(this.a.slice(0, this.i)); };
  Ring.prototype.clear = function () { this.a = []; this.i = 0; };

  var received = new Ring(RING), sent = new Ring(RING), all = new Ring(RING);
  var state = {
    status: "not connected", connected: false, joined: false, envelope: false,
    room: "", name: "", dialect: "", members: null,
    received: 0, rendered: 0, skipped: 0, errors: [],
  };
  var demo = window.roomcastDemo = {
    client: null,
    state: state,
    // last 1000 "name: text" messages sent by other pages (not this one): {text, at}; at is ms since epoch (float)
    get received() { return received.list(); },
    // last 1000 deliveries of any kind, own included: {text, at, own}
    get receivedAll() { return all.list(); },
    // last 1000 messages this page sent: {text, at} (at taken just before handing it to the client)
    get sent() { return sent.list(); },
  };

  // ---- prefill from the query string ----
  var q = new URLSearchParams(location.search);
  $("name").value = "guest-" + String(Math.floor(Math.random() * 10000)).padStart(4, "0");
  ["room", "name", "token"].forEach(function (k) { if (q.get(k)) $(k).value = q.get(k); });
  if (q.get("dialect") === "join" || q.get("dialect") === "subscribe") $("dialect").value = q.get("dialect");

  // ---- rendering: buffered, at most once per animation frame ----
  var buffer = [], scheduled = false, box = $("messages");
  function schedule() {
    if (!scheduled) { scheduled = true; requestAnimationFrame(render); }
  }
  function render() {
    scheduled = false;
    var batch = buffer;
    buffer = [];
    if (batch.length > MAX_BATCH) { state.skipped += batch.length - MAX_BATCH; batch = batch.slice(-MAX_BATCH); }
    if (batch.length) {
      var stick = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      var frag = document.createDocumentFragment();
      for (var i = 0; i < batch.length; i++) {
        var row = document.createElement("div");
        row.className = batch[i].own ? "message own" : "message";
        row.textContent = batch[i].text;
        frag.appendChild(row);
      }
      box.appendChild(frag);
      state.rendered += batch.length;
      var extra = box.childElementCount - MAX_ROWS;
      while (extra-- > 0) box.removeChild(box.firstChild);
      if (stick) box.scrollTop = box.scrollHeight;
    }
    $("received-count").textContent = String(state.received);
    $("rendered-count").textContent = String(state.rendered);
  }
  function enqueue(text, own) {
    buffer.push({ text: text, own: own });
    // A hidden tab gets no animation frames: keep the buffer bounded anyway.
    if (buffer.length > 4 * MAX_BATCH) { state.skipped += buffer.length - MAX_BATCH; buffer = buffer.slice(-MAX_BATCH); }
    schedule();
  }

  // ---- status ----
  var countdown = null;
  function setStatus(text) { state.status = text; $("status").textContent = text; }
  function showError(text) {
    state.errors.push(text); if (state.errors.length > 20) state.errors.shift();
    $("error").textContent = text;
  }
  function setJoined(on) {
    state.joined = on;
    if (on) document.body.dataset.joined = "1"; else delete document.body.dataset.joined;
  }
  function setMembers(n) {
    state.members = n;
    var el = $("members");
    el.textContent = n === null ? "–" : String(n);
    if (n === null) el.removeAttribute("data-value"); else el.setAttribute("data-value", String(n));
  }

  // ---- connection ----
  var presenceTimer = null;
  function stop() {
    clearInterval(presenceTimer); clearInterval(countdown);
    if (demo.client) { var c = demo.client; demo.client = null; c.close(); }
    setJoined(false); setMembers(null);
    state.connected = false;
  }

  function connect() {
    stop();
    var room = $("room").value.trim() || "lobby";
    var name = $("name").value.trim() || "guest";
    $("room").value = room; $("name").value = name;
    state.room = room; state.name = name; state.dialect = $("dialect").value;
    $("error").textContent = "";
    var client = new RoomcastClient({
      url: RoomcastClient.defaultUrl(),
      token: $("token").value.trim(),
      dialect: state.dialect,
      onMessage: function (r, text, meta) {
        if (client !== demo.client) return;
        var at = now();
        if (!meta.local) state.received++;
        all.push({ text: text, at: at, own: !!meta.own });
        if (!meta.own && PAGE_MSG.test(text)) received.push({ text: text, at: at });
        enqueue(text, !!meta.own);
      },
      onStatus: function (s, d) {
        if (client !== demo.client) return;
        clearInterval(countdown);
        state.connected = s === "connected";
        if (s === "connected") { state.envelope = client.envelope; setStatus("connected"); }
        else if (s === "connecting") setStatus("connecting");
        else if (s === "reconnecting") {
          setJoined(false);
          var until = Date.now() + d.delay;
          var tick = function () { setStatus("reconnecting in " + Math.max(0, Math.ceil((until - Date.now()) / 1000)) + "s"); };
          tick(); countdown = setInterval(tick, 250);
        } else if (s === "closed") {
          setJoined(false);
          clearInterval(presenceTimer);
          setStatus("closed: " + (d.reason || ("code " + d.code)));
        }
      },
      onJoined: function (r) {
        if (client !== demo.client || r !== room) return;
        setJoined(true);
        client.presence(room);
      },
      onPresence: function (r, count) {
        if (client !== demo.client || (r !== undefined && r !== null && r !== room)) return;
        setMembers(count);
      },
      onGap: function (r, why) {
        if (client !== demo.client) return;
        showError(why === "gap" ? "some messages were lost (gap)" : "reconnected: messages sent meanwhile could not be recovered");
      },
      onError: function (code, message) {
        if (client !== demo.client) return;
        showError(code + ": " + message);
      },
    });
    demo.client = client;
    client.join(room);
    presenceTimer = setInterval(function () { if (client.connected && state.joined) client.presence(room); }, 5000);
  }

  function send() {
    var input = $("text"), text = input.value;
    if (!text.trim()) return;
    if (!demo.client) connect();
    var msg = $("name").value.trim() + ": " + text;
    var at = now();
    if (demo.client.send(state.room, msg)) { sent.push({ text: msg, at: at }); input.value = ""; }
    input.focus();
  }

  $("setup").addEventListener("submit", function (e) { e.preventDefault(); connect(); });
  $("disconnect").addEventListener("click", function () { stop(); setStatus("closed: by you"); });
  $("send").addEventListener("click", send);
  $("compose").addEventListener("submit", function (e) { e.preventDefault(); send(); });
  $("text").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.isComposing) { e.preventDefault(); send(); }
  });

  if (q.get("auto") === "1") connect();
})();
