'use strict';
// Baseline peer: the LISTEN/NOTIFY broadcaster most Node.js projects start with.
// One pg client LISTENs on `changes`; every notification is parsed (as apps do, to validate it or
// pick a room) and its payload string is sent to every open socket. No filtering, no backpressure,
// no resume: those are what realtime adds. Kept deliberately plain so it costs what users pay.

const http = require('http');
const { Client } = require('pg');
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || '127.0.0.1';

async function main() {
  const db = new Client({ connectionString: process.env.DATABASE_URL });
  await db.connect();

  const server = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"status":"ok"}');
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocketServer({ server, path: '/ws' });
  wss.on('connection', (socket) => {
    socket.on('error', () => socket.terminate());
  });

  db.on('notification', (msg) => {
    let change;
    try {
      change = JSON.parse(msg.payload);
    } catch (err) {
      console.error('bad payload', err);
      return;
    }
    if (!change || !change.table) return;
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(msg.payload);
    }
  });
  db.on('error', (err) => {
    // Losing the LISTEN connection means losing changes; a bench run must not carry on quietly.
    console.error('database connection failed', err);
    process.exit(1);
  });
  await db.query('LISTEN changes');

  // Listen only once LISTEN is active, so "port open" means "changes will be delivered".
  server.listen(port, host);

  const stop = () => {
    wss.close();
    server.close();
    db.end().finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
