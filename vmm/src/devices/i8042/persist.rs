//! The i8042's registers and unread answers, saved with a cold VM.

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::{BUFFER_LIMIT, I8042};
use crate::exit::ExitSignal;
use crate::persist::{Persist, StateError};

/// The controller's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042Snapshot {
    control: u8,
    status: u8,
    pending: Option<u8>,
    output: Vec<u8>,
}

impl Persist<'_> for I8042 {
    type State = I8042Snapshot;
    /// What a reset request raises in the new VM.
    type ConstructorArgs = Arc<ExitSignal>;
    type Error = StateError;

    fn save(&self) -> Result<I8042Snapshot, StateError> {
        Ok(I8042Snapshot {
            control: self.control,
            status: self.status,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
        })
    }

    /// Refused if it holds more answers than the controller would.
    fn restore(exit: Arc<ExitSignal>, saved: &I8042Snapshot) -> Result<Self, StateError> {
        if saved.output.len() > BUFFER_LIMIT {
            return Err(StateError::I8042Output(saved.output.len()));
        }
        Ok(I8042 {
            control: saved.control,
            status: saved.status,
            pending: saved.pending,
            output: saved.output.iter().copied().collect(),
            ..I8042::new(exit)
        })
    }
}
