// lb's preload for Node.js cluster workers: what Node's cluster protocol
// cannot carry by itself.
//
// lb loads this with NODE_OPTIONS="--require <file>" when it needs either
// (LB_NODE_PRELOAD, comma-separated; unset means closes alone, as before
// the variable existed):
//  - closes (least-connections): Node's cluster protocol never says when a
//    connection closes. It counts the closes of the server's sockets and
//    reports them as one ordinary IPC message per event loop turn,
//    {"lb_closed": n}.
//  - addresses (the PROXY protocol): behind a balancer a socket's peer is
//    the balancer. lb puts the client's address in the newconn message
//    (lb_peer), and this makes the socket's remoteAddress, remotePort and
//    remoteFamily answer it.
// It does nothing in any other process: not in a plain `node`, not in the
// app's own child processes (it removes itself from their NODE_OPTIONS).
'use strict';
const self = `--require "${__filename}"`;
if (process.env.NODE_OPTIONS) {
  process.env.NODE_OPTIONS = process.env.NODE_OPTIONS.replace(self, '').trim();
}
const wants = (process.env.LB_NODE_PRELOAD || 'closes').split(',');
delete process.env.LB_NODE_PRELOAD;
const cluster = require('cluster');
if (cluster.isWorker && typeof process.send === 'function' && wants.includes('addresses')) {
  // Ahead of cluster's own listener, which hands the handle to the server:
  // net's onconnection then makes the socket and emits 'connection' at
  // once. net's Socket#_getpeername asks the handle once and keeps the
  // answer (socket._peername), so the handle answers with the client for
  // every reader, 'connection' listeners included (a net.server.socket
  // subscriber would run only after them).
  process.prependListener('internalMessage', (msg, handle) => {
    const peer = msg && msg.cmd === 'NODE_CLUSTER' && msg.act === 'newconn' && msg.lb_peer;
    if (!peer || !handle || typeof handle.getpeername !== 'function') return;
    const { address, port, family } = peer;
    const valid = typeof address === 'string' && Number.isInteger(port) && port >= 0 &&
      port <= 65535 && (family === 'IPv4' || family === 'IPv6');
    if (!valid) return;
    handle.getpeername = (out) => {
      out.address = address;
      out.port = port;
      out.family = family;
      return 0;
    };
  });
}
if (cluster.isWorker && typeof process.send === 'function' && wants.includes('closes')) {
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
