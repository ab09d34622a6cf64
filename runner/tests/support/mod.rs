//! What the runner's integration tests share. Each test binary uses part of it.
#![allow(dead_code, unused_imports)]

pub mod plan_guest;
