//! The RTC's index register and NVRAM, saved with a cold VM (the time is the host's, read
//! afresh).

use serde::{Deserialize, Serialize};

use super::Cmos;

/// The CMOS state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosSnapshot {
    index: u8,
    nvram: Vec<u8>,
}

impl Cmos {
    /// Its state.
    pub fn save(&self) -> CmosSnapshot {
        CmosSnapshot {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Takes the state `saved`; refused unless its NVRAM has the right size.
    pub fn restore(&mut self, saved: &CmosSnapshot) -> Result<(), String> {
        self.nvram = saved
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| format!("cmos: {} bytes of NVRAM", saved.nvram.len()))?;
        self.index = saved.index;
        Ok(())
    }
}
