//! Any bytes as an image layer (a tar stream), applied to a staged tree, and — when accepted —
//! written as an EROFS image: layer application refuses or applies, the writer refuses or
//! writes (uncompressed, LZ4 or LZ4 HC, chosen by the input's length), and neither ever panics
//! or touches the host's files.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use mvm_builder::erofs::{write_image, Compression, ErofsOptions};
use mvm_builder::layer::{ApplyOptions, LayerApplier, LayerLimits};
use mvm_builder::tree::{Staging, Tree};

fuzz_target!(|data: &[u8]| {
    let mut tree = Tree::new(Staging::Memory(Vec::new()));
    let options = ApplyOptions {
        limits: LayerLimits {
            tree_bytes: 1 << 20,
            tree_nodes: 10_000,
            ..LayerLimits::default()
        },
    };
    // Two passes of the same bytes: the second applies as an upper layer over the first.
    for _ in 0..2 {
        if LayerApplier::new(&mut tree, options.clone())
            .apply(data)
            .is_err()
        {
            return;
        }
    }
    let compression = match data.len() % 3 {
        0 => Compression::None,
        1 => Compression::Lz4,
        _ => Compression::Lz4Hc { level: 9 },
    };
    let options = ErofsOptions {
        compression,
        ..ErofsOptions::default()
    };
    let mut image = Cursor::new(Vec::new());
    let _ = write_image(&tree, &mut image, &options);
});
