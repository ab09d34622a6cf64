//! EROFS (to be written).
