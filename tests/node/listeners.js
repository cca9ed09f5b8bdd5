// An ordinary Node.js http app with one server per address in APP_LISTEN
// (comma-separated TCP ports and Unix socket paths): nothing in it knows
// about lb. Each reply says which server answered and what
// server.address() told it; once every server listens it sends
// {"listening":[...]} to its primary (lb logs it). GET /close closes the
// server that answers it, once the reply is out.
'use strict';
const http = require('http');

const id = process.env.LB_WORKER_ID;
const wanted = (process.env.APP_LISTEN || '8000').split(',');
const addresses = [];
let up = 0;
for (const what of wanted) {
  const where = /^\d+$/.test(what) ? +what : what;
  const server = http.createServer((req, res) => {
    const text = `server ${what} worker ${id} address ${JSON.stringify(server.address())}\n`;
    if (req.url === '/close') {
      res.setHeader('Connection', 'close');
      return res.end(text, () => server.close());
    }
    res.end(text);
  });
  server.on('error', (err) => process.send && process.send({ error: what, code: err.code }));
  server.listen(where, () => {
    addresses.push(server.address());
    if (++up === wanted.length && process.send) process.send({ listening: addresses, id });
  });
}
