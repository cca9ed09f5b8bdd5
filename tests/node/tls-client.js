// GETs https://127.0.0.1:<port>/ N times (new connection each) and prints
// each body; exits non-zero on any failure.
'use strict';
const https = require('https');
const [port, n] = process.argv.slice(2).map(Number);
let left = n;
const one = () => {
  https
    .get({ host: '127.0.0.1', port, path: '/', rejectUnauthorized: false, agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        process.stdout.write(body);
        if (--left > 0) one();
      });
    })
    .on('error', (e) => {
      console.error(e.message);
      process.exit(1);
    });
};
one();
