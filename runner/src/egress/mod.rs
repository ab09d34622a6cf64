//! Network egress for guests that have no NIC: the connections the guest's proxy opens over
//! the agent channel, judged and carried by the runner.

pub mod relay;
