//! Inline extended attributes: the body that follows an inode.
//!
//! The body is a 12-byte header (no shared xattrs are referenced) followed by one entry per
//! attribute: name length, name index, value length, the name with its namespace prefix
//! replaced by the index, the value, zero padding to 4 bytes. The inode's `i_xattr_icount`
//! counts the body in 4-byte units, the header as one. Attributes are written in the tree's
//! order (full name, byte order), so the body is a function of the attribute map alone.

use std::collections::BTreeMap;

use super::format::{FieldWriter, XATTR_BODY_HEADER_SIZE, XATTR_ENTRY_HEADER_SIZE};

/// The namespaces EROFS encodes, as (index, prefix, whether the prefix is the whole name).
/// Linux has no other namespaces a root filesystem can carry.
const NAMESPACES: [(u8, &[u8], bool); 5] = [
    (1, b"user.", false),
    (2, b"system.posix_acl_access", true),
    (3, b"system.posix_acl_default", true),
    (4, b"trusted.", false),
    (6, b"security.", false),
];

/// Linux's limit on an attribute's full name.
const MAX_XATTR_NAME_LEN: usize = 255;

/// Why an attribute cannot be stored.
pub(super) type XattrProblem = &'static str;

/// An encoded inline xattr body and its `i_xattr_icount`.
#[derive(Debug, Default)]
pub(super) struct XattrBody {
    pub bytes: Vec<u8>,
    pub icount: u16,
}

/// Encodes `xattrs`; an empty map gives an empty body (icount 0). On failure returns the
/// offending name and the reason.
pub(super) fn encode(
    xattrs: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<XattrBody, (Vec<u8>, XattrProblem)> {
    if xattrs.is_empty() {
        return Ok(XattrBody::default());
    }
    let mut bytes = vec![0u8; XATTR_BODY_HEADER_SIZE];
    for (name, value) in xattrs {
        let fail = |problem| (name.clone(), problem);
        let (index, suffix) = split_namespace(name).map_err(fail)?;
        let value_len =
            u16::try_from(value.len()).map_err(|_| fail("value longer than 65535 bytes"))?;
        let mut header = [0u8; XATTR_ENTRY_HEADER_SIZE];
        let mut fields = FieldWriter::new(&mut header);
        // The whole name is at most 255 bytes, so its suffix fits in a byte.
        fields.u8(suffix.len() as u8);
        fields.u8(index);
        fields.u16(value_len);
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(suffix);
        bytes.extend_from_slice(value);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
    }
    let units = (bytes.len() - XATTR_BODY_HEADER_SIZE) / 4 + 1;
    let icount = u16::try_from(units).map_err(|_| {
        let last = xattrs.keys().next_back().cloned().unwrap_or_default();
        (last, "the inode's attributes exceed 256 KiB in total")
    })?;
    Ok(XattrBody { bytes, icount })
}

/// The namespace index of `name` and the rest of the name after the prefix.
fn split_namespace(name: &[u8]) -> Result<(u8, &[u8]), XattrProblem> {
    if name.len() > MAX_XATTR_NAME_LEN {
        return Err("name longer than 255 bytes");
    }
    if name.contains(&0) {
        return Err("name contains NUL");
    }
    for (index, prefix, whole) in NAMESPACES {
        if let Some(suffix) = name.strip_prefix(prefix) {
            return match (whole, suffix.is_empty()) {
                (true, true) | (false, false) => Ok((index, suffix)),
                (true, false) => continue,
                (false, true) => Err("name is only a namespace prefix"),
            };
        }
    }
    Err("namespace is not user., trusted., security. or system.posix_acl_*")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &[u8], value: &[u8]) -> Result<XattrBody, (Vec<u8>, XattrProblem)> {
        encode(&BTreeMap::from([(name.to_vec(), value.to_vec())]))
    }

    #[test]
    fn entries_use_the_namespace_index_and_pad_to_four_bytes() {
        let body = one(b"user.ab", b"xyz").unwrap();
        let mut expected = vec![0u8; 12];
        expected.extend_from_slice(&[2, 1, 3, 0]);
        expected.extend_from_slice(b"abxyz\0\0\0");
        assert_eq!(body.bytes, expected);
        assert_eq!(body.icount, 1 + 3);
        let acl = one(b"system.posix_acl_access", b"\x02\0\0\0").unwrap();
        assert_eq!(&acl.bytes[12..16], &[0, 2, 4, 0]);
    }

    #[test]
    fn names_erofs_cannot_store_are_refused() {
        for name in [
            &b"user."[..],
            b"os2.x",
            b"system.nfs4_acl",
            b"system.posix_acl_accessx",
            b"user.a\0b",
        ] {
            assert!(one(name, b"").is_err(), "{}", String::from_utf8_lossy(name));
        }
        let mut long = b"user.".to_vec();
        long.resize(256, b'x');
        assert!(one(&long, b"").is_err());
        assert!(one(b"user.big", &vec![0; 65536]).is_err());
        assert!(encode(&BTreeMap::new()).unwrap().bytes.is_empty());
    }
}
