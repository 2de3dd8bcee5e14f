'use strict';
// Baseline Node.js server for dialect 1 (join / chat), in memory, single node.
//
// Written the way the original simple server was: one flat list of
// memberships { ws, roomId }. A connection's chat room is the first membership
// in that list that belongs to it (the earliest join), and `chat` walks the
// list sending the bare message to every other member of that room.
//
//   {"type":"join","payload":{"roomId":"red"}}
//   {"type":"chat","payload":{"message":"hi"}}   -> "hi" to the others in the room
//
// Bad input is ignored (no reply, no crash). Memberships go on close.

const { WebSocketServer, WebSocket } = require('ws');

const PORT = Number(process.env.PORT) || 8081;

const wss = new WebSocketServer({ port: PORT });

/** @type {{ ws: WebSocket, roomId: string }[]} */
let users = [];

function isNonEmptyString(v) {
  return typeof v === 'string' && v.length > 0;
}

wss.on('connection', (ws) => {
  ws.on('error', () => {}); // a broken socket must not take the process down

  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object' || !msg.payload || typeof msg.payload !== 'object') {
      return;
    }

    if (msg.type === 'join') {
      const roomId = msg.payload.roomId;
      if (!isNonEmptyString(roomId)) return;
      // Joining the same room twice is a no-op.
      if (users.some((u) => u.ws === ws && u.roomId === roomId)) return;
      users.push({ ws, roomId });
      return;
    }

    if (msg.type === 'chat') {
      const message = msg.payload.message;
      if (typeof message !== 'string') return;
      const me = users.find((u) => u.ws === ws);
      if (!me) return; // not in a room
      const roomId = me.roomId;
      for (const u of users) {
        if (u.roomId === roomId && u.ws !== ws && u.ws.readyState === WebSocket.OPEN) {
          u.ws.send(message);
        }
      }
    }
  });

  ws.on('close', () => {
    users = users.filter((u) => u.ws !== ws);
  });
});

wss.on('listening', () => {
  console.log(`dialect1 listening on ${PORT}`);
});

function shutdown() {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
