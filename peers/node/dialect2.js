'use strict';
// Baseline Node.js server for dialect 2 (SUBSCRIBE / sendMessage), fanned out
// across nodes with Redis Pub/Sub.
//
//   {"type":"SUBSCRIBE","room":"room1"}
//   {"type":"sendMessage","roomId":"room1","message":"hi"}
//
// sendMessage publishes {"type":"sendMessage","roomId":..,"message":..} on the
// Redis channel named by the room. The node subscribes to a room's channel when
// its first local member arrives (and drops it when the last one leaves); on a
// channel message it sends the bare message string to every local subscriber
// of that room, the sender included.
//
// Bad input is ignored (no reply, no crash). Memberships go on close.

const { WebSocketServer, WebSocket } = require('ws');
const Redis = require('ioredis');

const PORT = Number(process.env.PORT) || 8082;
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';

const publisher = new Redis(REDIS_URL);
const subscriber = new Redis(REDIS_URL);

publisher.on('error', (err) => console.error('redis publisher:', err.message));
subscriber.on('error', (err) => console.error('redis subscriber:', err.message));

/** room -> Set of local sockets subscribed to it */
const rooms = new Map();

subscriber.on('message', (channel, raw) => {
  const sockets = rooms.get(channel);
  if (!sockets) return;
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    return;
  }
  if (!msg || typeof msg.message !== 'string') return;
  for (const ws of sockets) {
    if (ws.readyState === WebSocket.OPEN) ws.send(msg.message);
  }
});

function isNonEmptyString(v) {
  return typeof v === 'string' && v.length > 0;
}

function subscribe(ws, room) {
  let sockets = rooms.get(room);
  if (!sockets) {
    sockets = new Set();
    rooms.set(room, sockets);
    subscriber.subscribe(room).catch((err) => console.error('subscribe', room, err.message));
  }
  sockets.add(ws);
  ws.rooms.add(room);
}

function unsubscribe(ws, room) {
  const sockets = rooms.get(room);
  if (!sockets) return;
  sockets.delete(ws);
  if (sockets.size === 0) {
    rooms.delete(room);
    subscriber.unsubscribe(room).catch((err) => console.error('unsubscribe', room, err.message));
  }
}

const wss = new WebSocketServer({ port: PORT });

wss.on('connection', (ws) => {
  ws.rooms = new Set();
  ws.on('error', () => {}); // a broken socket must not take the process down

  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object') return;

    if (msg.type === 'SUBSCRIBE') {
      if (!isNonEmptyString(msg.room)) return;
      subscribe(ws, msg.room);
      return;
    }

    if (msg.type === 'sendMessage') {
      const { roomId, message } = msg;
      if (!isNonEmptyString(roomId) || typeof message !== 'string') return;
      publisher
        .publish(roomId, JSON.stringify({ type: 'sendMessage', roomId, message }))
        .catch((err) => console.error('publish', roomId, err.message));
    }
  });

  ws.on('close', () => {
    for (const room of ws.rooms) unsubscribe(ws, room);
    ws.rooms.clear();
  });
});

wss.on('listening', () => {
  console.log(`dialect2 listening on ${PORT} (redis ${REDIS_URL})`);
});

function shutdown() {
  for (const client of wss.clients) client.terminate();
  wss.close(() => {
    Promise.allSettled([publisher.quit(), subscriber.quit()]).then(() => process.exit(0));
  });
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
