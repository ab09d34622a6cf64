//! The i8042's registers and unread answers, saved with a cold VM.

use serde::{Deserialize, Serialize};

use super::{BUFFER_LIMIT, I8042};

/// The controller's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042Snapshot {
    control: u8,
    status: u8,
    pending: Option<u8>,
    output: Vec<u8>,
}

impl I8042 {
    /// Its state.
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            control: self.control,
            status: self.status,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Takes the state `saved`; refused if it holds more answers than the controller would.
    pub fn restore(&mut self, saved: &I8042Snapshot) -> Result<(), String> {
        if saved.output.len() > BUFFER_LIMIT {
            return Err(format!("i8042: {} buffered answers", saved.output.len()));
        }
        self.control = saved.control;
        self.status = saved.status;
        self.pending = saved.pending;
        self.output = saved.output.iter().copied().collect();
        Ok(())
    }
}
