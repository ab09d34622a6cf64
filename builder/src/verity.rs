//! dm-verity (to be written).
