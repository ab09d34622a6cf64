//! `mvm volume create | ls | rm | snapshot | snapshots | restore`: persistent volumes that are
//! ciphertext at rest ([`mvm_ir::volume`]), attached with `mvm up|run --volume NAME:PATH`.
//!
//! A new volume's empty ext4 filesystem is made here (`mkfs.ext4`, its tables and journal
//! written whole, so that nothing the guest reads of it is noise) in a private scratch file,
//! then encrypted sector by sector with the volume's key — AES-256 in XTS mode, the tweak the
//! sector's number, as dm-crypt's `aes-xts-plain64` reads it — into the volume's disk. The
//! scratch file holds no data, only an empty filesystem's structure, and is removed at once.
//! From then on only the guest, through dm-crypt, reads or writes the filesystem.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use anyhow::Context;
use clap::Subcommand;
use mvm_ir::volume::{check_size, VolumeError, VolumeStore, KEY_BYTES, SECTOR_BYTES};
use serde_json::json;

use super::vm::copy::parse_size;
use super::{coded, coded_io, Host};
use crate::output::Output;

mod archive;

/// Bytes encrypted at a time.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Make an encrypted volume: SIZE of disk holding an empty ext4 filesystem, ciphertext at
    /// rest under a key of its own (sealed under this host's volume key). Attach it with `mvm
    /// up|run --volume NAME:/PATH[:ro]`.
    Create {
        /// The volume's name (1-63 of a-z 0-9 . _ -).
        name: String,
        /// Its size: 16M to 1T, with a K, M, G or T suffix (powers of 1024), in whole 4 KiB
        /// blocks. The whole disk is written (encrypted), so it takes that much room here.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: u64,
    },
    /// List the volumes: name, size, whether a VM has one attached, its snapshots, when made.
    Ls,
    /// Remove a volume and its snapshots (refused while a VM has it attached: VOLUME004).
    Rm {
        /// The volume.
        name: String,
    },
    /// Keep the volume's disk as it is now under a snapshot's name (refused while a VM has it
    /// attached): a copy, which the kernel makes by cloning extents where the filesystem has
    /// reflinks, hashed and recorded.
    Snapshot {
        /// The volume.
        name: String,
        /// The snapshot's name; `sYYYYMMDD-HHMMSS` of now when absent.
        #[arg(long = "as", value_name = "SNAPSHOT")]
        snapshot: Option<String>,
    },
    /// List a volume's snapshots, oldest first.
    Snapshots {
        /// The volume.
        name: String,
    },
    /// Write the volume to FILE as an encrypted archive to move it to another host: its disk
    /// as it is (ciphertext) and its key sealed under a key derived from a passphrase
    /// (Argon2id), bound to the disk's SHA-256. Refused while a VM has it attached.
    Export {
        /// The volume.
        name: String,
        /// The archive to write (replaced whole; 0600).
        file: std::path::PathBuf,
        /// Read the passphrase (at least 12 characters; one trailing newline dropped) from
        /// this file.
        #[arg(long, value_name = "FILE", conflicts_with = "passphrase_env")]
        passphrase_file: Option<std::path::PathBuf>,
        /// Take the passphrase from this process's variable VAR.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
    },
    /// Make a volume from an archive `mvm volume export` wrote: its passphrase opens the key,
    /// the disk's SHA-256 is checked as it is copied (VOLUME005 and nothing kept when it
    /// differs), and the key is sealed under this host's key.
    Import {
        /// The archive.
        file: std::path::PathBuf,
        /// The new volume's name; the exported volume's when absent.
        #[arg(long = "as", value_name = "NAME")]
        name: Option<String>,
        /// Read the passphrase from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "passphrase_env")]
        passphrase_file: Option<std::path::PathBuf>,
        /// Take the passphrase from this process's variable VAR.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
    },
    /// Put a snapshot back as the volume's disk (refused while attached; the snapshot's
    /// digest is checked first, VOLUME005 when it does not match). The snapshot stays.
    Restore {
        /// The volume.
        name: String,
        /// The snapshot.
        snapshot: String,
    },
}

