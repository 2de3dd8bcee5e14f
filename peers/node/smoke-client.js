'use strict';
// Tiny client driver for smoke.sh.
//   node smoke-client.js dialect1 ws://127.0.0.1:P
//   node smoke-client.js dialect2 ws://127.0.0.1:P1 ws://127.0.0.1:P2 redis://127.0.0.1:R
// Prints one "ok - ..." line per check and ends with "N passed, N failed".

const WebSocket = require('ws');

let passed = 0;
let failed = 0;
function check(cond, what) {
  if (cond) {
    passed++;
    console.log(`ok - ${what}`);
  } else {
    failed++;
    console.log(`not ok - ${what}`);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class Client {
  constructor(name, url) {
    this.name = name;
    this.url = url;
    this.inbox = [];
    this.waiters = [];
  }
  open() {
    return new Promise((resolve, reject) => {
      this.ws = new WebSocket(this.url);
      this.ws.on('open', resolve);
      this.ws.on('error', reject);
      this.ws.on('message', (data, isBinary) => {
        this.inbox.push(isBinary ? data : data.toString());
        this.waiters.splice(0).forEach((w) => w());
      });
    });
  }
  send(obj) {
    this.ws.send(typeof obj === 'string' ? obj : JSON.stringify(obj));
  }
  // Wait until n messages are in the inbox (or timeout), then take them.
  async take(n, timeout = 2000) {
    const deadline = Date.now() + timeout;
    while (this.inbox.length < n && Date.now() < deadline) {
      await new Promise((r) => {
        this.waiters.push(r);
        setTimeout(r, Math.max(1, deadline - Date.now()));
      });
    }
    return this.inbox.splice(0, n);
  }
  async expect(msg, what) {
    const got = await this.take(1);
    check(got.length === 1 && got[0] === msg, `${what}: ${this.name} got ${JSON.stringify(got[0])}`);
  }
  async expectNothing(what, ms = 300) {
    await sleep(ms);
    const got = this.inbox.splice(0);
    check(got.length === 0, `${what}: ${this.name} got nothing${got.length ? ` (but got ${JSON.stringify(got)})` : ''}`);
  }
  close() {
    return new Promise((resolve) => {
      this.ws.once('close', resolve);
      this.ws.close();
    });
  }
}

async function connect(specs) {
  const clients = specs.map(([name, url]) => new Client(name, url));
  await Promise.all(clients.map((c) => c.open()));
  return clients;
}

async function dialect1(url) {
  const [a, b, c, d] = await connect([['A', url], ['B', url], ['C', url], ['D', url]]);
  const join = (cl, roomId) => cl.send({ type: 'join', payload: { roomId } });
  const chat = (cl, message) => cl.send({ type: 'chat', payload: { message } });

  join(a, 'red');
  join(b, 'red');
  join(b, 'green'); // B's chat room stays red (earliest join)
  join(c, 'blue');
  // Bad input: must be ignored without crashing or closing.
  a.send('this is not json');
  a.send({ type: 'chat' });
  a.send({ type: 'join', payload: { roomId: '' } });
  a.send({ type: 'join', payload: { roomId: 42 } });
  a.send({ type: 'nope', payload: {} });
  a.send('null');
  a.ws.send(Buffer.from([1, 2, 3]), { binary: true });
  chat(d, 'D is in no room');
  await sleep(150);

  chat(a, 'hello red');
  await b.expect('hello red', 'chat reaches the other room member');
  await a.expectNothing('sender excluded', 100);
  await c.expectNothing('other room excluded', 100);
  await d.expectNothing('roomless client excluded', 100);

  chat(b, 'from b');
  await a.expect('from b', 'chat goes to the earliest-joined room');

  chat(c, 'alone in blue');
  await c.expectNothing('alone in a room: nobody hears it');

  join(a, 'red'); // duplicate join is a no-op
  await sleep(50);
  chat(b, 'once');
  await a.expect('once', 'after a duplicate join');
  await a.expectNothing('duplicate join does not double deliveries', 200);

  for (let i = 0; i < 50; i++) chat(a, `seq ${i}`);
  const seq = await b.take(50);
  check(seq.length === 50 && seq.every((m, i) => m === `seq ${i}`), 'B got 50 chats from A in order');

  await b.close();
  await sleep(100);
  chat(a, 'after B left');
  await sleep(100);
  join(c, 'red'); // C joins red, but its chat room stays blue
  await sleep(100);
  chat(a, 'to red');
  await c.expect('to red', 'a later joiner of red hears red');
  chat(c, 'c speaks');
  await a.expectNothing('C still chats in blue (its first room)');
  for (const cl of [a, c, d]) check(cl.ws.readyState === WebSocket.OPEN, `${cl.name} still connected`);
  await Promise.all([a.close(), c.close(), d.close()]);
}

async function dialect2(url1, url2, redisUrl) {
  const Redis = require('ioredis');
  const redis = new Redis(redisUrl);
  const numsub = async (room) => Number((await redis.pubsub('NUMSUB', room))[1]);
  const waitNumsub = async (room, n) => {
    const deadline = Date.now() + 3000;
    while ((await numsub(room)) !== n && Date.now() < deadline) await sleep(20);
    return numsub(room);
  };

  const [a, b, d, c, e] = await connect([
    ['A@node1', url1], ['B@node1', url1], ['D@node1', url1],
    ['C@node2', url2], ['E@node2', url2],
  ]);
  const sub = (cl, room) => cl.send({ type: 'SUBSCRIBE', room });
  const send = (cl, roomId, message) => cl.send({ type: 'sendMessage', roomId, message });

  sub(a, 'room1');
  sub(b, 'room1');
  sub(c, 'room1');
  sub(e, 'room2');
  sub(a, 'room1'); // duplicate
  // Bad input: must be ignored without crashing or closing.
  d.send('this is not json');
  d.send({ type: 'SUBSCRIBE' });
  d.send({ type: 'SUBSCRIBE', room: '' });
  d.send({ type: 'sendMessage', roomId: 'room1' });
  d.send({ type: 'sendMessage', roomId: 'room1', message: 7 });
  d.send({ type: 'sendMessage', message: 'no room' });
  d.send('[]');
  d.ws.send(Buffer.from([1, 2, 3]), { binary: true });

  check((await waitNumsub('room1', 2)) === 2, 'room1 channel: one subscription per node (2)');
  check((await waitNumsub('room2', 1)) === 1, 'room2 channel: one subscription (node2)');

  send(a, 'room1', 'hi');
  await a.expect('hi', 'sender hears itself');
  await b.expect('hi', 'same-node member hears it');
  await c.expect('hi', 'other-node member hears it via redis');
  await e.expectNothing('other room excluded', 100);
  await d.expectNothing('non-subscriber excluded', 100);

  send(d, 'room1', 'from outside');
  for (const cl of [a, b, c]) await cl.expect('from outside', 'a non-member may send');

  send(c, 'room2', 'to room2');
  await e.expect('to room2', 'node2 -> node2 via redis');
  await c.expectNothing('sender not in room2 does not hear it', 100);

  await redis.publish('room1', JSON.stringify({ type: 'sendMessage', roomId: 'room1', message: 'raw', origin: 'x' }));
  for (const cl of [a, b, c]) await cl.expect('raw', 'plain redis publish with extra fields');
  await redis.publish('room1', 'not json');
  await a.expectNothing('garbage on the channel is ignored', 150);

  for (let i = 0; i < 50; i++) send(a, 'room1', `seq ${i}`);
  for (const cl of [a, b, c]) {
    const seq = await cl.take(50);
    check(seq.length === 50 && seq.every((m, i) => m === `seq ${i}`), `${cl.name} got 50 messages in order`);
  }
  await a.expectNothing('no duplicate deliveries after a duplicate SUBSCRIBE', 100);

  await Promise.all([c.close(), e.close()]);
  check((await waitNumsub('room2', 0)) === 0, 'node2 unsubscribes room2 when its last member leaves');
  check((await waitNumsub('room1', 1)) === 1, 'room1 keeps only node1 subscribed');
  send(b, 'room1', 'after close');
  await a.expect('after close', 'node1 still works after node2 members left');

  for (const cl of [a, b, d]) check(cl.ws.readyState === WebSocket.OPEN, `${cl.name} still connected`);
  await Promise.all([a.close(), b.close(), d.close()]);
  await redis.quit();
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  if (mode === 'dialect1') await dialect1(args[0]);
  else if (mode === 'dialect2') await dialect2(args[0], args[1], args[2]);
  else throw new Error(`unknown mode ${mode}`);
}

main()
  .catch((err) => {
    failed++;
    console.log(`not ok - ${err.stack || err}`);
  })
  .finally(() => {
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(failed === 0 ? 0 : 1);
  });
