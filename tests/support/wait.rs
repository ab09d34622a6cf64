//! Waiting for what a guest does eventually, against a deadline that fits the slowest
//! machine, saying what was seen last when it does not come.
// Each test binary compiles this module; not every one waits.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// How long something a guest does may take to show: TCG guests on a loaded two-core machine
/// are slow, and a test must not mistake slow for never.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

/// Checks `check` until it holds, up to `limit`; fails with `what` and the last thing it saw.
pub fn eventually<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {limit:?}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
