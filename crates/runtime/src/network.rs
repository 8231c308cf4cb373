//! Sandbox networking: a network namespace per sandbox with loopback, and a veth pair routed through the
//! host (a /30 per sandbox) with NAT to the outside. nftables rules keep sandboxes from reaching each other
//! and the host's own ports (the server's included).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use crate::RuntimeError;

/// Where named network namespaces are kept (the `ip netns` convention).
const NETNS_DIR: &str = "/run/netns";
/// nftables table holding every rule we add; deleted and recreated as a whole.
const NFT_TABLE: &str = "compute";

/// Sandbox networking settings.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Give sandboxes outbound access (a veth and NAT). Without it a sandbox has only loopback.
    pub enabled: bool,
    /// The /16 sandbox addresses come from (each sandbox gets a /30).
    pub subnet: Ipv4Addr,
    /// Allow sandboxes to reach the host's own addresses (off: the server is unreachable from sandboxes).
    pub allow_host: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self { enabled: true, subnet: Ipv4Addr::new(10, 89, 0, 0), allow_host: false }
    }
}

async fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<(), RuntimeError> {
    let (cmd, args, stdin) =
        (cmd.to_string(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), stdin.map(String::from));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_sync(&cmd, &args, stdin.as_deref())
    })
    .await
    .map_err(|e| RuntimeError::Unsupported(format!("helper task failed: {e}")))?
}

fn run_sync(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<(), RuntimeError> {
    use std::io::Write;
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::io(format!("running {cmd} (is it installed?)"), e))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes()).map_err(|e| RuntimeError::io(format!("feeding {cmd}"), e))?;
    }
    let out = child.wait_with_output().map_err(|e| RuntimeError::io(format!("waiting for {cmd}"), e))?;
    if !out.status.success() {
        return Err(RuntimeError::Command {
            command: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Enables forwarding and installs the host-side rules (idempotent: the table is replaced as a whole).
pub fn prepare_host(cfg: &NetworkConfig) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| RuntimeError::io(format!("creating {NETNS_DIR}"), e))?;
    if !cfg.enabled {
        return Ok(());
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| RuntimeError::io("enabling IPv4 forwarding", e))?;
    let s = cfg.subnet.octets();
    let subnet = format!("{}.{}.0.0/16", s[0], s[1]);
    let host_rule = if cfg.allow_host { "" } else { "iifname \"cs-*\" drop" };
    let rules = format!(
        r#"table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "cs-*" ct state established,related accept
    {host_rule}
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "cs-*" oifname "cs-*" drop
    iifname "cs-*" ip daddr {{ 127.0.0.0/8 }} drop
    iifname "cs-*" accept
    oifname "cs-*" ct state established,related accept
    oifname "cs-*" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {subnet} oifname != "cs-*" masquerade
  }}
}}
"#
    );
    run_sync("nft", &["-f", "-"], Some(&rules))
}

/// Hands out the /30 blocks of the subnet.
pub struct Allocator {
    base: [u8; 2],
    used: Mutex<std::collections::BTreeSet<u16>>,
}

impl Allocator {
    /// An allocator over `cfg.subnet`.
    pub fn new(cfg: &NetworkConfig) -> Self {
        let o = cfg.subnet.octets();
        Self { base: [o[0], o[1]], used: Mutex::new(Default::default()) }
    }

    fn take(&self) -> Result<u16, RuntimeError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // Blocks routed to any sandbox veth on this host, including other Compute servers' (another data
        // directory on the same machine) and leftovers not yet reconciled.
        let routed = self.routed_blocks();
        // Block 0 is left unused so that no sandbox gets the network address.
        let free = (1..16384u16)
            .find(|i| !used.contains(i) && !routed.contains(i))
            .ok_or_else(|| RuntimeError::Unsupported("no free sandbox addresses".into()))?;
        used.insert(free);
        Ok(free)
    }

    fn routed_blocks(&self) -> std::collections::BTreeSet<u16> {
        let table = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let iface = f.next()?;
                let dest = u32::from_str_radix(f.next()?, 16).ok()?;
                if !iface.starts_with("cs-") {
                    return None;
                }
                // /proc/net/route holds addresses in host (little-endian) byte order.
                let o = dest.to_le_bytes();
                (o[0] == self.base[0] && o[1] == self.base[1]).then(|| ((u16::from(o[2]) << 8) | u16::from(o[3])) / 4)
            })
            .collect()
    }

    fn release(&self, block: u16) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(&block);
    }

    fn addrs(&self, block: u16) -> (Ipv4Addr, Ipv4Addr) {
        let n = u32::from(block) * 4;
        let host = Ipv4Addr::new(self.base[0], self.base[1], (n >> 8) as u8, (n & 0xff) as u8 + 1);
        let guest = Ipv4Addr::new(self.base[0], self.base[1], (n >> 8) as u8, (n & 0xff) as u8 + 2);
        (host, guest)
    }
}

/// One sandbox's network, as recorded in its directory (so that it can be torn down after a crash).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SandboxNet {
    /// Named network namespace.
    pub netns: String,
    /// Host-side veth.
    pub host_if: String,
    /// Address block index, if the sandbox has a veth.
    pub block: Option<u16>,
    /// The sandbox's address.
    pub address: Option<Ipv4Addr>,
}

impl SandboxNet {
    /// The namespace file.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// Names for sandbox `id`.
    pub fn names(id: &str) -> (String, String) {
        let short: String = id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .rev()
            .take(11)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        (format!("compute-{id}"), format!("cs-{short}"))
    }

    /// Creates the namespace (loopback up) and, when enabled, the veth pair, addresses and routes.
    pub async fn create(id: &str, cfg: &NetworkConfig, alloc: &Allocator) -> Result<SandboxNet, RuntimeError> {
        let (netns, host_if) = Self::names(id);
        run("ip", &["netns", "add", &netns], None).await?;
        let mut net = SandboxNet { netns, host_if, block: None, address: None };
        let result = async {
            if !cfg.enabled {
                return run("ip", &["-n", &net.netns, "link", "set", "lo", "up"], None).await;
            }
            let block = alloc.take()?;
            net.block = Some(block);
            let (host, guest) = alloc.addrs(block);
            net.address = Some(guest);
            let host_side = format!(
                "link add {hi} type veth peer name eth0 netns {ns}\naddr add {host}/30 dev {hi}\nlink set {hi} up\n",
                hi = net.host_if,
                ns = net.netns
            );
            run("ip", &["-batch", "-"], Some(&host_side)).await?;
            let inside = format!(
                "link set lo up\naddr add {guest}/30 dev eth0\nlink set eth0 up\nroute add default via {host}\n"
            );
            run("ip", &["-n", &net.netns, "-batch", "-"], Some(&inside)).await
        }
        .await;
        if let Err(e) = result {
            let _ = net.destroy(alloc).await;
            return Err(e);
        }
        Ok(net)
    }

    /// Removes the veth (its peer goes with the namespace) and the namespace. Idempotent.
    pub async fn destroy(&self, alloc: &Allocator) -> Result<(), RuntimeError> {
        let _ = run("ip", &["link", "del", &self.host_if], None).await;
        let path = self.netns_path();
        if path.exists() {
            if let Err(e) = run("ip", &["netns", "del", &self.netns], None).await {
                // A namespace still pinned by a mount elsewhere: unmount and remove by hand.
                let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
                if std::fs::remove_file(&path).is_err() && path.exists() {
                    return Err(e);
                }
            }
        }
        if let Some(b) = self.block {
            alloc.release(b);
        }
        Ok(())
    }
}
