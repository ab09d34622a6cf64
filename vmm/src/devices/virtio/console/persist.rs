//! A console's state across a cold save: a named console's port handshake (whether the guest
//! has its port open, the control messages not yet taken by the driver); an unnamed console
//! has none. Bytes in flight are not saved: a woken VM's host side is a new connection.

use super::control::{Control, MESSAGE_SIZE, NAME_LIMIT, OUTBOX_LIMIT};
use crate::devices::virtio::persist::DeviceSnapshot;
use crate::persist::StateError;

/// The state of a console with the handshake `control` (a named one) or without.
pub fn save(control: Option<&Control>) -> DeviceSnapshot {
    match control {
        Some(control) => DeviceSnapshot::Console {
            guest_open: control.guest_open,
            outbox: control.outbox.iter().cloned().collect(),
        },
        None => DeviceSnapshot::Stateless,
    }
}

/// Gives the console's handshake `control` the state `saved`; refused if `saved` is of
/// another kind of console, or holds more messages than the device would.
pub fn restore(control: Option<&mut Control>, saved: &DeviceSnapshot) -> Result<(), StateError> {
    match (control, saved) {
        (None, DeviceSnapshot::Stateless) => Ok(()),
        (Some(control), DeviceSnapshot::Console { guest_open, outbox }) => {
            let oversized = outbox.iter().any(|m| m.len() > MESSAGE_SIZE + NAME_LIMIT);
            if outbox.len() > OUTBOX_LIMIT || oversized {
                return Err(StateError::ConsoleOutbox(outbox.len()));
            }
            control.guest_open = *guest_open;
            control.outbox = outbox.iter().cloned().collect();
            Ok(())
        }
        _ => Err(StateError::OtherDevice { device: "console" }),
    }
}
