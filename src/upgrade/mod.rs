//! `lb upgrade` (and SIGUSR2): the master re-executes itself in place with
//! the binary now at the path it was started as — same pid, so systemd's
//! `MAINPID`, the control socket and every worker's parent stay what they
//! were — keeping its listeners (the kernel queues new clients meanwhile:
//! none is refused), its workers with their channels (what they sent waits
//! in the sockets), and its counters.
//!
//! In order: the supervisor checks that nothing is in flight that could not
//! move (`supervisor::upgrade`), the new binary is run in a child that
//! must say it can read this image's state (`check`); the dispatcher gives
//! up its listeners and links (`dispatch::handover`), the output thread its
//! pipes; the state is written to an in-memory file and the binary exec'd
//! with it (`exec`). The next image finds the state in `LB_UPGRADE_STATE`
//! and adopts everything (`master`, `Supervisor::adopt`). A binary that
//! fails its check changes nothing: the old image keeps serving.

pub mod adopt;
pub mod check;
pub mod exec;
pub mod state;

pub use state::State;

/// The environment variable with the state's fd number, for the next image.
pub const STATE_VAR: &str = "LB_UPGRADE_STATE";

/// The state an earlier image handed over, if this image was started by an
/// upgrade (`LB_UPGRADE_STATE`); its exe becomes this image's started-as.
pub fn inherited() -> std::io::Result<Option<State>> {
    let Some(value) = std::env::var_os(STATE_VAR) else {
        return Ok(None);
    };
    let raw = value
        .to_str()
        .and_then(|v| v.parse::<i32>().ok())
        .ok_or_else(|| std::io::Error::other(format!("{STATE_VAR} is not an fd number")))?;
    let state = State::read(crate::sys::handed_over(raw)?)?;
    exec::set_started_as(state.exe.clone());
    Ok(Some(state))
}
