//! QEMU's command line, built only from the admitted plan and the VM's private files.
//!
//! Nothing comes from a configuration file or a default device: `-nodefaults
//! -no-user-config` and no NIC, no display, no monitor. The guest sees exactly the guest
//! contract: a microvm with ACPI (virtio-mmio devices described as `LNRO0005`), the serial
//! console on QEMU's standard output, the root image and its hash tree as read-only
//! virtio-blk disks (vda, vdb, in that order), and one virtio-console port named `mvm.agent`
//! whose host side is a unix socket the runner listens on. QEMU's own seccomp filter
//! (`-sandbox on`) denies it obsolete calls, privilege changes, spawning and resource control.

use std::ffi::OsString;
use std::path::Path;

use mvm_ir::plan::LaunchPlan;

use crate::disk::LaunchDisk;
use mvm_protocol::PORT_NAME;

use crate::backend::select::Accel;

/// The files a VM boots from, all in its private state directory except the two disks,
/// which dm-verity checks in the guest against the signed root hash.
#[derive(Debug, Clone, Copy)]
pub struct VmFiles<'a> {
    /// The private copy of the kernel that was hashed.
    pub kernel: &'a Path,
    /// The private copy of the initramfs that was hashed.
    pub initramfs: &'a Path,
    /// The EROFS image (vda).
    pub rootfs: &'a Path,
    /// Its hash tree (vdb).
    pub verity: &'a Path,
    /// The unix socket the runner listens on for the agent channel.
    pub agent_socket: &'a Path,
    /// Where QEMU serves QMP for the runner (pause and resume).
    pub qmp_socket: &'a Path,
    /// The launch's own disks (vdc on), writable unless read-only, each with its serial.
    pub disks: &'a [LaunchDisk],
}

/// QEMU's arguments (without the program) for `plan`.
pub fn arguments(plan: &LaunchPlan, files: &VmFiles<'_>, accel: Accel) -> Vec<OsString> {
    let mut args = machine_arguments(plan, accel);
    args.extend([
        "-kernel".into(),
        files.kernel.into(),
        "-initrd".into(),
        files.initramfs.into(),
        "-append".into(),
        kernel_command_line(plan, accel).into(),
    ]);
    for (id, file) in [("root", files.rootfs), ("verity", files.verity)] {
        args.extend([
            "-drive".into(),
            option_value(
                &format!("id={id},format=raw,if=none,readonly=on,file="),
                file,
            ),
            "-device".into(),
            format!("virtio-blk-device,drive={id}").into(),
        ]);
    }
    for (index, disk) in files.disks.iter().enumerate() {
        let access = match disk.device_writable() {
            false => "readonly=on",
            true => "readonly=off",
        };
        args.extend([
            "-drive".into(),
            option_value(
                &format!("id=disk{index},format=raw,if=none,{access},file="),
                &disk.file,
            ),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=disk{index},serial={}",
                LaunchDisk::serial(index)
            )
            .into(),
        ]);
    }
    args.extend([
        "-device".into(),
        // Port 0 is reserved for a console; the agent port is 1.
        "virtio-serial-device,max_ports=2".into(),
        "-chardev".into(),
        option_value("socket,id=agent,path=", files.agent_socket),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={PORT_NAME}").into(),
        // QMP for the runner alone: QEMU listens, the runner connects once the guest is up.
        "-chardev".into(),
        {
            let mut spec = option_value("socket,id=qmp,path=", files.qmp_socket);
            spec.push(",server=on,wait=off");
            spec
        },
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ]);
    args
}

/// The id of guest RAM's memory backend when mvm names one: a boot snapshot's guest, and
/// every VM restored from it, has its RAM in a file ([`ram_file_arguments`]).
const RAM_BACKEND: &str = "mvm.ram";

/// Guest RAM of `mib` MiB in the file at `path`: written through when `shared` (the guest
/// booted to make a boot snapshot fills the file with its RAM), mapped privately otherwise
/// (a restored guest reads the snapshot's pages from the file, shared with every other guest
/// restored from it, and gets its own copy of a page it writes).
pub fn ram_file_arguments(path: &Path, mib: u64, shared: bool) -> Vec<OsString> {
    let share = match shared {
        true => "on",
        false => "off",
    };
    let backend = option_value(
        &format!("memory-backend-file,id={RAM_BACKEND},size={mib}M,share={share},mem-path="),
        path,
    );
    vec![
        "-object".into(),
        backend,
        "-machine".into(),
        format!("memory-backend={RAM_BACKEND}").into(),
    ]
}

