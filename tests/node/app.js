// An ordinary Node.js http app: nothing in it knows about lb. lb starts it
// as a cluster worker; Node itself turns its listen() into a request to lb.
// Knobs for the tests, all through the environment:
//   APP_MAXCONN=n     server.maxConnections (Node refuses connections beyond)
//   APP_SECOND=port   also listen on a second port (lb refuses it)
//   APP_PIPE=path     also listen on a Unix socket path (lb refuses it)
//   APP_QUIT_AFTER=n  cluster.worker.disconnect() after n requests
'use strict';
const http = require('http');
const cluster = require('cluster');

const id = process.env.LB_WORKER_ID;
const hello = `hello from worker ${id} (pid ${process.pid})\n`;
let served = 0;

const server = http.createServer((req, res) => {
  served++;
  const done = () => {
    if (+process.env.APP_QUIT_AFTER && served >= +process.env.APP_QUIT_AFTER) {
      res.setHeader('Connection', 'close');
      res.end(hello, () => cluster.worker.disconnect());
    } else {
      res.end(hello);
    }
  };
  const slow = req.url.match(/^\/slow\/(\d+)/);
  if (slow) return setTimeout(done, +slow[1]);
  if (req.url === '/chunks') {
    // A response that takes a while and arrives in pieces.
    let n = 0;
    const tick = setInterval(() => {
      res.write(`chunk ${n}\n`);
      if (++n === 10) {
        clearInterval(tick);
        res.end(hello);
      }
    }, 100);
    return;
  }
  done();
});
if (process.env.APP_MAXCONN) server.maxConnections = +process.env.APP_MAXCONN;
server.listen(8000, () => {
  if (process.send) process.send({ listening: server.address().port, id });
});

const report = (what) => (err) => process.send && process.send({ [what]: err.code });
if (process.env.APP_SECOND) {
  http.createServer(() => {}).on('error', report('second')).listen(+process.env.APP_SECOND);
}
if (process.env.APP_PIPE) {
  http.createServer(() => {}).on('error', report('pipe')).listen(process.env.APP_PIPE);
}

// The primary's broadcasts (`lb send`) come back as a reply.
process.on('message', (m) => {
  if (m && m.ping !== undefined) process.send({ pong: m.ping, id });
});
