//! `cloudlet-wan`: bring an emulated WAN link up and down from a shell.
//!
//! ```text
//! cloudlet-wan up --rate 25 --delay-ms 25 --prefix demo   # stays in the foreground
//! ip netns exec "$(cloudlet-wan ns --prefix demo a)" iperf3 -c 10.251.0.2
//! cloudlet-wan down --prefix demo                          # or Ctrl-C the `up`
//! cloudlet-wan cleanup                                     # links of dead processes
//! ```
//!
//! A hub with several links (a device and the cloudlets around it; each
//! leaf reaches the hub and the other leaves through its own link), whose
//! delays a script changes as the device walks:
//!
//! ```text
//! cloudlet-wan up --rate 200 --delay-ms 2,30 --prefix walk &   # WAN_NS_B1, WAN_ADDR_B1, ...
//! cloudlet-wan set --prefix walk --link 0 --delay-ms 30
//! ```

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cloudlet_wan::{cleanup_stale, control, list_ours, Side, Wan, WanConfig};

#[derive(Parser)]
#[command(
    name = "cloudlet-wan",
    about = "Emulated WAN link between two network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a link and keep it running until Ctrl-C, SIGTERM or `down`.
    ///
    /// Prints shell variables on stdout (WAN_NS_A, WAN_NS_B, WAN_ADDR_A, WAN_ADDR_B)
    /// once the link is ready.
    Up {
        /// Rate in Mbit/s, each direction.
        #[arg(long)]
        rate: f64,
        /// One-way delay in milliseconds (RTT is twice this); several,
        /// comma-separated: a hub with one link per delay (link k: its
        /// leaf at 10.251.k.2, the hub at 10.251.k.1).
        #[arg(long, value_delimiter = ',', required = true)]
        delay_ms: Vec<f64>,
        /// Name prefix of the namespaces ([a-z0-9_]).
        #[arg(long, default_value = "cli")]
        prefix: String,
        /// Random loss probability per packet (0.0..1.0).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// MTU of the link.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
    },
    /// Stop the `up` process(es) of a prefix and remove their namespaces (no-op if none).
    Down {
        #[arg(long)]
        prefix: String,
    },
    /// Change a link of a running `up` (its delay, rate, or cut it).
    Set {
        #[arg(long)]
        prefix: String,
        /// The link's number in the hub (0: the first).
        #[arg(long, default_value_t = 0)]
        link: u8,
        #[arg(long)]
        delay_ms: Option<f64>,
        #[arg(long)]
        rate: Option<f64>,
        /// Cut the link (every packet dropped) ...
        #[arg(long)]
        cut: bool,
        /// ... or bring it back.
        #[arg(long, conflicts_with = "cut")]
        restore: bool,
    },
    /// Print the namespace name of a running link's side (a or b).
    Ns {
        #[arg(long)]
        prefix: String,
        side: String,
    },
    /// List the namespaces of all links, with their owner process.
    List,
    /// Remove namespaces whose owning process is gone.
    Cleanup,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Up {
            rate,
            delay_ms,
            prefix,
            loss,
            mtu,
        } => up(rate, delay_ms, prefix, loss, mtu),
        Cmd::Down { prefix } => down(&prefix),
        Cmd::Set {
            prefix,
            link,
            delay_ms,
            rate,
            cut,
            restore,
        } => {
            let mut requests = Vec::new();
            if let Some(ms) = delay_ms {
                requests.push(format!("delay {link} {ms}"));
            }
            if let Some(r) = rate {
                requests.push(format!("rate {link} {r}"));
            }
            if cut {
                requests.push(format!("cut {link}"));
            }
            if restore {
                requests.push(format!("restore {link}"));
            }
            if requests.is_empty() {
                bail!("nothing to set: give --delay-ms, --rate, --cut or --restore");
            }
            let path = control::socket_path(&prefix);
            for r in requests {
                control::send(&path, &r)
                    .with_context(|| {
                        format!("No running `up` with prefix {prefix} ({})", path.display())
                    })?
                    .map_err(|why| anyhow::anyhow!("{r}: {why}"))?;
            }
            Ok(())
        }
        Cmd::Ns { prefix, side } => {
            let side = match side.as_str() {
                "a" | "A" => 'a',
                "b" | "B" => 'b',
                other => bail!("Side must be a or b, not {other:?}"),
            };
            let ns = list_ours()
                .into_iter()
                .find(|n| n.prefix == prefix && n.side == side && n.owner_alive())
                .with_context(|| format!("No running link with prefix {prefix}"))?;
            println!("{}", ns.render());
            Ok(())
        }
        Cmd::List => {
            for ns in list_ours() {
                let state = if ns.owner_alive() { "running" } else { "stale" };
                println!("{}\tpid {}\t{state}", ns.render(), ns.pid);
            }
            Ok(())
        }
        Cmd::Cleanup => {
            for name in cleanup_stale().context("Cleanup failed")? {
                println!("removed {name}");
            }
            Ok(())
        }
    }
}

