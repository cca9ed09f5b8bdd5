//! Control requests (`lb status`, `lb stop`, `lb scale`, `lb send`, the
//! metrics listener's health checks; a reload is `reload.rs`'s, a restart
//! `restart.rs`'s) and the answers they get.

use super::{Phase, Supervisor, status::Health, status::Status};
use crate::control::Request;
use crate::dispatch::Command;
use crate::info;
use crate::policy::Slot;

/// The supervisor's answer to a control request (`control` writes it as
/// the wire's `Response`).
#[derive(Debug)]
pub enum Answer {
    Done(String),
    Refused(String),
    Status(Box<Status>),
    Health(Health),
}

impl Supervisor {
    pub(super) fn on_control(&mut self, request: Request) -> Answer {
        match request {
            Request::Status => match self.status() {
                Some(status) => Answer::Status(Box::new(status)),
                None => Answer::Refused("the dispatcher did not answer".into()),
            },
            Request::Health => Answer::Health(self.health()),
            Request::Reload | Request::Restart { .. } | Request::Upgrade => {
                Answer::Refused("reload, restart and upgrade are answered elsewhere".into())
            }
            Request::Scale {
                pool,
                count,
                relative,
            } => match self.scale(pool.as_deref(), count, relative) {
                Ok(scaled) => {
                    info!("{scaled}");
                    Answer::Done(scaled.to_string())
                }
                Err(why) => Answer::Refused(why.to_string()),
            },
            Request::Stop => {
                if self.phase == Phase::Running {
                    info!("stop requested on the control socket");
                    self.begin_drain("lb stop");
                }
                Answer::Done(format!("draining {} workers", self.workers.len()))
            }
            Request::Send { slot, message } => {
                if message.len() > crate::proto::MAX_PAYLOAD {
                    return Answer::Refused(format!(
                        "message of {} bytes is longer than {}",
                        message.len(),
                        crate::proto::MAX_PAYLOAD
                    ));
                }
                if slot.is_some_and(|s| s >= self.slots.len()) {
                    return Answer::Refused(format!(
                        "no slot {}; slots are 0 to {}",
                        slot.unwrap_or(0),
                        self.slots.len() - 1
                    ));
                }
                let (reply, answer) = crossbeam_channel::bounded(1);
                self.dispatch.send(Command::Message {
                    target: slot.map(Slot),
                    payload: message.into_bytes(),
                    reply,
                });
                match answer.recv_timeout(std::time::Duration::from_secs(2)) {
                    Ok(0) => Answer::Refused("no ready worker took the message".into()),
                    Ok(n) => Answer::Done(format!("sent to {n} workers")),
                    Err(_) => Answer::Refused("the dispatcher did not answer".into()),
                }
            }
        }
    }
}
