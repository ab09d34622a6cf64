//! The build worker on its own ([`mvm_builder::worker::serve`]): the program the builder VM's
//! image carries, built static (`mvm builder fetch`). On the host, `mvm build` runs the same
//! worker as `mvm build-worker`.

fn main() -> std::process::ExitCode {
    mvm_builder::worker::serve()
}
