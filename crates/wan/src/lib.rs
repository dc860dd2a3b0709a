//! WAN emulation for cloudlet's tests and benchmarks.
//!
//! The host kernel has no `netem`, so a link is built from what it has:
//!
//! ```text
//!   namespace A                         this process                     namespace B
//!  ┌──────────────────┐          ┌──────────────────────────┐        ┌──────────────────┐
//!  │ 10.251.0.1       │  egress  │  delay line thread       │ write  │       10.251.0.2 │
//!  │ wan0 (TUN) ─ tbf ├─────────►│  A→B FIFO: arrival+delay ├───────►│ wan0 (TUN) ─ tbf │
//!  │                  │◄─────────┤  B→A FIFO: arrival+delay │◄───────┤                  │
//!  └──────────────────┘  write   └──────────────────────────┘ egress └──────────────────┘
//! ```
//!
//! * [`Wan::create`]: two fresh network namespaces, each with loopback up and one TUN
//!   device `wan0` (point-to-point, [`A_ADDR`] peer [`B_ADDR`] and back). Nothing else
//!   is reachable from inside them, and the host's own interfaces never see a packet.
//! * **Rate**: `tbf` on each `wan0`'s egress, with a 150 ms bottleneck buffer
//!   (tbf drops beyond it) and a ~4 ms burst. Packets are shaped before the delay line
//!   reads them, so the program stays simple and cheap: the kernel does the per-packet
//!   timing at rate granularity, the program only at delay granularity.
//! * **Delay**: one thread reads both TUN descriptors and holds each packet in a
//!   bounded FIFO per direction until `arrival + delay`, then writes it to the other
//!   TUN (see [`delay_line`](crate::delay_line) for drops and timing).
//! * **Failure injection**: [`Wan::cut`] drops everything, in flight included, until
//!   [`Wan::restore`]. [`Wan::set_rate`], [`Wan::set_delay`], [`Wan::set_loss`]
//!   change the link while it carries traffic.
//! * **Cleanup**: namespaces are named `clw-<prefix>-<pid>-<seq>-<a|b>`.
//!   [`Wan::teardown`] or drop removes them; [`cleanup_stale`] removes those whose
//!   owning process died.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), `/dev/net/tun`, `ip` and `tc`.
//!
//! # A hub with several links
//!
//! [`Wan::attach`] adds a link from the namespace A of an existing link (the hub,
//! e.g. a mobile device) to a fresh namespace B of its own (a leaf, e.g. a cloudlet).
//! Every link is complete in itself: its own delay line thread, its own device at
//! both ends with tbf on it, its own addresses, knobs and counters. Link `k` of a hub
//! (0 for the one [`Wan::create`] made, then 1, 2, ... in order of attachment) is
//! device `wan{k}` at both ends, `10.251.k.1` in the hub and `10.251.k.2` in its leaf:
//!
//! ```text
//!   namespace A (hub)                                     leaf namespaces (each a B)
//!  ┌───────────────────────┐                          ┌───────────────────────┐
//!  │ 10.251.0.1 wan0 ─ tbf ├◄── delay line 0, 2 ms ──►┤ wan0 ─ tbf 10.251.0.2 │ hub
//!  │                       │                          └───────────────────────┘
//!  │                       │                          ┌───────────────────────┐
//!  │ 10.251.1.1 wan1 ─ tbf ├◄── delay line 1, 10 ms ─►┤ wan1 ─ tbf 10.251.1.2 │ link 1
//!  │                       │                          └───────────────────────┘
//!  │                       │                          ┌───────────────────────┐
//!  │ 10.251.2.1 wan2 ─ tbf ├◄── delay line 2, 40 ms ─►┤ wan2 ─ tbf 10.251.2.2 │ link 2
//!  └───────────────────────┘                          └───────────────────────┘
//!
//!   let hub = Wan::create(WanConfig::new("dev", 50.0, ms(2)))?;      // link 0
//!   let link1 = Wan::attach(&hub, WanConfig::new("dev", 50.0, ms(10)))?;
//!   let link2 = Wan::attach(&hub, WanConfig::new("dev", 50.0, ms(40)))?;
//! ```
//!
//! Code in the hub reaches leaf `k` at its [`Wan::b_addr`], through the [`Wan::run_in`]
//! `(Side::A, ..)` of any of the links (they share A); the kernel picks the source
//! address of the right link. Leaves cannot reach each other. Tearing down an attached
//! link removes its leaf and its device in the hub and leaves the other links alone;
//! tearing down the hub's own link deletes A's name (and leaf 0), and attached links
//! still alive keep working through their open handle on A.
//!
//! # Running code on either side
//!
//! A socket belongs to the network namespace of the thread that created it, and stays
//! there wherever it is used afterwards. So:
//!
//! * [`Wan::run_in`] runs a future on a new thread that has entered the namespace, on
//!   a current-thread tokio runtime of its own. Bind listeners and connect *inside*
//!   that future. Use IP literals: a name lookup would run on tokio's blocking pool.
//!   The returned [`NsJoinHandle`] can be awaited or [`join`](NsJoinHandle::join)ed.
//! * [`Wan::spawn_in`] spawns a process in a namespace (keeping its stdio settings),
//!   [`Wan::command_in`] builds an `ip netns exec NS program` command.
//!
//! ```no_run
//! use std::time::Duration;
//! use cloudlet_wan::{Side, Wan, WanConfig};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let wan = Wan::create(WanConfig::new("doc", 20.0, Duration::from_millis(20)))?;
//! let b_addr = wan.b_addr();
//! // Bind in B before connecting from A: wait until the listener is up.
//! let (ready_tx, ready_rx) = std::sync::mpsc::channel();
//! let server = wan.run_in(Side::B, async move {
//!     let listener = tokio::net::TcpListener::bind((b_addr, 7000)).await?;
//!     ready_tx.send(()).ok();
//!     let (mut sock, _) = listener.accept().await?;
//!     let mut buf = Vec::new();
//!     sock.read_to_end(&mut buf).await?;
//!     std::io::Result::Ok(buf.len())
//! })?;
//! ready_rx.recv()?;
//! let client = wan.run_in(Side::A, async move {
//!     let mut sock = tokio::net::TcpStream::connect((b_addr, 7000)).await?;
//!     sock.write_all(&[0u8; 1 << 20]).await?;
//!     std::io::Result::Ok(())
//! })?;
//! client.join()??;
//! assert_eq!(server.join()??, 1 << 20);
//! wan.teardown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Measured here
//!
//! 2 cores shared with other builds (load average ~4.5), kernel 6.18, BBR, one TCP flow
//! A→B. Idle RTT: median of 20 small TCP request/response round trips. RTT under
//! load: the same during the bulk transfer. Throughput: TCP payload received by B,
//! from 1 s after the first byte to the end of a 4 s transfer. Delay-line CPU: its
//! thread's share of one core (debug build of this crate). Reproduce with
//! `cargo test -p cloudlet-wan --test wan -- --ignored --nocapture measure_table`.
//!
//! | rate set   | one-way delay | idle RTT | RTT under load | throughput   | delay-line CPU |
//! |------------|---------------|----------|----------------|--------------|----------------|
//! | 10 Mbit/s  | 25 ms         | 50.4 ms  | 52.9 ms        | 9.7 Mbit/s   | 5.0%           |
//! | 20 Mbit/s  | 20 ms         | 40.5 ms  | 42.1 ms        | 19.3 Mbit/s  | 8.1%           |
//! | 25 Mbit/s  | 25 ms         | 50.5 ms  | 52.0 ms        | 24.1 Mbit/s  | 10.3%          |
//! | 50 Mbit/s  | 10 ms         | 20.5 ms  | 22.7 ms        | 48.3 Mbit/s  | 11.2%          |
//! | 50 Mbit/s  | 50 ms         | 100.5 ms | 102.0 ms       | 48.3 Mbit/s  | 8.3%           |
//! | 100 Mbit/s | 5 ms          | 10.6 ms  | 12.0 ms        | 96.8 Mbit/s  | 13.1%          |
//!
//! The rate counts IP bytes, so TCP goodput is ~96.5% of it (1448 payload bytes per
//! 1500-byte packet): 19.3 of 20 Mbit/s is the link running full.
//!
//! Why tbf and not a token bucket in the delay line: tbf already gives the set rate to
//! within the header overhead at 10-100 Mbit/s, costs no extra wake-ups, and its
//! buffer drops like a router's. The one difference from a mid-path bottleneck: tbf
//! sits on the sender's own device, so the sender's TCP is throttled by local
//! back-pressure (TCP small queues) instead of filling the buffer and losing packets,
//! hence the small RTT increase under load. The link does not emulate bufferbloat.
//!
//! Random loss (`loss`) drops in the delay line, on top of the above; a cut link
//! brought back after ~2.5 s resumes a stalled TCP connection about 1.2 s after
//! [`Wan::restore`] (its next retransmission).

mod config;
pub mod delay_line;
mod netns;
mod tun;
mod wan;

pub mod control;
pub use config::{WanConfig, BOTTLENECK_BUFFER, MAX_PREFIX_LEN};
pub use delay_line::DirectionStats;
pub use netns::{cleanup_stale, list_ours, NsName, NS_PREFIX};
pub use tun::TUN_NAME;
pub use wan::{NsJoinHandle, Side, Wan, WanStats, A_ADDR, B_ADDR};

/// Why creating, changing or tearing down a link failed.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("Invalid WAN config: {0}")]
    InvalidConfig(String),
    #[error("Could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("Cannot open or enter network namespace {ns}")]
    Namespace {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create TUN device in namespace {ns}")]
    Tun {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot spawn a thread")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot build a tokio runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("Panicked: {what}")]
    Panicked { what: String },
}
