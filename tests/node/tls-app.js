// An ordinary https app (TLS ends in the worker; lb stays L4). Node's
// tls.Server shares its session ticket keys through queryServer's `data`,
// which the primary must echo to every worker: given `null`, listen() throws.
// The key and certificate are self-signed, for the tests only.
'use strict';
const https = require('https');
const fs = require('fs');
const path = require('path');

https
  .createServer(
    {
      key: fs.readFileSync(path.join(__dirname, 'test-key.pem')),
      cert: fs.readFileSync(path.join(__dirname, 'test-cert.pem')),
    },
    (req, res) => res.end(`hello from worker ${process.env.LB_WORKER_ID} (pid ${process.pid})\n`),
  )
  .listen(8443);
