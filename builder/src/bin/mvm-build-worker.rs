//! The build worker on its own: the program the builder VM's image carries, built static
//! (`mvm builder fetch`). `--in-vm DIR`: the job comes as a tar on stdin and the image goes back
//! as one on stdout ([`mvm_builder::vm_persona::serve_in_vm`]); otherwise it serves as the host
//! persona's worker does ([`mvm_builder::worker::serve`]), which `mvm build` runs as `mvm
//! build-worker`.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--in-vm" => mvm_builder::vm_persona::serve_in_vm(dir),
        _ => mvm_builder::worker::serve(),
    }
}
