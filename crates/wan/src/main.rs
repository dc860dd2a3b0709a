//! `cloudlet-wan`: bring an emulated WAN link up and down from a shell.
//!
//! ```text
//! cloudlet-wan up --rate 25 --delay-ms 25 --prefix demo   # stays in the foreground
//! ip netns exec "$(cloudlet-wan ns --prefix demo a)" iperf3 -c 10.251.0.2
//! cloudlet-wan down --prefix demo                          # or Ctrl-C the `up`
//! cloudlet-wan cleanup                                     # links of dead processes
//! ```

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cloudlet_wan::{cleanup_stale, list_ours, Side, Wan, WanConfig};

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
        /// One-way delay in milliseconds (RTT is twice this).
        #[arg(long)]
        delay_ms: f64,
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

fn up(rate: f64, delay_ms: f64, prefix: String, loss: f64, mtu: u32) -> anyhow::Result<()> {
    if !(delay_ms.is_finite() && delay_ms >= 0.0) {
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

    let config = WanConfig {
        loss,
        mtu,
        ..WanConfig::new(&prefix, rate, Duration::from_secs_f64(delay_ms / 1000.0))
    };
    let wan = Wan::create(config).context("Cannot create the link")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "WAN_NS_A={}", wan.ns_name(Side::A))?;
    writeln!(out, "WAN_NS_B={}", wan.ns_name(Side::B))?;
    writeln!(out, "WAN_ADDR_A={}", wan.a_addr())?;
    writeln!(out, "WAN_ADDR_B={}", wan.b_addr())?;
    out.flush()?;
    drop(out);
    eprintln!(
        "cloudlet-wan: link up, {rate} Mbit/s, {delay_ms} ms one way; \
         try `ip netns exec {} ping {}`; Ctrl-C or `cloudlet-wan down --prefix {prefix}` to stop",
        wan.ns_name(Side::A),
        wan.b_addr()
    );

    let mut sig: libc::c_int = 0;
    // SAFETY: signals and sig are valid for the call.
    unsafe { libc::sigwait(&signals, &mut sig) };
    let stats = wan.stats();
    wan.teardown().context("Teardown failed")?;
    eprintln!(
        "cloudlet-wan: link down (signal {sig}); A->B {} packets {} bytes, B->A {} packets {} bytes",
        stats.a_to_b.packets, stats.a_to_b.bytes, stats.b_to_a.packets, stats.b_to_a.bytes
    );
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
