//! The UART's registers and unread input, saved with a cold VM.

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{ConsoleSink, SerialDevice};
use crate::devices::IrqLine;
use crate::persist::{Persist, StateError};

/// vm-superio's [`SerialState`], field for field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART's output still buffered is not part of its state: it belongs to the log, and
/// whoever saves drains it first ([`SerialDevice::drain`]).
impl Persist<'_> for SerialDevice {
    type State = SerialSnapshot;
    /// The new VM's interrupt line and console sink.
    type ConstructorArgs = (IrqLine, ConsoleSink);
    type Error = StateError;

    fn save(&self) -> Result<SerialSnapshot, StateError> {
        let s = self.0.state();
        Ok(SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// A UART in the state `saved`, raising `irq` and writing to `sink`.
    fn restore(
        (irq, sink): (IrqLine, ConsoleSink),
        saved: &SerialSnapshot,
    ) -> Result<Self, StateError> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, irq, NoEvents, sink)
            .map(SerialDevice)
            .map_err(StateError::Serial)
    }
}