pub fn run(command: VolumeCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let store = VolumeStore::open(&host.home).map_err(coded)?;
    match command {
        VolumeCommand::Create { name, size } => {
            check_size(size).map_err(coded)?;
            let id = create(&store, &name, size)?;
            host.audit(
                "volume.created",
                json!({"name": name, "id": id, "size_bytes": size}),
            )?;
            out.result(json!({"name": name, "id": id, "size_bytes": size}), || {
                format!(
                    "{name}: {} MiB, encrypted ({})",
                    size >> 20,
                    mvm_ir::volume::CIPHER
                )
            });
        }
        VolumeCommand::Ls => {
            let mut damaged = Vec::new();
            let volumes = store
                .list(|name, e| damaged.push(format!("{name}: {}: {e}", e_code(&e))))
                .map_err(coded)?;
            for line in &damaged {
                eprintln!("mvm: {line}");
            }
            let listed: Vec<_> = volumes
                .iter()
                .map(|meta| {
                    let attached = matches!(store.hold(&meta.name), Err(VolumeError::InUse(_)));
                    let snapshots = store.snapshots(&meta.name).map(|s| s.len()).unwrap_or(0);
                    json!({"name": meta.name, "id": meta.id, "size_bytes": meta.size_bytes,
                           "cipher": meta.cipher, "created_at": meta.created_at,
                           "attached": attached, "snapshots": snapshots})
                })
                .collect();
            out.result(json!({"volumes": listed}), || {
                let mut text = format!(
                    "{:<24} {:>10} {:<9} {:>9}  CREATED",
                    "NAME", "SIZE", "ATTACHED", "SNAPSHOTS"
                );
                for volume in &listed {
                    text.push_str(&format!(
                        "\n{:<24} {:>8}Mi {:<9} {:>9}  {}",
                        volume["name"].as_str().unwrap_or_default(),
                        volume["size_bytes"].as_u64().unwrap_or_default() >> 20,
                        if volume["attached"] == true {
                            "yes"
                        } else {
                            "no"
                        },
                        volume["snapshots"],
                        volume["created_at"].as_str().unwrap_or_default(),
                    ));
                }
                text
            });
        }
        VolumeCommand::Rm { name } => {
            store.remove(&name).map_err(coded)?;
            host.audit("volume.removed", json!({"name": name}))?;
            out.result(json!({"removed": name}), || format!("{name} removed"));
        }
        VolumeCommand::Snapshot { name, snapshot } => {
            let snapshot = snapshot.unwrap_or_else(default_snapshot_name);
            let taken = store.snapshot(&name, &snapshot).map_err(coded)?;
            host.audit(
                "volume.snapshot",
                json!({"name": name, "snapshot": taken.name, "sha256": taken.sha256,
                       "size_bytes": taken.size_bytes}),
            )?;
            out.result(json!({"volume": name, "snapshot": taken}), || {
                format!("{name}: snapshot {} ({})", taken.name, taken.sha256)
            });
        }
        VolumeCommand::Snapshots { name } => {
            let taken = store.snapshots(&name).map_err(coded)?;
            out.result(json!({"volume": name, "snapshots": taken}), || {
                let mut text = format!("{:<24} {:<21} SHA256", "SNAPSHOT", "CREATED");
                for snapshot in &taken {
                    text.push_str(&format!(
                        "\n{:<24} {:<21} {}",
                        snapshot.name, snapshot.created_at, snapshot.sha256
                    ));
                }
                text
            });
        }
        VolumeCommand::Export {
            name,
            file,
            passphrase_file,
            passphrase_env,
        } => {
            let passphrase = passphrase(passphrase_file, passphrase_env)?;
            let header = archive::export(&store, &name, &file, &passphrase)?;
            host.audit(
                "volume.exported",
                json!({"name": name, "sha256": header.data_sha256, "size_bytes": header.size_bytes}),
            )?;
            out.result(
                json!({"volume": name, "file": file, "sha256": header.data_sha256}),
                || format!("{name} → {} ({})", file.display(), header.data_sha256),
            );
        }
        VolumeCommand::Import {
            file,
            name,
            passphrase_file,
            passphrase_env,
        } => {
            let passphrase = passphrase(passphrase_file, passphrase_env)?;
            let (meta, header) = archive::import(&store, &file, name.as_deref(), &passphrase)?;
            host.audit(
                "volume.imported",
                json!({"name": meta.name, "id": meta.id, "sha256": header.data_sha256,
                       "size_bytes": meta.size_bytes, "exported_as": header.name}),
            )?;
            out.result(
                json!({"name": meta.name, "id": meta.id, "sha256": header.data_sha256}),
                || format!("{}: imported ({})", meta.name, header.data_sha256),
            );
        }
        VolumeCommand::Restore { name, snapshot } => {
            let restored = store.restore(&name, &snapshot).map_err(coded)?;
            host.audit(
                "volume.restored",
                json!({"name": name, "snapshot": restored.name, "sha256": restored.sha256}),
            )?;
            out.result(json!({"volume": name, "restored": restored}), || {
                format!("{name}: restored {}", restored.name)
            });
        }
    }
    Ok(())
}

/// The passphrase of an export or import: from a file or a variable, never an argument (which
/// every user of the host can read); at least 12 characters.
fn passphrase(
    file: Option<std::path::PathBuf>,
    env: Option<String>,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let text = match (file, env) {
        (Some(file), _) => zeroize::Zeroizing::new(
            fs::read_to_string(&file).with_context(|| file.display().to_string())?,
        ),
        (None, Some(var)) => zeroize::Zeroizing::new(std::env::var(&var).map_err(|_| {
            super::coded_as("VOLUME002", format!("--passphrase-env: no variable {var}"))
        })?),
        (None, None) => {
            return Err(super::coded_as(
                "VOLUME002",
                "give the passphrase with --passphrase-file or --passphrase-env",
            ))
        }
    };
    let trimmed = zeroize::Zeroizing::new(text.strip_suffix('\n').unwrap_or(&text).to_string());
    if trimmed.chars().count() < 12 {
        return Err(super::coded_as(
            "VOLUME002",
            "a volume archive's passphrase is at least 12 characters",
        ));
    }
    Ok(trimmed)
}

