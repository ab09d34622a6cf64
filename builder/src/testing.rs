//! Test support shared by the builder's tests and the end-to-end tests of `mvm build`: OCI
//! image layouts written blob by blob as a publisher would, and a real registry (Debian's
//! `docker-registry`) on a loopback port, filled with skopeo. Built only for tests
//! (`cfg(test)` or the `testing` feature).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::json;

/// An OCI image layout written blob by blob, as a publisher would.
pub struct TestLayout {
    /// The layout directory.
    pub dir: tempfile::TempDir,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha(bytes: &[u8]) -> String {
    mvm_ir::digest::sha256_prefixed(bytes)
}

/// One entry of a test layer.
#[derive(Clone)]
pub enum Entry<'a> {
    /// A regular file: path, content, mode.
    File(&'a str, &'a [u8], u32),
    /// A directory.
    Dir(&'a str),
    /// A directory owned by a user: path, uid (also its gid).
    OwnedDir(&'a str, u64),
    /// A symlink: path, target.
    Symlink(&'a str, &'a str),
    /// A hardlink: path, target path.
    Hardlink(&'a str, &'a str),
    /// A character device node: path, major, minor.
    CharDevice(&'a str, u32, u32),
    /// A block device node: path, major, minor.
    BlockDevice(&'a str, u32, u32),
    /// A named pipe.
    Fifo(&'a str),
}

/// A tar layer of `entries`, in order.
pub fn layer_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data).unwrap();
            }
            Entry::Dir(path) | Entry::OwnedDir(path, _) => {
                if let Entry::OwnedDir(_, owner) = entry {
                    header.set_uid(*owner);
                    header.set_gid(*owner);
                }
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
            Entry::Hardlink(path, target) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o644);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
            Entry::CharDevice(path, major, minor) | Entry::BlockDevice(path, major, minor) => {
                header.set_entry_type(match entry {
                    Entry::CharDevice(..) => tar::EntryType::Char,
                    _ => tar::EntryType::Block,
                });
                header.set_mode(0o666);
                header.set_size(0);
                header.set_device_major(*major).unwrap();
                header.set_device_minor(*minor).unwrap();
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
            Entry::Fifo(path) => {
                header.set_entry_type(tar::EntryType::Fifo);
                header.set_mode(0o600);
                header.set_size(0);
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// A tar layer with regular files (mode 0644).
pub fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// `bytes`, gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `bytes`, zstd-compressed.
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// Media type of an uncompressed layer.
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip layer.
pub const TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd layer.
pub const TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

impl Default for TestLayout {
    fn default() -> Self {
        Self::new()
    }
}

impl TestLayout {
    /// An empty layout in a temporary directory.
    pub fn new() -> Self {
        Self::new_in(&std::env::temp_dir())
    }

    /// An empty layout in a temporary directory under `parent` (to be kept there under a name
    /// of its own: `dir.keep()`, then a rename on the same file system).
    pub fn new_in(parent: &Path) -> Self {
        let dir = tempfile::tempdir_in(parent).unwrap();
        fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Self { dir }
    }

    /// Stores a blob; returns its digest.
    pub fn blob(&self, bytes: &[u8]) -> String {
        let digest = sha(bytes);
        fs::write(self.blob_path(&digest), bytes).unwrap();
        digest
    }

    /// Where blob `digest` is stored.
    pub fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        self.dir.path().join("blobs/sha256").join(&digest[7..])
    }

    /// Writes an image of `layers` (media type, blob, uncompressed tar) for `arch`; returns the
    /// manifest's digest and size.
    pub fn image(&self, arch: &str, layers: &[(&str, Vec<u8>, Vec<u8>)]) -> (String, usize) {
        let runtime = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
        self.image_with_config(arch, runtime, layers)
    }

    /// Writes an image as [`TestLayout::image`] does, with `runtime` as its config's `config`
    /// (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`, `Labels`, `ExposedPorts`).
    pub fn image_with_config(
        &self,
        arch: &str,
        runtime: serde_json::Value,
        layers: &[(&str, Vec<u8>, Vec<u8>)],
    ) -> (String, usize) {
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, _, tar)| sha(tar)).collect::<Vec<_>>()}
        });
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.blob(&config), "size": config.len()},
            "layers": layers.iter().map(|(media, blob, _)| json!({"mediaType": media, "digest": self.blob(blob), "size": blob.len()})).collect::<Vec<_>>()
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        (self.blob(&manifest), manifest.len())
    }

    /// Writes an index of `(manifest digest, size, architecture)` and `index.json` naming it as
    /// `tag`; returns the index digest.
    pub fn index(&self, manifests: &[(String, usize, &str)], tag: &str) -> String {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests.iter().map(|(d, s, arch)| json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
                "platform": {"architecture": arch, "os": "linux"}})).collect::<Vec<_>>()
        });
        let index = serde_json::to_vec(&index).unwrap();
        let digest = self.blob(&index);
        let top = json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]});
        fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&top).unwrap(),
        )
        .unwrap();
        digest
    }

    /// An image of static busybox and symlinks to it for `applets` in `/bin`, `PATH=/bin`, its
    /// Cmd `/bin/sh`: the small guest of the end-to-end tests. Returns its manifest's digest.
    pub fn busybox_with(&self, applets: &[&str]) -> String {
        self.busybox_and(applets, &[])
    }

    /// [`busybox_with`](Self::busybox_with) with E2B's layout: the workload user (1000) is
    /// `user`, its home `/home/user`.
    pub fn busybox_with_user_home(&self, applets: &[&str]) -> String {
        self.busybox_and(
            applets,
            &[
                Entry::Dir("etc"),
                Entry::File(
                    "etc/passwd",
                    b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
                    0o644,
                ),
                Entry::File("etc/group", b"root:x:0:\nuser:x:1000:\n", 0o644),
                Entry::Dir("home"),
                Entry::OwnedDir("home/user", 1000),
            ],
        )
    }

    fn busybox_and(&self, applets: &[&str], more: &[Entry<'_>]) -> String {
        let busybox = fs::read("/bin/busybox")
            .expect("busybox-static must be installed (.ci/run installs it)");
        let links: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
        let mut entries = vec![
            Entry::Dir("bin"),
            Entry::File("bin/busybox", &busybox, 0o755),
        ];
        entries.extend(links.iter().map(|link| Entry::Symlink(link, "busybox")));
        entries.extend(more.iter().map(Entry::clone));
        let root = layer_of(&entries);
        let config = json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]});
        self.image_with_config("amd64", config, &[(TAR_GZIP, gzip(&root), root)])
            .0
    }

    /// A busybox image: the static busybox from Debian's busybox-static as `/bin/busybox` with
    /// its applets as symlinks, then layers exercising a whiteout, an opaque whiteout, a
    /// hardlink and symlinks. Returns the manifest digest and the files the final tree must
    /// hold (path, content).
    pub fn busybox(&self) -> (String, Vec<(String, Vec<u8>)>) {
        let busybox = fs::read("/bin/busybox")
            .expect("busybox-static must be installed (.ci/run installs it)");
        let base = layer_of(&[
            Entry::Dir("bin"),
            Entry::File("bin/busybox", &busybox, 0o755),
            Entry::Symlink("bin/sh", "busybox"),
            Entry::Symlink("bin/echo", "busybox"),
            Entry::Symlink("bin/cat", "busybox"),
            Entry::Symlink("bin/ls", "busybox"),
            Entry::Dir("etc"),
            Entry::File("etc/motd", b"from the base layer\n", 0o644),
            Entry::File("etc/old.conf", b"gone\n", 0o644),
            Entry::Dir("var/cache"),
            Entry::File("var/cache/stale", b"stale\n", 0o644),
            Entry::File("srv/data.txt", b"data\n", 0o640),
        ]);
        let changes = layer_of(&[
            Entry::File("etc/.wh.old.conf", b"", 0o644),
            Entry::File("var/cache/.wh..wh..opq", b"", 0o644),
            Entry::File("var/cache/fresh", b"fresh\n", 0o644),
            Entry::Hardlink("srv/data-link.txt", "srv/data.txt"),
            Entry::Symlink("etc/motd.link", "/etc/motd"),
            Entry::File(
                "usr/local/bin/hello",
                b"#!/bin/sh\necho hello from mvm\n",
                0o755,
            ),
        ]);
        let (digest, _) = self.image(
            "amd64",
            &[
                (TAR_GZIP, gzip(&base), base),
                (TAR_ZSTD, zstd(&changes), changes),
            ],
        );
        let expected = vec![
            ("bin/busybox".to_string(), busybox),
            ("etc/motd".to_string(), b"from the base layer\n".to_vec()),
            ("var/cache/fresh".to_string(), b"fresh\n".to_vec()),
            ("srv/data.txt".to_string(), b"data\n".to_vec()),
            ("srv/data-link.txt".to_string(), b"data\n".to_vec()),
            (
                "usr/local/bin/hello".to_string(),
                b"#!/bin/sh\necho hello from mvm\n".to_vec(),
            ),
        ];
        (digest, expected)
    }

    /// A three-layer image (plain, gzip, zstd) with a whiteout; returns the index digest.
    pub fn standard(&self) -> String {
        let base = layer(&[
            ("etc/os-release", b"mvm test\n"),
            ("bin/tool", b"v1"),
            ("tmp/scratch", b"x"),
        ]);
        let update = layer(&[("bin/tool", b"v2"), ("tmp/.wh.scratch", b"")]);
        let extra = layer(&[("opt/data", &[42u8; 10_000])]);
        let amd64 = self.image(
            "amd64",
            &[
                (TAR, base.clone(), base),
                (TAR_GZIP, gzip(&update), update),
                (TAR_ZSTD, zstd(&extra), extra),
            ],
        );
        let other = layer(&[("arm", b"arm")]);
        let arm64 = self.image("arm64", &[(TAR, other.clone(), other)]);
        self.index(
            &[(arm64.0, arm64.1, "arm64"), (amd64.0, amd64.1, "amd64")],
            "latest",
        )
    }
}

/// A real registry (Debian's `docker-registry`) on a loopback port, stopped on drop.
pub struct LocalRegistry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub address: String,
    _storage: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts a registry with empty storage on a free port and waits until it listens.
    pub fn start() -> Self {
        let storage = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = storage.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                storage.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "docker-registry must be installed (.ci/run installs Debian's docker-registry)",
            );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen on {address}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            child,
            address,
            _storage: storage,
        }
    }

    /// Pushes the layout's `tag` to `repository` with skopeo, keeping every digest.
    pub fn push(&self, layout: &Path, tag: &str, repository: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--quiet",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repository}:{tag}", self.address))
            .output()
            .expect("skopeo must be installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
