// lb's close report for Node.js cluster workers (least-connections).
//
// lb loads this with NODE_OPTIONS="--require <file>" when its policy needs
// to know how many connections each worker holds: Node's cluster protocol
// never says when a connection closes. It counts the closes of the
// server's sockets and reports them as one ordinary IPC message per event
// loop turn, {"lb_closed": n}. It does nothing in any other process: not
// in a plain `node`, not in the app's own child processes (it removes
// itself from their NODE_OPTIONS).
'use strict';
const self = `--require "${__filename}"`;
if (process.env.NODE_OPTIONS) {
  process.env.NODE_OPTIONS = process.env.NODE_OPTIONS.replace(self, '').trim();
}
const cluster = require('cluster');
if (cluster.isWorker && typeof process.send === 'function') {
  const dc = require('diagnostics_channel');
  // Held here: older Nodes keep channels only weakly.
  const sockets = dc.channel('net.server.socket');
  // Under kernel dispatch the worker accepts by itself, so lb counts its
  // accepts too (it sent none of them).
  const accepts = process.env.LB_OWN_LISTENER === '1';
  let closed = 0;
  let accepted = 0;
  let due = false;
  const report = () => {
    const msg = accepts ? { lb_closed: closed, lb_accepted: accepted } : { lb_closed: closed };
    closed = 0;
    accepted = 0;
    due = false;
    if (process.connected) process.send(msg);
  };
  const soon = () => {
    if (!due) {
      due = true;
      setImmediate(report);
    }
  };
  const onClose = () => {
    closed++;
    soon();
  };
  sockets.subscribe(({ socket }) => {
    if (accepts) {
      accepted++;
      soon();
    }
    socket.once('close', onClose);
  });
  module.exports = sockets;
}
