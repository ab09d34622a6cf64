//! The kick: a real-time signal with an empty handler, sent to a vCPU thread to make its
//! `KVM_RUN` return (`EINTR`), for a stop or a pause.

use std::sync::Once;

use crate::VmmError;

/// The signal that interrupts `KVM_RUN` (a real-time signal, not one the runner handles).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only job is to exist, so the
/// signal interrupts `KVM_RUN` instead of killing the process.
pub fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}