fn up(rate: f64, delays_ms: Vec<f64>, prefix: String, loss: f64, mtu: u32) -> anyhow::Result<()> {
    if delays_ms.iter().any(|d| !(d.is_finite() && *d >= 0.0)) {
        bail!("Delay must be a non-negative number of milliseconds");
    }
    if list_ours()
        .iter()
        .any(|n| n.prefix == prefix && n.owner_alive())
    {
        bail!("A link with prefix {prefix} is already running (see `cloudlet-wan list`)");
    }
    // Block the stop signals before any thread exists, so every thread inherits the
    // mask and sigwait below is the only place they are delivered.
    let signals = stop_signals();
    // SAFETY: signals is an initialised sigset_t.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    let config = |ms: f64| WanConfig {
        loss,
        mtu,
        ..WanConfig::new(&prefix, rate, Duration::from_secs_f64(ms / 1000.0))
    };
    let mut links = vec![Wan::create(config(delays_ms[0])).context("Cannot create the link")?];
    for ms in &delays_ms[1..] {
        links.push(Wan::attach(&links[0], config(*ms)).context("Cannot attach a link")?);
    }
    if links.len() > 1 {
        for l in &links {
            l.route_via_hub()
                .context("Cannot route a leaf through the hub")?;
        }
    }
    let links: control::Links = std::sync::Arc::new(std::sync::RwLock::new(links));
    let socket = control::socket_path(&prefix);
    control::serve(&socket, links.clone()).context("Cannot serve the control socket")?;
    let all = links.read().unwrap_or_else(|p| p.into_inner());
    let wan = &all[0];
    let mut out = std::io::stdout().lock();
    writeln!(out, "WAN_NS_A={}", wan.ns_name(Side::A))?;
    writeln!(out, "WAN_NS_B={}", wan.ns_name(Side::B))?;
    writeln!(out, "WAN_ADDR_A={}", wan.a_addr())?;
    writeln!(out, "WAN_ADDR_B={}", wan.b_addr())?;
    for l in all.iter().skip(1) {
        let k = l.link_index();
        writeln!(out, "WAN_NS_B{k}={}", l.ns_name(Side::B))?;
        writeln!(out, "WAN_ADDR_A{k}={}", l.a_addr())?;
        writeln!(out, "WAN_ADDR_B{k}={}", l.b_addr())?;
    }
    out.flush()?;
    drop(out);
    let delays: Vec<String> = delays_ms.iter().map(|d| format!("{d} ms")).collect();
    eprintln!(
        "cloudlet-wan: {} up, {rate} Mbit/s, {} one way; \
         try `ip netns exec {} ping {}`; Ctrl-C or `cloudlet-wan down --prefix {prefix}` to stop",
        if all.len() > 1 { "links" } else { "link" },
        delays.join(", "),
        wan.ns_name(Side::A),
        wan.b_addr()
    );

    drop(all);
    let mut sig: libc::c_int = 0;
    // SAFETY: signals and sig are valid for the call.
    unsafe { libc::sigwait(&signals, &mut sig) };
    let _ = std::fs::remove_file(&socket);
    let links = std::mem::take(&mut *links.write().unwrap_or_else(|p| p.into_inner()));
    // Attached links first: the first link owns the hub's namespace.
    for l in links.into_iter().rev() {
        let stats = l.stats();
        eprintln!(
            "cloudlet-wan: link {} down (signal {sig}); A->B {} packets {} bytes, B->A {} packets {} bytes",
            l.link_index(),
            stats.a_to_b.packets,
            stats.a_to_b.bytes,
            stats.b_to_a.packets,
            stats.b_to_a.bytes
        );
        l.teardown().context("Teardown failed")?;
    }
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset uses it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

fn down(prefix: &str) -> anyhow::Result<()> {
    let ours: Vec<_> = list_ours()
        .into_iter()
        .filter(|n| n.prefix == prefix)
        .collect();
    if ours.is_empty() {
        // Idempotent, so scripts can call it from a trap.
        eprintln!("cloudlet-wan: no link with prefix {prefix}");
        return Ok(());
    }
    let pids: BTreeSet<u32> = ours
        .iter()
        .filter(|n| n.owner_alive())
        .map(|n| n.pid)
        .collect();
    for pid in &pids {
        // SAFETY: plain syscall.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
    }
    // The `up` process deletes its namespaces; wait for it, then sweep what is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && list_ours().iter().any(|n| n.prefix == prefix) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for ns in list_ours().into_iter().filter(|n| n.prefix == prefix) {
        let name = ns.render();
        let status = std::process::Command::new("ip")
            .args(["netns", "delete", &name])
            .status()
            .context("Cannot run ip")?;
        if !status.success() {
            bail!("`ip netns delete {name}` failed");
        }
    }
    println!("down {prefix}");
    Ok(())
}
