//! A minimal i8042 keyboard controller: enough for a kernel's probe to get answers instead of
//! waiting for timeouts, and the reset pulse (command 0xFE) that reboot paths use.
//!
//! No keyboard or mouse is attached; bytes written to the devices behind the controller are
//! dropped. Answers go through a small output buffer, read at the data port with the status
//! register's output-full bit.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

pub mod persist;

/// How many ports the device spans (0x60 to 0x64).
pub const PORTS: u64 = 5;
/// Offset of the command/status port from the data port.
const COMMAND: u64 = 4;
/// Status: output buffer full.
const SR_OBF: u8 = 1 << 0;
/// Status: system flag (self-test passed).
const SR_SYS: u8 = 1 << 2;
/// Status: the last write was a command.
const SR_CMD: u8 = 1 << 3;
/// Controller configuration at reset: keyboard interrupt on, system flag, translation.
const CTR_RESET: u8 = 0x45;
/// The most answers buffered; more are dropped.
const BUFFER_LIMIT: usize = 16;

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
    control: u8,
    status: u8,
    /// A command that takes a data byte is waiting for it.
    pending: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller whose reset pulse ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            exit,
            control: CTR_RESET,
            status: SR_SYS,
            pending: None,
            output: VecDeque::new(),
        }
    }

    fn answer(&mut self, byte: u8) {
        if self.output.len() < BUFFER_LIMIT {
            self.output.push_back(byte);
        }
    }

    fn command(&mut self, command: u8) {
        match command {
            0x20 => self.answer(self.control),
            // Write the configuration byte / the output port: the data byte follows.
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(command),
            0xaa => self.answer(0x55), // controller self-test passed
            0xab => self.answer(0x00), // keyboard interface test passed
            0xa9 => self.answer(0xff), // mouse interface test: no mouse
            0xca => self.answer(0x00),
            // Pulse the reset line.
            0xfe => self.exit.raise(GuestExit::Reset),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(0x60) => self.control = byte,
            Some(0xd2) => self.answer(byte), // echo as if from the keyboard
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.output.pop_front().unwrap_or(0),
            COMMAND => {
                let obf = if self.output.is_empty() { 0 } else { SR_OBF };
                self.status | obf
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            0 => {
                self.status &= !SR_CMD;
                self.data(*value);
            }
            COMMAND => {
                self.status |= SR_CMD;
                self.command(*value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn the_probe_gets_answers_and_0xfe_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        assert_eq!(read(&mut dev, COMMAND) & SR_OBF, 0);
        dev.write(COMMAND, &[0x20]);
        assert_eq!(read(&mut dev, COMMAND) & SR_OBF, SR_OBF);
        assert_eq!(read(&mut dev, 0), CTR_RESET);
        dev.write(COMMAND, &[0x60]);
        dev.write(0, &[0x11]);
        dev.write(COMMAND, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x11);
        dev.write(COMMAND, &[0xaa]);
        assert_eq!(read(&mut dev, 0), 0x55);
        // A flood of commands does not grow the buffer without bound.
        for _ in 0..1000 {
            dev.write(COMMAND, &[0xaa]);
        }
        assert_eq!(dev.output.len(), BUFFER_LIMIT);
        assert!(!exit.is_raised());
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
