//! Who a command may run as: a user of the guest's own `/etc/passwd` (on the verified root)
//! or a numeric id, never root — the agent is the guest's one root, the keeper of the root's
//! integrity, and a command that could become it could lie about that.

use std::path::Path;

use super::exec::Credentials;
use mvm_protocol::{codes, ErrorReply};

/// The largest `/etc/passwd` read.
const MAX_PASSWD: u64 = 1 << 20;

/// The credentials `spec` names: `NAME`, `UID`, `NAME:GID` or `UID:GID`. A name is looked up
/// in `passwd`, which gives its uid and primary group; a bare number's group is its own.
pub fn resolve(spec: &str, passwd: &Path) -> Result<Credentials, ErrorReply> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => lookup(user, passwd)?,
    };
    let gid = match group {
        Some(group) => group
            .parse::<u32>()
            .map_err(|_| refused(format!("{group:?} is not a numeric group id")))?,
        None => primary_gid,
    };
    if uid == 0 || gid == 0 {
        return Err(refused(format!(
            "{spec:?} is root: commands never run as root in the guest"
        )));
    }
    Ok(Credentials { uid, gid })
}

/// The uid and primary gid of `name` in the passwd file at `passwd`.
fn lookup(name: &str, passwd: &Path) -> Result<(u32, u32), ErrorReply> {
    if name.is_empty() {
        return Err(refused("an empty user name".into()));
    }
    let text = read(passwd)
        .map_err(|e| refused(format!("no user {name:?}: {}: {e}", passwd.display())))?;
    let found = entries(&text)
        .find(|entry| entry.name == name)
        .map(|entry| (entry.uid, entry.gid));
    found.ok_or_else(|| refused(format!("no user {name:?} in {}", passwd.display())))
}

/// The home directory `passwd` gives the user `uid` (its first entry), as written there.
pub fn home_of(uid: u32, passwd: &Path) -> Option<String> {
    let text = read(passwd).ok()?;
    let home = entries(&text).find(|entry| entry.uid == uid)?.home?;
    Some(home.to_string())
}

/// One well-formed line of a passwd file.
struct Entry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: Option<&'a str>,
}

/// The well-formed entries of a passwd file's text (others are skipped).
fn entries(text: &str) -> impl Iterator<Item = Entry<'_>> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let [name, _, uid, gid, ref rest @ ..] = fields[..] else {
            return None;
        };
        Some(Entry {
            name,
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
            home: rest.get(1).copied(),
        })
    })
}

/// At most [`MAX_PASSWD`] bytes of the passwd file.
fn read(passwd: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(passwd)?, MAX_PASSWD),
        &mut text,
    )?;
    Ok(text)
}

fn refused(message: String) -> ErrorReply {
    ErrorReply {
        code: codes::USER.into(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwd() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"root:x:0:0:root:/root:/bin/sh\n\
              garbage line\n\
              app:x:1000:1000::/home/app:/bin/sh\n\
              nobody:x:65534:65534:nobody:/:/bin/false\n\
              toor:x:0:0::/:/bin/sh\n\
              broken:x:notanumber:1:::\n",
        )
        .unwrap();
        file
    }

    #[test]
    fn names_and_numbers_resolve_and_root_never_does() {
        let file = passwd();
        let resolve = |spec: &str| resolve(spec, file.path());
        let ids = |uid, gid| Ok(Credentials { uid, gid });
        assert_eq!(resolve("nobody"), ids(65534, 65534));
        assert_eq!(resolve("app:27"), ids(1000, 27));
        assert_eq!(resolve("1234"), ids(1234, 1234));
        assert_eq!(resolve("1234:5"), ids(1234, 5));
        for refused in [
            "root",
            "toor",
            "0",
            "0:5",
            "1234:0",
            "app:0",
            "ghost",
            "broken",
            "",
            ":5",
            "app:wheel",
            "app:x:y",
        ] {
            let error = resolve(refused).unwrap_err();
            assert_eq!(error.code, codes::USER, "{refused:?}");
        }
        let missing = super::resolve("app", Path::new("/nonexistent/passwd")).unwrap_err();
        assert_eq!(missing.code, codes::USER);
    }

    #[test]
    fn a_home_is_the_first_entry_of_its_uid() {
        let file = passwd();
        assert_eq!(home_of(1000, file.path()).as_deref(), Some("/home/app"));
        assert_eq!(home_of(0, file.path()).as_deref(), Some("/root"));
        assert_eq!(home_of(4242, file.path()), None);
        assert_eq!(home_of(1000, Path::new("/nonexistent/passwd")), None);
    }
}
