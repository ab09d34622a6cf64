//! The mvm guest agent (PID 1 in the guest) and the host↔guest wire protocol.
//!
//! Empty for now: the agent and its protocol arrive with the runner issue.
