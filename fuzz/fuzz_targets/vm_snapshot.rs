//! A saved VM of the kvm backend (`mvm_vmm::snapshot`): any bytes, cut into writes of
//! any size (the first byte picks the size), are read into a small guest RAM or refused with
//! VMM010, never a panic or a write outside RAM; a state that reads is parsed (or refused the
//! same way).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use mvm_vmm::snapshot::{parse, SnapshotReader};
use mvm_vmm::vstate::memory;

fuzz_target!(|data: &[u8]| {
    let Some((&write_size, file)) = data.split_first() else {
        return;
    };
    // 4 MiB: the smallest RAM the VMM takes.
    let ram = memory::create(4 << 20).expect("guest RAM");
    let mut reader = SnapshotReader::new(&ram);
    for piece in file.chunks(usize::from(write_size).max(1)) {
        if reader.write_all(piece).is_err() {
            break;
        }
    }
    match reader.finish() {
        Ok(state) => {
            if let Err(error) = parse(&state) {
                assert_eq!(error.code(), "VMM010");
            }
        }
        Err(error) => assert_eq!(error.code(), "VMM010"),
    }
});
