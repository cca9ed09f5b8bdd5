//! Integration tests: the real `lb` binary, real worker processes, real TCP
//! on 127.0.0.1 with ephemeral ports. One binary; shared helpers in `util`.

mod util;

mod batch;
mod control;
mod core;
mod drain;
mod faults;
mod health;
mod kernel;
mod kernel_native;
mod kernel_shim;
mod limits;
mod listeners;
mod logs;
mod node;
mod pools;
mod process_manager;
mod proxy;
mod proxy_protocol;
mod proxy_workers;
mod shared;
mod shim;
mod supervision;
mod systemd;
mod systemd_ops;
mod upgrade;
