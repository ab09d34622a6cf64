//! The serving loop as PID 1 runs it: reaping every child that ends, not only its own
//! commands. Alone in its test binary, so that reaping every child of the process cannot take
//! another test's children.

mod support;

use std::collections::BTreeMap;

use mvm_agent::serve::{Ended, ServeConfig};
use mvm_protocol::{ExecRequest, ExitStatus, FrameKind, Request, Response};
use support::Agent;

/// The frames up to the answer on `stream`: its standard output and the answer.
fn response(agent: &mut Agent, stream: u32) -> (Vec<u8>, Response) {
    let mut stdout = Vec::new();
    loop {
        let frame = agent.frame();
        assert_eq!(frame.stream, stream);
        match frame.kind {
            FrameKind::Stdout => stdout.extend(frame.payload),
            FrameKind::Response => {
                return (stdout, serde_json::from_slice(&frame.payload).unwrap())
            }
            _ => {}
        }
    }
}

#[test]
fn commands_in_their_own_process_groups_are_reaped_by_the_agent() {
    let mut agent = Agent::start(ServeConfig {
        reap_orphans: true,
        ..ServeConfig::on_host()
    });
    for (id, script, code) in [(1, "echo one", 0), (2, "sleep 30 & echo two; exit 3", 3)] {
        let exec = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 10_000,
            stdin: false,
            user: None,
            tty: None,
        };
        agent.send(id, &Request::Exec(exec));
        let (stdout, reply) = response(&mut agent, id);
        let Response::Exec(reply) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(reply.status, ExitStatus::Exited { code }, "{script}");
        assert!(!stdout.is_empty());
    }
    agent.send(9, &Request::PowerOff);
    response(&mut agent, 9);
    assert_eq!(agent.ended().unwrap(), Ended::PowerOff);
}
