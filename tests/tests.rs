//! Integration tests: the real `lb` binary, real worker processes, real TCP
//! on 127.0.0.1 with ephemeral ports. One binary; shared helpers in `util`.

mod util;

#[path = "it/control.rs"]
mod control;
#[path = "it/core.rs"]
mod core;
#[path = "it/drain.rs"]
mod drain;
#[path = "it/faults.rs"]
mod faults;
#[path = "it/limits.rs"]
mod limits;
#[path = "it/node.rs"]
mod node;
#[path = "it/proxy.rs"]
mod proxy;
#[path = "it/shared.rs"]
mod shared;
#[path = "it/shim.rs"]
mod shim;
#[path = "it/supervision.rs"]
mod supervision;
#[path = "it/systemd.rs"]
mod systemd;
