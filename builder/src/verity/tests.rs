//! Cross-checks against the real `veritysetup` (cryptsetup-bin): its hash device bytes and root
//! hash are the reference. These tests fail, never skip, when it is missing.

use std::fs::{self, File, OpenOptions};
use std::io::Cursor;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

const SALT: [u8; 32] = *b"mvm verity test salt, 32 bytes.!";
const UUID: [u8; 16] = [
    0x6d, 0x76, 0x6d, 0x2d, 0x76, 0x65, 0x72, 0x69, 0x74, 0x79, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x21,
];

/// The `veritysetup` binary; panics saying how to get it when it is missing.
fn veritysetup() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join("veritysetup"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "veritysetup not found (looked in PATH, /usr/sbin and /sbin): the dm-verity tests \
                 cross-check against it; install cryptsetup-bin (`.ci/run` does, through \
                 scripts/deps --test)"
            )
        })
}

fn run_veritysetup(args: &[String]) -> Output {
    Command::new(veritysetup())
        .args(args)
        .output()
        .expect("veritysetup runs")
}

fn uuid_string(uuid: &[u8; 16]) -> String {
    let hex = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The options that make `veritysetup` use `params`.
fn veritysetup_options(params: &VerityParams) -> Vec<String> {
    let salt = if params.salt.is_empty() {
        "-".to_owned()
    } else {
        hex::encode(&params.salt)
    };
    let mut options = vec![
        "--hash=sha256".to_owned(),
        format!("--data-block-size={}", params.data_block_size),
        format!("--hash-block-size={}", params.hash_block_size),
        format!("--salt={salt}"),
        format!("--hash-offset={}", params.hash_offset),
    ];
    match params.superblock {
        Superblock::Written { uuid } => options.push(format!("--uuid={}", uuid_string(&uuid))),
        Superblock::Omitted => options.push("--no-superblock".to_owned()),
    }
    options
}

/// Runs `veritysetup format` and returns the root hash it prints.
fn veritysetup_format(data: &Path, hash: &Path, params: &VerityParams) -> [u8; DIGEST_LEN] {
    let mut args = vec!["format".to_owned()];
    args.extend(veritysetup_options(params));
    args.extend([data.display().to_string(), hash.display().to_string()]);
    let output = run_veritysetup(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "veritysetup {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let root_line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("Root hash:"))
        .expect("a root hash line");
    hex::decode(root_line.trim())
        .expect("hex root hash")
        .try_into()
        .expect("32 bytes")
}

/// Whether `veritysetup verify` accepts `data` and `hash` under `root_hash`.
fn veritysetup_verifies(data: &Path, hash: &Path, params: &VerityParams, root_hash: &[u8]) -> bool {
    let mut args = vec!["verify".to_owned()];
    if params.superblock == Superblock::Omitted {
        args.extend(veritysetup_options(params));
    }
    args.extend([
        data.display().to_string(),
        hash.display().to_string(),
        hex::encode(root_hash),
    ]);
    run_veritysetup(&args).status.success()
}

/// `len` deterministic pseudo-random bytes (splitmix64), different for each `seed`.
fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut bytes = Vec::with_capacity(len.next_multiple_of(8));
    while bytes.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A data image of `blocks` pseudo-random blocks in `dir`.
fn data_image(dir: &Path, blocks: u64, block_size: u32) -> PathBuf {
    let path = dir.join("data.img");
    fs::write(
        &path,
        pseudo_random_bytes((blocks * u64::from(block_size)) as usize, blocks),
    )
    .unwrap();
    path
}

fn block_params(data_block_size: u32, hash_block_size: u32, salt: &[u8]) -> VerityParams {
    VerityParams {
        data_block_size,
        hash_block_size,
        ..VerityParams::new(salt.to_vec(), UUID)
    }
}

/// Formats `blocks` blocks with both tools and asserts identical hash devices and root hashes.
fn assert_matches_veritysetup(blocks: u64, params: &VerityParams) -> VerityTree {
    let dir = tempfile::tempdir().unwrap();
    let data = data_image(dir.path(), blocks, params.data_block_size);
    let (ours, theirs) = (dir.path().join("ours.hash"), dir.path().join("theirs.hash"));
    let tree = format_file(&data, &ours, params).unwrap();
    let their_root = veritysetup_format(&data, &theirs, params);
    let case = format!("{blocks} blocks, {params:?}");
    assert_eq!(
        hex::encode(tree.root_hash),
        hex::encode(their_root),
        "root hash, {case}"
    );
    let (our_bytes, their_bytes) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
    assert_eq!(
        our_bytes.len(),
        their_bytes.len(),
        "hash device length, {case}"
    );
    if let Some(at) = our_bytes.iter().zip(&their_bytes).position(|(a, b)| a != b) {
        panic!("hash devices differ first at byte {at}, {case}");
    }
    assert_eq!(tree.hash_device_len, our_bytes.len() as u64, "{case}");
    assert_eq!(tree.data_blocks, blocks, "{case}");
    tree
}

#[test]
fn matches_veritysetup_across_image_sizes() {
    for blocks in [1, 2, 127, 128, 129, 1000, 4097, 33333] {
        assert_matches_veritysetup(blocks, &block_params(4096, 4096, &SALT));
    }
}

#[test]
fn matches_veritysetup_across_salt_lengths() {
    // Around SHA-256's 64-byte block, where the prehashed salt state changes shape.
    for salt_len in [0, 1, 63, 64, 65, 256] {
        let salt = pseudo_random_bytes(salt_len, 7);
        assert_matches_veritysetup(129, &block_params(4096, 4096, &salt));
    }
}

#[test]
fn matches_veritysetup_across_block_sizes() {
    for (data_block_size, hash_block_size, blocks) in [
        (512, 512, 1000),
        (512, 1024, 2400),
        (1024, 4096, 300),
        (4096, 512, 300),
        (2048, 2048, 70),
        (65536, 65536, 18),
        (65536, 512, 40),
    ] {
        assert_matches_veritysetup(
            blocks,
            &block_params(data_block_size, hash_block_size, &SALT),
        );
    }
}

#[test]
fn matches_veritysetup_without_superblock_and_at_offsets() {
    let omitted = |hash_offset| VerityParams {
        superblock: Superblock::Omitted,
        hash_offset,
        ..block_params(4096, 4096, &SALT)
    };
    let tree = assert_matches_veritysetup(129, &omitted(0));
    assert_eq!((tree.tree_offset, tree.hash_device_len), (0, 3 * 4096));
    assert_matches_veritysetup(129, &omitted(8192));
    assert_matches_veritysetup(1, &omitted(0));

    let written_at = |hash_offset, hash_block_size| VerityParams {
        hash_offset,
        ..block_params(4096, hash_block_size, &SALT)
    };
    let tree = assert_matches_veritysetup(129, &written_at(512, 4096));
    assert_eq!(tree.tree_offset, 4096);
    let tree = assert_matches_veritysetup(129, &written_at(3584, 1024));
    assert_eq!(tree.tree_offset, 4096);
}

#[test]
fn thread_count_and_batching_do_not_change_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 4097;
    let data_path = data_image(dir.path(), blocks, 4096);
    let data = File::open(&data_path).unwrap();
    let params = block_params(4096, 4096, &SALT);
    let threads = |n| NonZeroUsize::new(n).unwrap();
    let tunings = [
        Tuning {
            threads: threads(1),
            ..Tuning::default()
        },
        Tuning {
            threads: threads(2),
            ..Tuning::default()
        },
        // Many batches of one hash block's worth of data, tasks of one block.
        Tuning {
            threads: threads(1),
            task_bytes: 1,
            batch_bytes: 1,
        },
        // Three threads, tasks that do not divide a batch, batches of several hash blocks.
        Tuning {
            threads: threads(3),
            task_bytes: 3 * 4096,
            batch_bytes: 5 * 128 * 4096,
        },
    ];
    let theirs = dir.path().join("theirs.hash");
    let their_root = veritysetup_format(&data_path, &theirs, &params);
    let their_bytes = fs::read(&theirs).unwrap();
    for tuning in tunings {
        let mut ours = Cursor::new(Vec::new());
        let tree = format_tuned(&data, &mut ours, &params, &tuning).unwrap();
        assert_eq!(tree.root_hash, their_root, "{tuning:?}");
        assert!(ours.get_ref() == &their_bytes, "{tuning:?}");
        verify_tuned(
            &data,
            &File::open(&theirs).unwrap(),
            &params,
            &their_root,
            &tuning,
        )
        .unwrap();
    }
}

/// Flips one bit of the byte at `offset` in the file at `path`.
fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
}