/// Guest RAM of `mib` MiB, anonymous, under the name [`ram_file_arguments`] gives it: a VM
/// restored from a boot snapshot and saved cold wakes into RAM of that name.
pub fn named_ram_arguments(mib: u64) -> Vec<OsString> {
    vec![
        "-object".into(),
        format!("memory-backend-ram,id={RAM_BACKEND},size={mib}M").into(),
        "-machine".into(),
        format!("memory-backend={RAM_BACKEND}").into(),
    ]
}

/// The kernel's command line: the plan's, and under TCG the host's TSC rate. Under TCG the
/// kernel's early TSC calibration against the PIT fails about one boot in two, and the boot
/// then stalls; the guest's TSC is the host's (QEMU reads it for the guest's RDTSC), so its
/// rate is given. A machine setting, not the workload's: it changes timing only, no kernel
/// behaviour the plan pins (its verity parameters and init stay as they are).
pub fn kernel_command_line(plan: &LaunchPlan, accel: Accel) -> String {
    match accel {
        Accel::Tcg => format!("{} tsc_early_khz={}", plan.kernel.cmdline, host_tsc_khz()),
        Accel::Kvm => plan.kernel.cmdline.clone(),
    }
}

/// The machine without its boot files and devices: microvm with ACPI, the accelerator, CPUs
/// and memory from the plan, nothing by default, QEMU's seccomp sandbox, the serial console
/// on standard output. `mvm bench boot` boots its floor on exactly this machine.
pub fn machine_arguments(plan: &LaunchPlan, accel: Accel) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-M", "microvm,acpi=on"]);
    match accel {
        // A thread per vCPU, apart from QEMU's I/O thread, and the guest's clock the host's.
        // Not `-icount`: it serialises vCPUs, and its adaptive shift slows a guest that has
        // been idle a minute to about a second per command (`mvm bench exec`).
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "qemu64"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    let (cpus, memory) = (
        plan.resources.cpu_cores.to_string(),
        format!("{}M", plan.resources.memory_mb),
    );
    push(&["-smp", &cpus, "-m", &memory]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-chardev",
        "stdio,id=serial,signal=off",
        "-serial",
        "chardev:serial",
    ]);
    args
}

/// The host's TSC rate in kHz, measured once: TSC ticks across 50 ms of the monotonic clock.
fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let (ticks, started) = (read_tsc(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (ticks, elapsed) = (read_tsc().wrapping_sub(ticks), started.elapsed());
        (ticks as u128 * 1_000_000 / elapsed.as_nanos().max(1)) as u64
    })
}

