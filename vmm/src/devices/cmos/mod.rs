//! A minimal CMOS RTC at ports 0x70 (index) and 0x71 (data): the host's UTC time in BCD,
//! status registers saying "valid, not updating, 24-hour BCD", and 128 bytes of NVRAM.
//!
//! Without it a Linux guest waits seconds for an RTC that never answers. No alarms or
//! periodic interrupts; writes to the clock registers are ignored (the guest cannot set the
//! host's time).

use time::OffsetDateTime;

use crate::devices::bus::BusDevice;

pub mod persist;

/// How many ports the device decodes.
pub const PORTS: u64 = 2;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, update not in progress.
const A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const B_VALUE: u8 = 0x02;
/// Status D: the RTC's power is good.
const D_VALUE: u8 = 0x80;

/// The RTC and its NVRAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    now: fn() -> OffsetDateTime,
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos::with_clock(OffsetDateTime::now_utc)
    }
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

impl Cmos {
    /// An RTC reading time from `now`.
    pub fn with_clock(now: fn() -> OffsetDateTime) -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
            now,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let t = (self.now)();
        let year = t.year().rem_euclid(10_000) as u16;
        match index {
            REG_SECONDS => bcd(t.second()),
            REG_MINUTES => bcd(t.minute()),
            REG_HOURS => bcd(t.hour()),
            REG_WEEKDAY => bcd(t.weekday().number_from_sunday()),
            REG_DAY => bcd(t.day()),
            REG_MONTH => bcd(u8::from(t.month())),
            REG_YEAR => bcd((year % 100) as u8),
            REG_CENTURY => bcd((year / 100) as u8),
            REG_A => A_VALUE,
            REG_B => B_VALUE,
            REG_C => 0,
            REG_D => D_VALUE,
            i => self.nvram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == 1 {
            self.register(self.index)
        } else {
            0xff
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            // Bit 7 of the index is the NMI mask on a PC; it is not an index bit.
            0 => self.index = value & 0x7f,
            1 if self.index > REG_D && self.index != REG_CENTURY => {
                self.nvram[usize::from(self.index)] = *value;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> OffsetDateTime {
        time::Date::from_calendar_date(2026, time::Month::November, 29)
            .and_then(|d| d.with_hms(7, 45, 9))
            .map(|t| t.assume_utc())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index | 0x80]);
        let mut b = [0];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn the_clock_reads_in_bcd_and_nvram_keeps_bytes() {
        let mut cmos = Cmos::with_clock(fixed);
        let got: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32]
            .iter()
            .map(|&i| read(&mut cmos, i))
            .collect();
        assert_eq!(got, vec![0x09, 0x45, 0x07, 0x01, 0x29, 0x11, 0x26, 0x20]);
        assert_eq!(
            read(&mut cmos, REG_A) & 0x80,
            0,
            "never 'update in progress'"
        );
        assert_eq!(read(&mut cmos, REG_D), D_VALUE);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(read(&mut cmos, 0x40), 0xab);
        // The clock cannot be set.
        cmos.write(0, &[REG_SECONDS]);
        cmos.write(1, &[0x59]);
        assert_eq!(read(&mut cmos, REG_SECONDS), 0x09);
    }
}
