//! Test hosts: a worker "on another machine" is a process in a Linux network
//! namespace of the test's own, joined to this machine by a veth pair. The
//! services (which listen on loopback only) are exposed to it through relays
//! bound on the host side's address, so the link between the two can be cut
//! (`ip link set … down`) and healed as a network fault would, while the
//! shared services stay up for the other tests. Only these namespaces and
//! loopback are addressed: the /30 subnets come from 198.18.0.0/15 (RFC 2544,
//! never routed). A host is removed when dropped, panics included;
//! `scripts/test` removes those of killed runs (`archt-<pid>-<n>`, pid gone).

use super::bin::Bin;
use super::relay::Relay;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Hosts made by this process so far (their number in names and subnets).
static MADE: AtomicU32 = AtomicU32::new(0);

/// A network namespace with one veth link to this machine.
pub struct Host {
    name: String,
    link: String,
    /// This machine's address on the link.
    here: Ipv4Addr,
    relays: Vec<Relay>,
}

/// Runs `ip` with `args`; whether it succeeded, and what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Host {
    /// A new host, or why one cannot be made here (no `ip`, not root): the
    /// caller skips with that message.
    pub fn new() -> Result<Host, String> {
        let pid = std::process::id();
        let n = MADE.fetch_add(1, Ordering::SeqCst);
        if n >= 4 {
            return Err("at most 4 hosts per test process".into());
        }
        // One /30 per (pid, n): 2^15 of them in 198.18.0.0/15.
        let index = (pid % 8192) * 4 + n;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + index * 4;
        let (here, there) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let name = format!("archt-{pid}-{n}");
        let link = format!("avh{:x}", pid * 4 + n);
        let peer = format!("avp{:x}", pid * 4 + n);
        let host = Host {
            name: name.clone(),
            link: link.clone(),
            here,
            relays: Vec::new(),
        };
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", &peer, "netns", &name,
        ])?;
        ip(&["addr", "add", &format!("{here}/30"), "dev", &link])?;
        ip(&["link", "set", &link, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{there}/30"), "dev", &peer])?;
        inside(&["link", "set", &peer, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// `target` (a loopback `host:port`) as the host sees it: a relay on
    /// this machine's side of the link. Returns `address:port`.
    pub async fn expose(&mut self, target: &str) -> String {
        let relay = Relay::on(self.here, target).await;
        let at = format!("{}:{}", self.here, relay.port());
        self.relays.push(relay);
        at
    }

    /// `url` (a `postgres://` or `amqp://` URL to a loopback server) as the
    /// host reaches it, through a relay of [`Host::expose`].
    pub async fn url(&mut self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        let target = format!(
            "{}:{}",
            u.host_str().unwrap(),
            u.port_or_known_default().unwrap()
        );
        let at = self.expose(&target).await;
        let (h, p) = at.split_once(':').unwrap();
        u.set_host(Some(h)).unwrap();
        u.set_port(Some(p.parse().unwrap())).unwrap();
        u.to_string()
    }

    /// The worker binary on this host, against `database_url` (as
    /// [`Host::url`] gives it).
    pub fn worker(&self, database_url: &str) -> Bin {
        Bin::new("ip", database_url).args([
            "netns",
            "exec",
            &self.name,
            env!("CARGO_BIN_EXE_worker"),
        ])
    }

    /// Cuts the link: nothing passes either way until [`Host::heal`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]).unwrap();
    }

    /// Brings the link back.
    pub fn heal(&self) {
        ip(&["link", "set", &self.link, "up"]).unwrap();
    }

    /// Cuts this host off from one service only (`url` as [`Host::url`]
    /// gave it), silently, as a partition does: its packets to the service
    /// are dropped, nothing is refused or reset, while the rest of the link
    /// works. Undone by [`Host::unblock`].
    pub fn block(&self, url: &str) {
        self.filter("-I", url).unwrap();
    }

    /// Lets this host reach the service `url` again.
    pub fn unblock(&self, url: &str) {
        self.filter("-D", url).unwrap();
    }

    /// Adds (`-I`) or deletes (`-D`) the rule dropping this host's packets
    /// to `url`'s relay.
    fn filter(&self, op: &str, url: &str) -> Result<(), String> {
        let u = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        let port = u.port_or_known_default().unwrap().to_string();
        let here = self.here.to_string();
        let args = [
            "netns", "exec", &self.name, "iptables", op, "OUTPUT", "-p", "tcp", "-d", &here,
            "--dport", &port, "-j", "DROP",
        ];
        ip(&args)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
