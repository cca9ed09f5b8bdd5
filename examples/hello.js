// An unmodified Node.js app: run it behind lb with
//   lb --workers 4 -- node examples/hello.js
// lb starts each copy as a cluster worker and hands it connections; the
// port below is whatever the app likes (lb reports it back as asked).
'use strict';
const http = require('http');

http
  .createServer((req, res) => {
    res.end(`hello from worker ${process.env.LB_WORKER_ID} (pid ${process.pid})\n`);
  })
  .listen(8000);
