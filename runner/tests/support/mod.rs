//! What the runner's integration tests share. Each test binary uses part of it.
#![allow(dead_code)]

pub mod plan_guest;
