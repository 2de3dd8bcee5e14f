/*
 * roomcast.js: a small dependency-free browser client for roomcast (ES2017, no build step).
 * Copy it freely. Wire protocol: docs/protocol.md.
 *
 *   const c = new RoomcastClient({
 *     url: "ws://host:8080/",          // default: ws(s)://<this page's host>/
 *     token: "eyJ...",                 // optional JWT, sent as ?token=
 *     dialect: "subscribe",            // or "join"
 *     onMessage(room, text, meta) {},  // meta: {own, local, offset, epoch, envelope, ambiguous}
 *     onStatus(status, detail) {},     // "connecting" | "connected" | "reconnecting" | "closed"
 *     onJoined(room, info) {},         // join answered (envelope `subscribed`); bare mode: join sent
 *     onPresence(room, count) {},
 *     onGap(room, why) {},             // why: "gap" (server `gap` frame) | "not recovered" (resume failed)
 *     onError(code, message, info) {}, // server error codes, plus "queue_full", "closed", "bad_frame"
 *   });
 *   c.join("lobby"); c.send("lobby", "hi"); c.presence("lobby"); c.leave("lobby"); c.close();
 *   c.setToken(t)   // new token: used on reconnect; sent now as {"type":"auth"} (server refresh)
 *
 * Connection. Always offers the `roomcast.v2` subprotocol. When the server selects it
 * (`c.envelope === true`) every server frame is JSON: deliveries name their room and carry
 * offset/epoch when the server keeps history. Otherwise (version 1, "bare" mode) a delivery is
 * just the sender's string: the client then attributes it to its only room, or to `null` with
 * `meta.ambiguous = true` when it holds several. Error and presence answers are JSON in both
 * modes, so in bare mode a delivery that happens to look like
 * {"type":"error","code":...} or {"type":"presence","count":...} is taken for an answer.
 * Prefer envelope mode.
 *
 * Dialects. "subscribe": SUBSCRIBE / sendMessage / UNSUBSCRIBE; every member hears a message,
 * the sender too: the echo of our own send is flagged meta.own (matched by text, in send order).
 * "join": join / chat / leave; the server does not echo a chat to its sender, so the client
 * reports its own chat itself with meta.own = meta.local = true when it goes on the wire.
 * Several rooms are allowed in both; in "join" a chat names its room (payload.roomId) as soon
 * as more than one room is held.
 *
 * Reconnect. On any close except close() and the codes that mean "do not retry" (4001
 * unauthorized / token expired, 4003 revoked) it reconnects with full-jitter exponential backoff
 * (base 250 ms, cap 10 s; the attempt count resets once a connection stayed open 10 s), rejoins
 * every room, and in envelope mode resumes each room it has an offset+epoch for with `since`.
 * A resume answered recovered:false is reported as onGap(room, "not recovered"); fetch what you
 * need from GET /api/history. A refused handshake (401/403/429/503) looks like a plain close
 * (1006) to a browser, so it is retried with backoff.
 *
 * Sends while not connected (or while resumed joins are pending) are queued, up to maxQueue
 * (default 100; beyond it onError("queue_full")), and sent after the rejoin is answered.
 * Server data is only ever handed to callbacks as strings/numbers; never evaluated.
 */
