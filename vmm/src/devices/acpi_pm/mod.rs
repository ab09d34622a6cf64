//! The ACPI power-management registers the FADT names: byte-wide sleep control, sleep status
//! and reset, at [`ACPI_SLEEP_CONTROL_PORT`] and the two ports after it.
//!
//! Writing `SLP_EN` with `SLP_TYP` = the DSDT's `_S5_` value powers the VM off; writing
//! [`ACPI_RESET_VALUE`] to the reset register resets it (which ends a microVM). Other sleep
//! states are not offered and are ignored.

use std::sync::Arc;

use crate::arch::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
};
use crate::devices::bus::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// How many ports the device decodes.
pub const PORTS: u64 = 3;
/// Sleep control: sleep enable.
const SLP_EN: u8 = 1 << 5;
/// Sleep control: the sleep type field's shift (bits 2–4).
const SLP_TYP_SHIFT: u8 = 2;

/// The registers.
#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// Registers that end the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let control = 0;
        let reset = u64::from(ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT);
        if offset == control
            && value & SLP_EN != 0
            && (value >> SLP_TYP_SHIFT) & 0x7 == ACPI_S5_SLEEP_TYPE
        {
            self.exit.raise(GuestExit::PowerOff);
        } else if offset == reset && *value == ACPI_RESET_VALUE {
            self.exit.raise(GuestExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_reset_resets_anything_else_is_ignored() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0, &[SLP_EN | (3 << SLP_TYP_SHIFT)]); // S3: not offered
        pm.write(0, &[ACPI_S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN
        pm.write(0, &[SLP_EN | (ACPI_S5_SLEEP_TYPE << SLP_TYP_SHIFT), 0]); // two bytes
        pm.write(2, &[0x06]);
        assert!(!exit.is_raised());
        pm.write(0, &[SLP_EN | (ACPI_S5_SLEEP_TYPE << SLP_TYP_SHIFT)]);
        assert_eq!(exit.reason(), Some(GuestExit::PowerOff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        AcpiPm::new(exit.clone()).write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