fn e_code(e: &VolumeError) -> &str {
    use mvm_ir::Coded;
    e.code()
}

/// `sYYYYMMDD-HHMMSS` of now (UTC).
fn default_snapshot_name() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "s{:04}{:02}{:02}-{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Makes volume `name` of `size` bytes; its id.
fn create(store: &VolumeStore, name: &str, size: u64) -> anyhow::Result<String> {
    let (key, meta) = store.new_volume(name, size).map_err(coded)?;
    let making = store.begin(name).map_err(coded)?;
    let plain = making.scratch("empty-filesystem");
    let made = (|| -> anyhow::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&plain)?;
        file.set_len(size)?;
        drop(file);
        make_filesystem(&plain, name)?;
        encrypt(&plain, &making.data(), &key)
    })();
    let _ = fs::remove_file(&plain);
    made?;
    making.commit(&meta).map_err(coded)?;
    Ok(meta.id)
}

/// An empty ext4 filesystem in `file` (its whole size), with a journal, every table written.
fn make_filesystem(file: &Path, label: &str) -> anyhow::Result<()> {
    let mkfs = super::dev::mkfs_ext4().ok_or_else(|| {
        coded_io(
            "VOLUME006",
            "mkfs.ext4 was not found (install e2fsprogs): it makes a new volume's filesystem",
        )
    })?;
    let label: String = label.chars().take(16).collect();
    let made = mvm_ir::env::command(&mkfs)
        .args(["-q", "-F", "-m", "0", "-b", "4096", "-L", &label])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(file)
        .output()
        .with_context(|| format!("starting {}", mkfs.display()))?;
    if !made.status.success() {
        return Err(coded_io(
            "VOLUME006",
            format!(
                "{} failed: {}",
                mkfs.display(),
                String::from_utf8_lossy(&made.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Writes `plain` encrypted with `key` to `data` (a new 0600 file, synced): AES-256-XTS over
/// 512-byte sectors, each sector's tweak its number — dm-crypt's `aes-xts-plain64`.
pub fn encrypt(plain: &Path, data: &Path, key: &[u8]) -> anyhow::Result<()> {
    if key.len() != KEY_BYTES {
        anyhow::bail!("a volume key is {KEY_BYTES} bytes");
    }
    let xts = Xts {
        data: Aes256::new(GenericArray::from_slice(&key[..32])),
        tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
    };
    let mut input = File::open(plain).with_context(|| plain.display().to_string())?;
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(data)
        .with_context(|| data.display().to_string())?;
    let mut buffer = vec![0u8; CHUNK];
    let mut blocks = vec![Block::default(); CHUNK / 16];
    let mut sector = 0u64;
    loop {
        let n = read_full(&mut input, &mut buffer)?;
        if n == 0 {
            break;
        }
        if n % SECTOR_BYTES as usize != 0 {
            anyhow::bail!("{} is not a whole number of sectors", plain.display());
        }
        xts.encrypt(&mut buffer[..n], &mut blocks, sector);
        output.write_all(&buffer[..n])?;
        sector += n as u64 / SECTOR_BYTES;
    }
    output.sync_all()?;
    Ok(())
}

/// XTS (IEEE P1619) over AES-256: each 16-byte block is XORed with the sector's tweak —
/// the sector's number, little-endian, encrypted with the second key — multiplied by α once
/// per block before it, encrypted with the first key, and XORed again. The blocks of a chunk
/// go to AES together, which the `aes` crate encrypts several at a time.
struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl Xts {
    /// Encrypts `bytes` (whole sectors, the first of them `first_sector`) in place; `blocks`
    /// is scratch room for one block in 16 bytes of `bytes`.
    fn encrypt(&self, bytes: &mut [u8], blocks: &mut [Block], first_sector: u64) {
        let sector_blocks = SECTOR_BYTES as usize / 16;
        let mut tweaks = vec![0u128; bytes.len() / 16];
        for (sector, tweaks) in tweaks.chunks_exact_mut(sector_blocks).enumerate() {
            let mut t = Block::from((u128::from(first_sector) + sector as u128).to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut t = u128::from_le_bytes(t.into());
            for slot in tweaks {
                *slot = t;
                // Times α in GF(2^128), reduced by x^128 + x^7 + x^2 + x + 1.
                t = (t << 1) ^ ((t >> 127) * 0x87);
            }
        }
        let blocks = &mut blocks[..tweaks.len()];
        for ((block, chunk), t) in blocks.iter_mut().zip(bytes.chunks_exact(16)).zip(&tweaks) {
            let x = u128::from_le_bytes(chunk.try_into().unwrap_or_default()) ^ t;
            *block = Block::from(x.to_le_bytes());
        }
        self.data.encrypt_blocks(blocks);
        for ((block, chunk), t) in blocks.iter().zip(bytes.chunks_exact_mut(16)).zip(&tweaks) {
            let x = u128::from_le_bytes((*block).into()) ^ t;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Reads until `buffer` is full or the file ends; how much was read.
fn read_full(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
