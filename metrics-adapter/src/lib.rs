//! The OpenClaw metrics adapter (under construction; see issue 4).

pub mod status;
