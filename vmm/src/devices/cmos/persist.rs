//! The RTC's index register and NVRAM, saved with a cold VM (the time is the host's, read
//! afresh).

use serde::{Deserialize, Serialize};

use super::Cmos;
use crate::persist::{Persist, StateError};

/// The CMOS state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosSnapshot {
    index: u8,
    nvram: Vec<u8>,
}

impl Persist<'_> for Cmos {
    type State = CmosSnapshot;
    type ConstructorArgs = ();
    type Error = StateError;

    fn save(&self) -> Result<CmosSnapshot, StateError> {
        Ok(CmosSnapshot {
            index: self.index,
            nvram: self.nvram.to_vec(),
        })
    }

    /// Refused unless its NVRAM has the right size.
    fn restore((): (), saved: &CmosSnapshot) -> Result<Self, StateError> {
        let nvram = saved
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| StateError::CmosNvram(saved.nvram.len()))?;
        Ok(Cmos {
            index: saved.index,
            nvram,
            ..Cmos::default()
        })
    }
}
