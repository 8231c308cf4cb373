//! Reducing what the sandbox's processes may do: a capability bounding set like container engines' default,
//! no-new-privs, and a seccomp deny-list of system calls that reach outside a container.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Capabilities kept (the container engines' default set, without NET_RAW).
const KEEP: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// System calls refused with EPERM: kernel modules, mounts, namespaces, clocks, keyrings, BPF, reboot and
/// the like. (The capability set already forbids most; the filter closes what a capability does not cover.)
const DENY: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_lookup_dcookie,
    libc::SYS_userfaultfd,
    libc::SYS_vhangup,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS_personality,
];

/// Namespace flags `clone` may not use (a process may not leave or multiply the sandbox's namespaces).
const NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Applies everything to this process (and so to every process it starts).
pub fn apply() -> std::io::Result<()> {
    drop_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    install_filters()
}

fn drop_capabilities() -> std::io::Result<()> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if !KEEP.contains(&cap) {
            // SAFETY: prctl with integer arguments only; EINVAL for caps the kernel lacks is harmless.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    // Narrow this process's own sets to the same capabilities.
    let mask: u64 = KEEP.iter().fold(0u64, |m, c| m | (1u64 << c));
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
    let lo = Data { effective: mask as u32, permitted: mask as u32, inheritable: 0 };
    let hi = Data { effective: (mask >> 32) as u32, permitted: (mask >> 32) as u32, inheritable: 0 };
    let data = [lo, hi];
    // SAFETY: capset reads one header and two data structs with the layout the kernel defines for version 3.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn install_filters() -> std::io::Result<()> {
    let err = |e: &dyn std::fmt::Display| std::io::Error::other(format!("seccomp: {e}"));
    // clone3 cannot be filtered by its flags (they are behind a pointer): answer ENOSYS so that libc falls back
    // to clone, whose flags we can check. A separate filter, because its errno differs.
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let clone3 =
        SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)
            .map_err(|e| err(&e))?;

    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENY.iter().map(|&s| (s, vec![])).collect();
    let clone_rules = NS_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(|e| err(&e))?])
            .map_err(|e| err(&e))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    deny.insert(libc::SYS_clone, clone_rules);
    let deny =
        SeccompFilter::new(deny, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), TargetArch::x86_64)
            .map_err(|e| err(&e))?;

    for filter in [clone3, deny] {
        let prog: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
        seccompiler::apply_filter(&prog).map_err(|e| err(&e))?;
    }
    Ok(())
}