/// Our verdict and veritysetup's on one image and hash device.
fn verdicts(
    data: &Path,
    hash: &Path,
    params: &VerityParams,
    root_hash: &[u8; 32],
) -> (Result<(), VerityError>, bool) {
    let ours = verify(
        &File::open(data).unwrap(),
        &File::open(hash).unwrap(),
        params,
        root_hash,
    );
    (ours, veritysetup_verifies(data, hash, params, root_hash))
}

#[test]
fn corruption_is_found_by_us_and_by_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_image(dir.path(), 1000, 4096);
    let hash = dir.path().join("hash");
    let params = block_params(4096, 4096, &SALT);
    let tree = format_file(&data, &hash, &params).unwrap();
    let root = tree.root_hash;
    // Superblock block, level 1 (one block), level 0 (eight blocks).
    let (level_one, level_zero) = (4096, 8192);

    let (ours, theirs) = verdicts(&data, &hash, &params, &root);
    assert!(ours.is_ok() && theirs, "{ours:?}, veritysetup: {theirs}");

    let cases: [(&Path, u64, &str); 5] = [
        (&data, 777 * 4096 + 100, "CorruptDataBlock { block: 777 }"),
        (&data, 0, "CorruptDataBlock { block: 0 }"),
        (
            &hash,
            level_zero + 3 * 4096 + 5,
            "CorruptHashBlock { level: 0, index: 3, offset: 20480 }",
        ),
        (
            &hash,
            level_one + 31,
            "CorruptHashBlock { level: 1, index: 0, offset: 4096 }",
        ),
        (&hash, 88, "SuperblockMismatch { field: \"salt\" }"),
    ];
    for (path, offset, expected) in cases {
        flip_byte(path, offset);
        let (ours, theirs) = verdicts(&data, &hash, &params, &root);
        assert_eq!(format!("{:?}", ours.unwrap_err()), expected);
        assert!(
            !theirs,
            "veritysetup accepted a flipped byte at {offset} of {}",
            path.display()
        );
        flip_byte(path, offset);
    }

    let mut wrong_root = root;
    wrong_root[31] ^= 1;
    let (ours, theirs) = verdicts(&data, &hash, &params, &wrong_root);
    assert!(
        matches!(
            ours,
            Err(VerityError::CorruptHashBlock {
                level: 1,
                index: 0,
                ..
            })
        ),
        "{ours:?}"
    );
    assert!(!theirs);
}

