//! The agent tool contract's request (`mvm tool run`'s stdin, the MCP tool's arguments): any
//! bytes are parsed and, when they are a request, checked against a host's limits, with no
//! panic. A request that passes names only files under `/tmp` with no `.`, `..` or empty part,
//! runs a bounded command, reaches only `HOST:PORT`s it named, within the host's ceiling, on
//! an image the host allows.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mvm_mcp::contract::{ToolRequest, MAX_FILES, MAX_FILES_BYTES};
use mvm_mcp::params::{MAX_ARGS, MAX_ARGV_BYTES, MAX_HOSTS, MAX_PATH_BYTES};
use mvm_mcp::Limits;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<ToolRequest>(data) else {
        return;
    };
    let limits = Limits {
        allowed_images: vec![format!("oci:allowed@sha256:{}", "a".repeat(64))],
        default_image: Some(format!("oci:default@sha256:{}", "b".repeat(64))),
        max_file_bytes: 4096,
        ..Limits::default()
    };
    let Ok(checked) = request.check(&limits) else {
        return;
    };
    assert!(checked.files.len() <= MAX_FILES);
    let total: usize = checked.files.iter().map(|(_, f)| f.content.len()).sum();
    assert!(total <= MAX_FILES_BYTES);
    for (path, file) in &checked.files {
        assert!(file.content.len() <= limits.max_file_bytes);
        assert!(path.len() <= MAX_PATH_BYTES && !path.contains('\0'));
        let parts: Vec<&str> = path.split('/').collect();
        assert_eq!(parts[..2], ["", "tmp"], "{path}");
        assert!(parts.len() > 2, "{path}");
        assert!(parts[1..].iter().all(|p| !p.is_empty() && *p != "." && *p != ".."), "{path}");
    }
    assert!(!checked.argv.is_empty() && checked.argv.len() <= MAX_ARGS);
    assert!(checked.argv.iter().map(String::len).sum::<usize>() <= MAX_ARGV_BYTES);
    assert!(checked.allow_hosts.len() <= MAX_HOSTS);
    for grant in &checked.allow_hosts {
        let (host, port) = grant.rsplit_once(':').expect("HOST:PORT");
        assert!(!host.is_empty() && !host.contains(':'), "{grant}");
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{grant}");
    }
    assert!(checked.timeout >= Duration::from_secs(1) && checked.timeout <= limits.max_timeout);
    assert!(limits.allows(&checked.image));
});