(function (root) {
  "use strict";

  var PROTOCOL = "roomcast.v2";
  var NO_RETRY = { 4001: true, 4003: true };
  var OPEN = 1;
  var noop = function () {};

  function defaultUrl() {
    var loc = root && root.location;
    if (!loc || !loc.host) return "ws://127.0.0.1:8080/";
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/";
  }

  function withToken(url, token) {
    if (!token) return url;
    return url + (url.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(token);
  }

  function hasPos(m) {
    return typeof m.offset === "number" && typeof m.epoch === "string";
  }

  class RoomcastClient {
    constructor(opts) {
      opts = opts || {};
      this.url = opts.url || defaultUrl();
      this.token = opts.token || "";
      this.dialect = opts.dialect === "join" ? "join" : "subscribe";
      this.onMessage = opts.onMessage || noop;
      this.onStatus = opts.onStatus || noop;
      this.onJoined = opts.onJoined || noop;
      this.onPresence = opts.onPresence || noop;
      this.onGap = opts.onGap || noop;
      this.onError = opts.onError || noop;
      this.maxQueue = opts.maxQueue > 0 ? opts.maxQueue : 100;
      this.baseDelay = opts.baseDelay > 0 ? opts.baseDelay : 250;
      this.maxDelay = opts.maxDelay > 0 ? opts.maxDelay : 10000;
      this.stableAfter = opts.stableAfter > 0 ? opts.stableAfter : 10000;
      this.joinTimeout = opts.joinTimeout > 0 ? opts.joinTimeout : 5000;
      this._WS = opts.WebSocket || root.WebSocket;

      this.status = "idle";
      this.envelope = false;
      this._rooms = new Map(); // room -> {offset, epoch, joined}; insertion order = join order
      this._queue = []; // [{room, text}] waiting for a connection / rejoin
      this._own = []; // [{room, text, id}] own sends whose echo is expected (subscribe dialect)
      this._ids = new Map(); // send id -> room (envelope mode), to name the room of an error
      this._pending = new Set(); // rooms whose (re)join is not answered yet
      this._ready = false; // connected, rejoined, queue flushed
      this._ws = null;
      this._closed = false;
      this._attempt = 0;
      this._openedAt = 0;
      this._seq = 0;
      this._retryTimer = null;
      this._flushTimer = null;
      var self = this;
      this._retryTimer = setTimeout(function () { self._retryTimer = null; self._open(); }, 0);
    }

    static defaultUrl() { return defaultUrl(); }

    get connected() { return !!this._ws && this._ws.readyState === OPEN; }
    get rooms() { return Array.from(this._rooms.keys()); }
    position(room) {
      var st = this._rooms.get(room);
      return st && st.offset !== null ? { offset: st.offset, epoch: st.epoch } : null;
    }

    join(room) {
      room = String(room);
      if (this._closed || this._rooms.has(room)) return;
      var st = { offset: null, epoch: null, joined: false };
      this._rooms.set(room, st);
      if (this.connected) this._sendJoin(room, st);
    }

    leave(room) {
      room = String(room);
      if (!this._rooms.has(room)) return;
      this._rooms.delete(room);
      this._pending.delete(room);
      this._queue = this._queue.filter(function (q) { return q.room !== room; });
      this._own = this._own.filter(function (o) { return o.room !== room; });
      if (this.connected) {
        this._raw(this.dialect === "join"
          ? { type: "leave", payload: { roomId: room } }
          : { type: "UNSUBSCRIBE", room: room });
      }
      this._maybeFlush();
    }

    send(room, text) {
      room = String(room);
      text = String(text);
      if (this._closed) { this.onError("closed", "client is closed", { room: room }); return false; }
      if (this._ready && this.connected) { this._transmit(room, text); return true; }
      if (this._queue.length >= this.maxQueue) {
        this.onError("queue_full", "send queue full (" + this.maxQueue + "), message dropped", { room: room });
        return false;
      }
      this._queue.push({ room: room, text: text });
      return true;
    }

    presence(room) {
      if (!this.connected) return false;
      this._raw({ type: "presence", room: String(room) });
      return true;
    }

    setToken(token) {
      this.token = token || "";
      if (this.connected && this.token) this._raw({ type: "auth", token: this.token });
    }

    close() {
      if (this._closed) return;
      this._closed = true;
      this._ready = false;
      clearTimeout(this._retryTimer);
      clearTimeout(this._flushTimer);
      this._queue = [];
      var ws = this._ws;
      this._ws = null;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(1000, "bye"); } catch (e) { /* already closing */ }
      }
      this._setStatus("closed", { code: 1000, reason: "closed by client", deliberate: true });
    }

    // ---- internals ----

    _setStatus(status, detail) {
      this.status = status;
      this.onStatus(status, detail || {});
    }

    _open() {
      if (this._closed) return;
      var self = this;
      var ws;
      this._setStatus("connecting", { attempt: this._attempt });
      try {
        ws = new this._WS(withToken(this.url, this.token), [PROTOCOL]);
      } catch (e) {
        // A malformed URL: retrying cannot help.
        this._closed = true;
        this.onError("bad_url", String(e && e.message || e), {});
        this._setStatus("closed", { code: 0, reason: "bad url" });
        return;
      }
      this._ws = ws;
      this._openedAt = 0;
      ws.onopen = function () { if (ws === self._ws) self._onOpen(ws); };
      ws.onmessage = function (e) { if (ws === self._ws) self._onFrame(e.data); };
      ws.onclose = function (e) { if (ws === self._ws) self._onClose(e.code, e.reason); };
      ws.onerror = noop; // a close event always follows
    }

    _onOpen(ws) {
      this.envelope = ws.protocol === PROTOCOL;
      this._openedAt = Date.now();
      this._setStatus("connected", { envelope: this.envelope, protocol: ws.protocol || "" });
      this._pending.clear();
      this._ready = false;
      var self = this;
      this._rooms.forEach(function (st, room) { self._sendJoin(room, st); });
      if (this._pending.size > 0) {
        this._flushTimer = setTimeout(function () { self._flush(); }, this.joinTimeout);
      } else {
        this._flush();
      }
    }

    _onClose(code, reason) {
      this._ws = null;
      this._ready = false;
      clearTimeout(this._flushTimer);
      this._pending.clear();
      this._rooms.forEach(function (st) { st.joined = false; });
      var openedFor = this._openedAt ? Date.now() - this._openedAt : 0;
      if (NO_RETRY[code]) {
        this._closed = true;
        this._queue = [];
        this._setStatus("closed", { code: code, reason: reason || "code " + code });
        return;
      }
      if (openedFor >= this.stableAfter) this._attempt = 0;
      var cap = Math.min(this.maxDelay, this.baseDelay * Math.pow(2, this._attempt));
      var delay = Math.floor(Math.random() * cap);
      this._attempt = Math.min(this._attempt + 1, 30);
      var self = this;
      this._setStatus("reconnecting", { delay: delay, code: code, reason: reason || "" });
      this._retryTimer = setTimeout(function () { self._retryTimer = null; self._open(); }, delay);
    }

    _sendJoin(room, st) {
      var since = this.envelope && st.offset !== null && st.epoch !== null
        ? { offset: st.offset, epoch: st.epoch } : null;
      var frame;
      if (this.dialect === "join") {
        frame = { type: "join", payload: { roomId: room } };
        if (since) frame.payload.since = since;
      } else {
        frame = { type: "SUBSCRIBE", room: room };
        if (since) frame.since = since;
      }
      this._raw(frame);
      if (this.envelope) {
        this._pending.add(room);
      } else {
        st.joined = true; // version 1: no answer to a join
        this.onJoined(room, { envelope: false });
      }
    }

    _maybeFlush() {
      if (!this._ready && this.connected && this._pending.size === 0) this._flush();
    }

    _flush() {
      clearTimeout(this._flushTimer);
      if (!this.connected) return;
      this._ready = true;
      var q = this._queue;
      this._queue = [];
      for (var i = 0; i < q.length; i++) this._transmit(q[i].room, q[i].text);
    }

    _transmit(room, text) {
      var frame;
      if (this.dialect === "join") {
        frame = { type: "chat", payload: { message: text } };
        if (this._rooms.size > 1 || !this._rooms.has(room)) frame.payload.roomId = room;
      } else {
        frame = { type: "sendMessage", roomId: room, message: text };
      }
      var id = null;
      if (this.envelope) {
        id = "c" + (++this._seq);
        frame.id = id;
        this._ids.set(id, room);
        if (this._ids.size > 1000) this._ids.delete(this._ids.keys().next().value);
      }
      this._raw(frame);
      if (this.dialect === "join") {
        this.onMessage(room, text, { own: true, local: true, envelope: this.envelope });
      } else if (this._rooms.has(room)) {
        this._own.push({ room: room, text: text, id: id });
        if (this._own.length > 256) this._own.shift();
      }
    }

    _raw(obj) {
      try { this._ws.send(JSON.stringify(obj)); } catch (e) { /* closing: onclose follows */ }
    }

    // Is this delivery the echo of one of our own sends? Echoes come in send order per room,
    // so a match also retires older entries of that room (sends that never came back).
    _matchOwn(room, text) {
      var own = this._own;
      for (var i = 0; i < own.length; i++) {
        if (own[i].text === text && (room === null || own[i].room === room)) {
          var r = own[i].room;
          this._own = own.filter(function (o, j) { return j > i || o.room !== r; });
          return true;
        }
      }
      return false;
    }

    _onFrame(data) {
      if (typeof data !== "string") return;
      if (!this.envelope) return this._onBare(data);
      var m;
      try { m = JSON.parse(data); } catch (e) { m = null; }
      if (!m || typeof m !== "object") { this.onError("bad_frame", "not JSON in envelope mode", {}); return; }
      var st = typeof m.room === "string" ? this._rooms.get(m.room) : undefined;
      switch (m.type) {
        case "message":
          if (st && hasPos(m)) { st.offset = m.offset; st.epoch = m.epoch; }
          this.onMessage(m.room, String(m.message), {
            own: this._own.length > 0 && this._matchOwn(m.room, String(m.message)),
            local: false,
            offset: typeof m.offset === "number" ? m.offset : null,
            epoch: typeof m.epoch === "string" ? m.epoch : null,
            envelope: true,
          });
          break;
        case "subscribed":
          if (!st) break; // left meanwhile
          if (hasPos(m)) { st.offset = m.offset; st.epoch = m.epoch; }
          st.joined = true;
          this._pending.delete(m.room);
          if (m.recovered === false) this.onGap(m.room, "not recovered");
          this.onJoined(m.room, {
            envelope: true,
            offset: typeof m.offset === "number" ? m.offset : null,
            epoch: typeof m.epoch === "string" ? m.epoch : null,
            recovered: typeof m.recovered === "boolean" ? m.recovered : null,
          });
          this._maybeFlush();
          break;
        case "gap":
          if (st) this.onGap(m.room, "gap");
          break;
        case "presence":
          this.onPresence(m.room, Number(m.count));
          break;
        case "ack":
          this._ids.delete(m.id);
          break;
        case "error": {
          var room = typeof m.id === "string" && this._ids.has(m.id) ? this._ids.get(m.id) : null;
          if (room !== null) {
            this._ids.delete(m.id);
            this._own = this._own.filter(function (o) { return o.id !== m.id; });
          }
          this.onError(String(m.code), String(m.message || ""), { id: m.id || null, room: room });
          break;
        }
        default:
          break; // unsubscribed and anything newer: nothing to do
      }
    }

    _onBare(data) {
      if (data.charCodeAt(0) === 123) { // "{": maybe an error or presence answer
        var m = null;
        try { m = JSON.parse(data); } catch (e) { m = null; }
        if (m && m.type === "error" && typeof m.code === "string") {
          this.onError(m.code, String(m.message || ""), { id: null, room: null });
          return;
        }
        if (m && m.type === "presence" && typeof m.count === "number") {
          this.onPresence(m.room, m.count);
          return;
        }
      }
      var room = null;
      var ambiguous = this._rooms.size !== 1;
      if (!ambiguous) room = this._rooms.keys().next().value;
      this.onMessage(room, data, {
        own: this._own.length > 0 && this._matchOwn(room, data),
        local: false, offset: null, epoch: null, envelope: false, ambiguous: ambiguous,
      });
    }
  }

  var api = { RoomcastClient: RoomcastClient, PROTOCOL: PROTOCOL, NO_RETRY_CODES: Object.keys(NO_RETRY).map(Number) };
  root.RoomcastClient = RoomcastClient;
  root.Roomcast = api;
  if (typeof module === "object" && module && module.exports) module.exports = api;
})(typeof window !== "undefined" ? window : globalThis);