#[test]
fn corruption_is_found_without_superblock_and_in_one_block_images() {
    let dir = tempfile::tempdir().unwrap();
    let params = VerityParams {
        superblock: Superblock::Omitted,
        ..block_params(4096, 4096, &SALT)
    };
    let data = data_image(dir.path(), 129, 4096);
    let hash = dir.path().join("hash");
    let root = format_file(&data, &hash, &params).unwrap().root_hash;
    let (ours, theirs) = verdicts(&data, &hash, &params, &root);
    assert!(ours.is_ok() && theirs, "{ours:?}, veritysetup: {theirs}");
    flip_byte(&data, 128 * 4096);
    let (ours, theirs) = verdicts(&data, &hash, &params, &root);
    assert!(
        matches!(ours, Err(VerityError::CorruptDataBlock { block: 128 })),
        "{ours:?}"
    );
    assert!(!theirs);

    let data = data_image(dir.path(), 1, 4096);
    let params = block_params(4096, 4096, &SALT);
    let root = format_file(&data, &hash, &params).unwrap().root_hash;
    assert!(verdicts(&data, &hash, &params, &root).1);
    flip_byte(&data, 4095);
    let (ours, theirs) = verdicts(&data, &hash, &params, &root);
    assert!(
        matches!(ours, Err(VerityError::CorruptDataBlock { block: 0 })),
        "{ours:?}"
    );
    assert!(!theirs);
}

