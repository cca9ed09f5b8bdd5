// Node's own cluster primary in front of WORKERS copies of node-app.js.
// NODE_CLUSTER_SCHED_POLICY=rr (Node's default) or none (the kernel
// balances). Prints "node-cluster ready" once every worker listens; on
// SIGTERM kills its workers and exits.
'use strict';
const cluster = require('node:cluster');

if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS || 2);
  let listening = 0;
  cluster.on('listening', () => {
    if (++listening === n) console.log('node-cluster ready');
  });
  for (let i = 0; i < n; i++) cluster.fork();
  process.on('SIGTERM', () => {
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  });
} else {
  require('./node-app.js');
}
