//! The OpenClaw metrics adapter (under construction; see issue 4).

pub mod auth;
pub mod status;
pub mod tls;
