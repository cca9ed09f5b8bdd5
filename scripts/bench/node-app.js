// The Node.js counterpart of backend.c for the node-cluster rows: replies
// "ok", GET /slow burns SLOW_MS of CPU, and writes "<requests> <conns>" to
// $REPORT_DIR/<pid> at start and on SIGUSR2 (SIGUSR1 is Node's inspector).
'use strict';
const http = require('node:http');
const fs = require('node:fs');
const path = require('node:path');

const slowMs = Number(process.env.SLOW_MS || 5);
let requests = 0;
let conns = 0;

function report() {
  if (!process.env.REPORT_DIR) return;
  const file = path.join(process.env.REPORT_DIR, String(process.pid));
  fs.writeFileSync(file + '.tmp', `${requests} ${conns}\n`);
  fs.renameSync(file + '.tmp', file);
}

const server = http.createServer((req, res) => {
  requests++;
  if (req.url === '/slow') {
    const end = process.cpuUsage().user + slowMs * 1000;
    while (process.cpuUsage().user < end) { /* burn CPU, like a slow handler */ }
  }
  res.writeHead(200, { 'Content-Length': '2' });
  res.end('ok');
});
server.on('connection', () => { conns++; });
server.listen(Number(process.env.PORT), '127.0.0.1', report);
process.on('SIGUSR2', report);
