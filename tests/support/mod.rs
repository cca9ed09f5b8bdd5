//! Helpers shared by the in-process test targets (not a target itself).

pub mod inproc;
