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
    let text = std::fs::File::open(passwd)
        .and_then(|file| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_PASSWD), &mut text)?;
            Ok(text)
        })
        .map_err(|e| refused(format!("no user {name:?}: {}: {e}", passwd.display())))?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let (user, _, uid, gid) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            (user == name).then(|| Some((uid.parse().ok()?, gid.parse().ok()?)))?
        })
        .next()
        .ok_or_else(|| refused(format!("no user {name:?} in {}", passwd.display())))
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
}
