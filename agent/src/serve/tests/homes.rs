//! The workload user's home as a second file root: reached like `/tmp` when the image's own
//! passwd gives the user a directory of its own, and not at all otherwise.

use std::path::Path;

use super::*;
use crate::serve::files::{FileRoots, TMP_ROOT};

/// A home directory outside `/tmp` (as `/home/user` is in a guest), owned by this process's
/// user, and a passwd file naming it for that user.
struct Home {
    _dir: tempfile::TempDir,
    path: String,
    passwd: tempfile::NamedTempFile,
    owner: Credentials,
}

fn home() -> Home {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("user");
    std::fs::create_dir(&path).unwrap();
    let path = path.to_str().unwrap().to_string();
    let owner = Credentials {
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    };
    let passwd = passwd(&format!(
        "user:x:{}:{}::{path}:/bin/sh\n",
        owner.uid, owner.gid
    ));
    Home {
        _dir: dir,
        path,
        passwd,
        owner,
    }
}

/// Removes a path when dropped (a symlink made beside the temporary directory).
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn passwd(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn a_home_of_the_users_own_is_a_root_and_nothing_else_is() {
    let home = home();
    let roots = FileRoots::with_home_of(home.owner, home.passwd.path());
    assert_eq!(roots.paths(), [TMP_ROOT.to_string(), home.path.clone()]);

    let others = Credentials {
        uid: home.owner.uid + 1,
        ..home.owner
    };
    let link = format!("{}-link", home.path);
    std::os::unix::fs::symlink(&home.path, &link).unwrap();
    // The home's parent reached through a symlink.
    let parent = Path::new(&home.path).parent().unwrap();
    let parent_link = format!("{}-parent", parent.display());
    std::os::unix::fs::symlink(parent, &parent_link).unwrap();
    let _unlink = RemoveOnDrop(parent_link.clone());
    let owner = home.owner;
    for (user, line) in [
        // Not the user's: another's directory.
        (
            others,
            format!("other:x:{}:1::{}:/bin/sh", others.uid, home.path),
        ),
        // Not a directory of its own: a symlink to one or through one, `/`, under `/tmp`,
        // unclean, relative.
        (owner, format!("user:x:{}:1::{link}:/bin/sh", owner.uid)),
        (
            owner,
            format!("user:x:{}:1::{parent_link}/user:/bin/sh", owner.uid),
        ),
        (owner, format!("user:x:{}:1::/:/bin/sh", owner.uid)),
        (owner, format!("user:x:{}:1::/tmp:/bin/sh", owner.uid)),
        (owner, format!("user:x:{}:1::/tmp/x:/bin/sh", owner.uid)),
        (
            owner,
            format!("user:x:{}:1::{}/../user:/bin/sh", owner.uid, home.path),
        ),
        (
            owner,
            format!("user:x:{}:1::{}/:/bin/sh", owner.uid, home.path),
        ),
        (owner, format!("user:x:{}:1::home/user:/bin/sh", owner.uid)),
        // No home at all.
        (owner, format!("user:x:{}:1", owner.uid)),
        (owner, String::new()),
    ] {
        let roots = FileRoots::with_home_of(user, passwd(&line).path());
        assert_eq!(roots, FileRoots::tmp(), "{line}");
    }
    assert_eq!(
        FileRoots::with_home_of(owner, Path::new("/nonexistent/passwd")),
        FileRoots::tmp()
    );
}

#[test]
fn files_are_written_listed_and_read_in_the_home() {
    let home = home();
    let mut host = Host::start_with(ServeConfig {
        file_roots: FileRoots::with_home_of(home.owner, home.passwd.path()),
        ..ServeConfig::on_host()
    });
    let file = format!("{}/notes.txt", home.path);
    let written = upload(&mut host, 1, &file, b"in the home", &sha256(b"in the home"));
    assert!(matches!(written, Response::FsWrite(_)), "{written:?}");
    let (bytes, read) = host.download(3, &file, false);
    assert!(matches!(read, Response::FsRead(_)), "{read:?}");
    assert_eq!(bytes, b"in the home");

    host.send(
        5,
        &Request::FsStat {
            path: home.path.clone(),
        },
    );
    match host.exchange(5).2 {
        Response::FsStat(info) => {
            assert_eq!(
                (info.name.as_str(), info.kind),
                ("user", FileKind::Directory)
            )
        }
        other => panic!("{other:?}"),
    }
    host.send(
        7,
        &Request::FsList {
            path: home.path.clone(),
        },
    );
    match host.exchange(7).2 {
        Response::FsList { entries, .. } => {
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["notes.txt"]);
        }
        other => panic!("{other:?}"),
    }

    // Beside the home, above it or out of it through `..`: refused, nothing written.
    let beside = format!("{}-beside", home.path);
    std::fs::create_dir(&beside).unwrap();
    for path in [
        format!("{beside}/f"),
        format!("{}/../f", home.path),
        format!("{}/./f", home.path),
        format!("{}//f", home.path),
    ] {
        let refused = upload(&mut host, 9, &path, b"x", &sha256(b"x"));
        assert_eq!(
            error_code(&refused),
            codes::PATH_REFUSED,
            "{path}: {refused:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&beside).unwrap().count(), 0);
    let parent = Path::new(&home.path).parent().unwrap();
    assert!(!parent.join("f").exists());
    host.power_off();
}
