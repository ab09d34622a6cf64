//! A stand-in machine for tests of what is done with a saved state (cold VMs, boot snapshots).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use super::{Pausable, SavedMemory};

/// A machine whose "state" is a fixed byte string; a broken one fails half way.
pub struct FakeMachine {
    pub state: Vec<u8>,
    pub broken: bool,
}

impl Pausable for FakeMachine {
    fn pause(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn resume(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn save(&mut self, _socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
        if self.broken {
            into.write_all(&self.state[..self.state.len() / 2])?;
            return Err(io::Error::other("QEMU's migration failed"));
        }
        into.write_all(&self.state)?;
        let (sha256, bytes) = mvm_ir::digest::sha256_reader(&self.state[..])?;
        Ok(SavedMemory { sha256, bytes })
    }
}
