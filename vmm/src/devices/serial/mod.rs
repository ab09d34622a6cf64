//! COM1: an 8250 UART (vm-superio's) at 0x3f8, its interrupt an irqfd on GSI 4, its output
//! whatever writer the VM's configuration gives it (mvm's runner: its bounded console log).
//!
//! vm-superio flushes its writer after every byte; [`ConsoleSink`] therefore buffers and
//! passes output on at each newline, when its buffer fills, or when the VM stops — one log
//! write per line instead of one per byte. No input is wired: the agent's channel is
//! virtio-console, not the serial port.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::devices::bus::BusDevice;
use crate::devices::IrqLine;

pub mod persist;

/// How many ports the UART decodes.
pub const PORTS: u64 = 8;
/// The most output held before it is passed on without waiting for a newline.
const SINK_BUFFER: usize = 4096;

/// The UART's output: buffered, passed on by line.
pub struct ConsoleSink {
    buffer: Vec<u8>,
    log: Box<dyn Write + Send>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// A sink feeding `log`.
    pub fn new(log: Box<dyn Write + Send>) -> Self {
        ConsoleSink {
            buffer: Vec::with_capacity(SINK_BUFFER),
            log,
        }
    }

    /// Passes on whatever is buffered.
    pub fn drain(&mut self) {
        if !self.buffer.is_empty() {
            // The console is the guest's to fill: a log that fails loses output, not the VM.
            let _ = self.log.write_all(&self.buffer);
            self.buffer.clear();
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= SINK_BUFFER || bytes.contains(&b'\n') {
            self.drain();
        }
        Ok(bytes.len())
    }

    /// Deliberately nothing: vm-superio calls this after every byte.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART on the port bus.
#[derive(Debug)]
pub struct SerialDevice(Serial<IrqLine, NoEvents, ConsoleSink>);

impl SerialDevice {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        SerialDevice(Serial::new(irq, sink))
    }

    /// Passes on buffered output (called when the VM stops).
    pub fn drain(&mut self) {
        self.0.writer_mut().drain();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset < PORTS {
            self.0.read(offset as u8)
        } else {
            0xff
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], true) = (data, offset < PORTS) {
            // The only error is a failed interrupt trigger; the byte is still logged.
            let _ = self.0.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A log the test reads back while the UART still holds it.
    #[derive(Clone, Default)]
    struct SharedLog(Arc<Mutex<Vec<u8>>>);

    impl SharedLog {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl Write for SharedLog {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_log_by_line_and_raises_the_interrupt_when_enabled() {
        let console = SharedLog::default();
        let log = Box::new(console.clone());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqLine::new(evt.try_clone().unwrap());
        let mut uart = SerialDevice::new(irq, ConsoleSink::new(log));
        for b in b"hello" {
            uart.write(0, &[*b]);
        }
        assert_eq!(console.text(), "", "held until a newline");
        uart.write(0, b"\n");
        assert_eq!(console.text(), "hello\n");
        // Enable the THR-empty interrupt (IER bit 1): the next byte raises it.
        uart.write(1, &[0x02]);
        uart.write(0, b"x");
        assert!(evt.read().unwrap() >= 1);
        uart.write(9, b"y"); // beyond the UART: ignored
        uart.write(0, b"ab"); // not a byte access: ignored
        uart.drain();
        assert_eq!(console.text(), "hello\nx");
    }
}