/// The time stamp counter.
#[allow(unsafe_code)]
fn read_tsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it touches no memory and has no precondition.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// `prefix` followed by `path` as one QEMU option value: a comma in a path would start a new
/// option, so QEMU's escape (a doubled comma) is applied.
fn option_value(prefix: &str, path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = prefix.as_bytes().to_vec();
    for &byte in path.as_os_str().as_bytes() {
        bytes.push(byte);
        if byte == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        let mut json: serde_json::Value =
            serde_json::from_str(include_str!("../../../../examples/plan/plan.json")).unwrap();
        // The example leaves the nonce to `mvm plan sign`.
        json["nonce"] = "00".repeat(16).into();
        json["single_use"] = false.into();
        serde_json::from_value(json).unwrap()
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn files<'a>(socket: &'a Path) -> VmFiles<'a> {
        VmFiles {
            kernel: Path::new("/vm/kernel"),
            initramfs: Path::new("/vm/initramfs"),
            rootfs: Path::new("/bundle,odd/rootfs.erofs"),
            verity: Path::new("/bundle,odd/rootfs.verity"),
            agent_socket: socket,
            qmp_socket: Path::new("/vm,x/qmp.sock"),
            disks: &[],
        }
    }

    #[test]
    fn the_machine_has_only_the_contract_devices() {
        let args = strings(&arguments(
            &plan(),
            &files(Path::new("/vm/agent.sock")),
            Accel::Tcg,
        ));
        let joined = args.join(" ");
        for required in [
            "-M microvm,acpi=on",
            "-accel tcg,thread=multi -cpu qemu64",
            "-nodefaults",
            "-no-user-config",
            "-display none",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-serial chardev:serial",
            "virtserialport,chardev=agent,name=mvm.agent",
            // The one monitor: QMP on the VM's private socket, for the runner.
            "-chardev socket,id=qmp,path=/vm,,x/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control",
        ] {
            assert!(
                joined.contains(required),
                "{required} missing from {joined}"
            );
        }
        for forbidden in [
            "-netdev",
            "-nic",
            "-net ",
            "-monitor",
            "-vnc",
            "-qmp",
            "-enable-kvm",
        ] {
            assert!(!joined.contains(forbidden), "{forbidden} in {joined}");
        }
        let drives: Vec<&String> = args.iter().filter(|a| a.contains("if=none")).collect();
        assert_eq!(drives.len(), 2);
        assert!(drives[0].starts_with("id=root,") && drives[1].starts_with("id=verity,"));
        assert!(drives.iter().all(|d| d.contains("readonly=on")));
        assert!(
            drives[0].ends_with("file=/bundle,,odd/rootfs.erofs"),
            "{}",
            drives[0]
        );
        assert!(!joined.contains("icount"), "{joined}");
        assert!(!joined.contains("serial="), "{joined}");
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert!(args[append + 1].starts_with(&format!("{} tsc_early_khz=", plan().kernel.cmdline)));
    }

    #[test]
    fn resources_come_from_the_plan_and_kvm_uses_the_host_cpu() {
        let mut plan = plan();
        plan.resources.cpu_cores = 3;
        plan.resources.memory_mb = 768;
        let args = strings(&arguments(
            &plan,
            &files(Path::new("/vm/a,b.sock")),
            Accel::Kvm,
        ));
        let joined = args.join(" ");
        assert!(joined.contains("-smp 3 -m 768M"), "{joined}");
        assert!(joined.contains("-accel kvm -cpu host"));
        assert!(!joined.contains("icount"));
        assert!(joined.contains("socket,id=agent,path=/vm/a,,b.sock"));
        assert!(!joined.contains("tsc_early_khz"), "{joined}");
    }

    #[test]
    fn tcg_runs_a_thread_per_vcpu_and_tells_the_guest_the_tsc_rate() {
        let mut plan = plan();
        plan.resources.cpu_cores = 2;
        let args = strings(&arguments(
            &plan,
            &files(Path::new("/vm/a.sock")),
            Accel::Tcg,
        ));
        let joined = args.join(" ");
        assert!(
            joined.contains("-accel tcg,thread=multi -cpu qemu64"),
            "{joined}"
        );
        assert!(!joined.contains("icount"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        let khz: u64 = append
            .strip_prefix(&format!("{} tsc_early_khz=", plan.kernel.cmdline))
            .unwrap()
            .parse()
            .unwrap();
        // A real TSC runs between 0.5 and 10 GHz.
        assert!((500_000..10_000_000).contains(&khz), "{khz} kHz");
    }

    /// A launch's disks follow the contract's two, writable unless `:ro`, each with the serial
    /// the agent finds it by.
    #[test]
    fn a_launch_disk_is_a_writable_drive_with_its_serial() {
        let disks = [
            LaunchDisk::parse("/state,x/store.img:/nix").unwrap(),
            LaunchDisk::parse("/data.img:/data:ro").unwrap(),
        ];
        let socket = Path::new("/vm/agent.sock");
        let files = VmFiles {
            disks: &disks,
            ..files(socket)
        };
        let args = strings(&arguments(&plan(), &files, Accel::Tcg));
        let drives: Vec<&String> = args.iter().filter(|a| a.contains("if=none")).collect();
        assert_eq!(drives.len(), 4);
        assert_eq!(
            drives[2],
            "id=disk0,format=raw,if=none,readonly=off,file=/state,,x/store.img"
        );
        assert_eq!(
            drives[3],
            "id=disk1,format=raw,if=none,readonly=on,file=/data.img"
        );
        let joined = args.join(" ");
        assert!(joined.contains("virtio-blk-device,drive=disk0,serial=mvm-disk0"));
        assert!(joined.contains("virtio-blk-device,drive=disk1,serial=mvm-disk1"));
    }
}
