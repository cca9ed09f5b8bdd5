//! The next image's side of what the state names that is not a worker's
//! (those are `Supervisor::adopt`'s): the listeners.

use crate::config::Listener;
use crate::listeners::{self, Open};
use crate::master::MasterError;
use crate::sys;

use super::State;

/// The listeners the state names, with their settings as at start: by
/// name for those systemd passed (as `listeners::activated` matched them
/// then), else by place.
pub fn listeners(state: &State, configured: &[Listener]) -> Result<Vec<Open>, MasterError> {
    let mut fds = Vec::with_capacity(state.listeners.len());
    for l in &state.listeners {
        fds.push(sys::handed_over(l.fd).map_err(MasterError::InheritedFds)?);
    }
    if state.activated {
        let named = fds
            .into_iter()
            .zip(&state.listeners)
            .map(|(fd, l)| (fd, l.name.clone()))
            .collect();
        return listeners::activated(named, configured);
    }
    let made = fds
        .into_iter()
        .zip(&state.listeners)
        .map(|(fd, l)| (fd, l.made.clone()))
        .collect();
    listeners::handed_over(made, configured)
}