/// The error `format` gives for `data_len` bytes of data and `params`.
fn format_error(data_len: usize, params: &VerityParams) -> VerityError {
    let mut data = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut data, &vec![0; data_len]).unwrap();
    format(&data, &mut Cursor::new(Vec::new()), params).unwrap_err()
}

#[test]
fn bad_parameters_and_images_are_refused() {
    for size in [0, 256, 1000, 4095, 131072] {
        let error = format_error(131072, &block_params(size, 4096, &SALT));
        assert!(
            matches!(error, VerityError::BadBlockSize { kind: "data", .. }),
            "{size}: {error}"
        );
        let error = format_error(131072, &block_params(4096, size, &SALT));
        assert!(
            matches!(error, VerityError::BadBlockSize { kind: "hash", .. }),
            "{size}: {error}"
        );
    }
    let error = format_error(4096, &block_params(4096, 4096, &[0; 257]));
    assert!(
        matches!(error, VerityError::SaltTooLong { len: 257 }),
        "{error}"
    );
    assert!(matches!(
        format_error(0, &block_params(4096, 4096, &SALT)),
        VerityError::EmptyData
    ));
    let error = format_error(4097, &block_params(4096, 4096, &SALT));
    assert!(
        matches!(
            error,
            VerityError::DataNotBlockAligned {
                len: 4097,
                block_size: 4096
            }
        ),
        "{error}"
    );

    let superblock_at_100 = VerityParams {
        hash_offset: 100,
        ..block_params(4096, 4096, &SALT)
    };
    assert!(matches!(
        format_error(4096, &superblock_at_100),
        VerityError::BadHashOffset { offset: 100, .. }
    ));
    let tree_at_512 = VerityParams {
        hash_offset: 512,
        superblock: Superblock::Omitted,
        ..block_params(4096, 4096, &SALT)
    };
    assert!(matches!(
        format_error(4096, &tree_at_512),
        VerityError::BadHashOffset { offset: 512, .. }
    ));
}

#[test]
fn a_short_hash_device_or_the_image_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_image(dir.path(), 300, 4096);
    let hash = dir.path().join("hash");
    let params = block_params(4096, 4096, &SALT);
    let tree = format_file(&data, &hash, &params).unwrap();
    let hash_file = OpenOptions::new().write(true).open(&hash).unwrap();
    hash_file.set_len(tree.hash_device_len - 1).unwrap();
    let error = verify(
        &File::open(&data).unwrap(),
        &File::open(&hash).unwrap(),
        &params,
        &tree.root_hash,
    );
    assert!(
        matches!(
            error,
            Err(VerityError::HashDeviceTooShort { needed: 20480, .. })
        ),
        "{error:?}"
    );

    let error = format_file(&data, &data, &params).unwrap_err();
    assert!(matches!(error, VerityError::HashDeviceIsData), "{error}");
    assert_eq!(fs::metadata(&data).unwrap().len(), 300 * 4096);
}
