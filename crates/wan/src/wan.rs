//! [`Wan`]: create (or attach to a hub), reconfigure, cut and tear down one emulated
//! link.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::{self, WanConfig};
use crate::delay_line::{self, DirectionStats, LinkControl};
use crate::netns::{self, NsHandle, NsName};
use crate::tun;
use crate::WanError;

/// Address of side A on link 0, the link [`Wan::create`] makes (inside namespace A).
/// Link `k` of a hub has `10.251.k.1`.
pub const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// Address of side B on link 0, the link [`Wan::create`] makes (inside namespace B).
/// Link `k` of a hub has `10.251.k.2`.
pub const B_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);

/// Link number within this process, part of the namespace names.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// One end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// Traffic counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanStats {
    pub a_to_b: DirectionStats,
    pub b_to_a: DirectionStats,
}

/// An emulated WAN link between two network namespaces.
///
/// [`Wan::create`] makes both namespaces; [`Wan::attach`] adds another link to the
/// namespace A of an existing one (a hub with several leaves, see the crate docs).
/// Each link has its own delay line, devices, addresses and tbf, so its knobs
/// ([`set_delay`](Wan::set_delay), [`set_rate`](Wan::set_rate), [`cut`](Wan::cut), ...)
/// and [`stats`](Wan::stats) are its own.
///
/// Dropping it tears everything down (best effort, errors are logged);
/// [`Wan::teardown`] does the same and reports errors.
#[derive(Debug)]
pub struct Wan {
    config: WanConfig,
    ns: [NsHandle; 2],
    /// Link number within the hub: 0 for the link that made namespace A.
    index: u8,
    /// Device names at A and B.
    devs: [String; 2],
    /// Addresses at A and B.
    addrs: [Ipv4Addr; 2],
    /// Whether this link created namespace A, and so deletes it on teardown.
    owns_a: bool,
    /// Next link number of the hub, shared by all its links; 256 when exhausted.
    next_index: Arc<AtomicU16>,
    rate_bits: AtomicU64,
    ctl: Arc<LinkControl>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    torn_down: bool,
}

impl Wan {
    /// Creates namespaces A and B, a TUN device `wan0` in each with
    /// [`A_ADDR`]/[`B_ADDR`], tbf at `rate_mbit` on both, and starts the delay line.
    /// On error, whatever was created is removed again.
    ///
    /// The link is link 0 of a new hub: [`Wan::attach`] adds more links to its A.
    pub fn create(config: WanConfig) -> Result<Wan, WanError> {
        config.validate()?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let names = ['a', 'b'].map(|side| ns_name(&config, seq, side));
        with_cleanup(|created| {
            for name in &names {
                netns::add(name)?;
                created.push(name.clone());
            }
            let ns = [NsHandle::open(&names[0])?, NsHandle::open(&names[1])?];
            Self::start(&config, ns, 0, Arc::new(AtomicU16::new(1)), true)
        })
    }

    /// Adds a link from `hub`'s namespace A to a fresh namespace B (a leaf), with its
    /// own rate, delay, loss and MTU from `config`.
    ///
    /// `hub` may be any link of the hub: all share namespace A and the counter that
    /// numbers the links. Link `k` (`k` = 1, 2, ... in order of attachment, never
    /// reused; [`Wan::link_index`]) has the TUN device `wan{k}` at both ends and the
    /// addresses `10.251.k.1` in A and `10.251.k.2` in B, so a hub has at most 255
    /// attached links. Its B namespace is named like any other
    /// (`clw-<config prefix>-<pid>-<seq>-b`, with a seq of its own), so
    /// [`cleanup_stale`](crate::cleanup_stale) finds it too.
    ///
    /// The link does not own namespace A: its teardown stops its delay line (which
    /// removes its device from A) and deletes only its B. The link that created A
    /// deletes A's name on teardown; attached links still alive keep working after
    /// that, through their open handle on A, except for
    /// [`command_in`](Wan::command_in)`(Side::A, ..)`, which needs the name.
    ///
    /// ```text
    ///   A (hub)  10.251.0.1 wan0 ── link 0 ── wan0 10.251.0.2  B of `hub`
    ///            10.251.1.1 wan1 ── link 1 ── wan1 10.251.1.2  B of attach(&hub, ..)
    /// ```
    ///
    /// On error, the B namespace is removed again (and the device in A closed).
    pub fn attach(hub: &Wan, config: WanConfig) -> Result<Wan, WanError> {
        config.validate()?;
        let index = hub
            .next_index
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
                (k <= u16::from(u8::MAX)).then_some(k + 1)
            })
            .map_err(|_| {
                WanError::InvalidConfig(format!(
                    "Hub {} already has 256 links",
                    hub.ns_name(Side::A)
                ))
            })? as u8;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let b_name = ns_name(&config, seq, 'b');
        with_cleanup(|created| {
            netns::add(&b_name)?;
            created.push(b_name.clone());
            let ns = [hub.ns[0].try_clone()?, NsHandle::open(&b_name)?];
            Self::start(&config, ns, index, hub.next_index.clone(), false)
        })
    }

    /// Creates and configures link `index`'s devices in `ns`, and starts its delay line.
    fn start(
        config: &WanConfig,
        ns: [NsHandle; 2],
        index: u8,
        next_index: Arc<AtomicU16>,
        owns_a: bool,
    ) -> Result<Wan, WanError> {
        let dev = tun::device_name(index);
        let devs = [dev.clone(), dev];
        let addrs = link_addrs(index);
        let fds: [Arc<OwnedFd>; 2] = [
            Arc::new(tun::open_in(&ns[0], &devs[0])?),
            Arc::new(tun::open_in(&ns[1], &devs[1])?),
        ];
        for i in 0..2 {
            configure_end(&ns[i], &devs[i], addrs[i], addrs[1 - i], config)?;
        }
        let ctl = Arc::new(LinkControl::default());
        ctl.delay_ns
            .store(config.one_way_delay.as_nanos() as u64, Ordering::Relaxed);
        ctl.cap_bytes.store(
            config::delay_queue_cap(config.rate_mbit, config.one_way_delay),
            Ordering::Relaxed,
        );
        ctl.set_loss(config.loss);
        let thread_ctl = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wan-{}", config.name_prefix))
            .spawn(move || delay_line::run(fds, thread_ctl))
            .map_err(|source| WanError::Thread { source })?;
        tracing::info!(
            a = %ns[0].name, b = %ns[1].name, link = index, rate_mbit = config.rate_mbit,
            delay = ?config.one_way_delay, "wan: link up"
        );
        Ok(Wan {
            config: config.clone(),
            ns,
            index,
            devs,
            addrs,
            owns_a,
            next_index,
            rate_bits: AtomicU64::new(config.rate_mbit.to_bits()),
            ctl,
            thread: Mutex::new(Some(thread)),
            torn_down: false,
        })
    }

    /// The configuration the link was created with (rate and delay as created).
    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    /// Address of side A, reachable from B (`10.251.k.1` for link `k`).
    pub fn a_addr(&self) -> Ipv4Addr {
        self.addrs[0]
    }

    /// Address of side B, reachable from A (`10.251.k.2` for link `k`).
    pub fn b_addr(&self) -> Ipv4Addr {
        self.addrs[1]
    }

    /// Address of `side` on this link.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        self.addrs[side.index()]
    }

    /// Name of the namespace of `side`, for `ip netns exec NAME ...`. Side A of an
    /// attached link is the hub's namespace A.
    pub fn ns_name(&self, side: Side) -> &str {
        &self.ns[side.index()].name
    }

    /// Number of this link within its hub: 0 for a link made by [`Wan::create`],
    /// 1, 2, ... for those made by [`Wan::attach`].
    pub fn link_index(&self) -> u8 {
        self.index
    }

    /// Name of this link's TUN device at `side` (`wan{k}` for link `k`), e.g. for
    /// `tc` or `ip` commands of your own.
    pub fn device(&self, side: Side) -> &str {
        &self.devs[side.index()]
    }

    /// Route this link's leaf (side B) to every address of the hub's links,
    /// `10.251.0.0/16`, through its own link, and let the hub forward
    /// between its links: the leaf then reaches every address of the hub
    /// and the leaves of the hub's other routed links (across both links,
    /// each with its own delay and rate), e.g. a cloud tier that listens in
    /// the hub, and cloudlets that hand VMs to each other.
    pub fn route_via_hub(&self) -> Result<(), WanError> {
        netns::run_inside(
            &self.ns[Side::A.index()],
            "sh",
            // The namespace's own /proc/sys/net (no sysctl binary needed).
            &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        )?;
        let dev = self.devs[Side::B.index()].clone();
        netns::run_inside(
            &self.ns[Side::B.index()],
            "ip",
            &["route", "replace", "10.251.0.0/16", "dev", &dev],
        )
    }

    /// Current rate in Mbit/s.
    pub fn rate_mbit(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    /// Current one-way delay.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.ctl.delay_ns.load(Ordering::Relaxed))
    }

    /// Changes the rate of both directions (replaces tbf on this link's two devices).
    pub fn set_rate(&self, rate_mbit: f64) -> Result<(), WanError> {
        config::validate_rate(rate_mbit)?;
        for (ns, dev) in self.ns.iter().zip(&self.devs) {
            set_tbf(ns, dev, rate_mbit, self.config.mtu)?;
        }
        self.rate_bits.store(rate_mbit.to_bits(), Ordering::Relaxed);
        self.update_cap();
        Ok(())
    }

    /// Changes the one-way delay of both directions. Applies to packets arriving from
    /// now on; packets already queued keep their release time.
    pub fn set_delay(&self, one_way_delay: Duration) -> Result<(), WanError> {
        config::validate_delay(one_way_delay)?;
        self.ctl
            .delay_ns
            .store(one_way_delay.as_nanos() as u64, Ordering::Relaxed);
        self.update_cap();
        Ok(())
    }

    /// Changes the random loss probability of both directions.
    pub fn set_loss(&self, loss: f64) -> Result<(), WanError> {
        config::validate_loss(loss)?;
        self.ctl.set_loss(loss);
        Ok(())
    }

    fn update_cap(&self) {
        let cap = config::delay_queue_cap(self.rate_mbit(), self.delay());
        self.ctl.cap_bytes.store(cap, Ordering::Relaxed);
    }

    /// Cuts the link: from now on every packet, including those in flight, is dropped
    /// in both directions. Connections stall; the kernels on both sides see nothing
    /// but silence, as with a pulled cable somewhere along the path.
    pub fn cut(&self) {
        self.ctl.cut.store(true, Ordering::Relaxed);
        tracing::info!(b = %self.ns[1].name, link = self.index, "wan: link cut");
    }

    /// Brings a cut link back. Stalled TCP connections recover at their next
    /// retransmission.
    pub fn restore(&self) {
        self.ctl.cut.store(false, Ordering::Relaxed);
        tracing::info!(b = %self.ns[1].name, link = self.index, "wan: link restored");
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.ctl.cut.load(Ordering::Relaxed)
    }

    /// Counters of both directions since creation.
    pub fn stats(&self) -> WanStats {
        WanStats {
            a_to_b: self.ctl.stats(0),
            b_to_a: self.ctl.stats(1),
        }
    }

    /// A command that runs `program` in the namespace of `side`, as
    /// `ip netns exec NS program`. Add arguments and stdio, then spawn it.
    pub fn command_in(&self, side: Side, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns_name(side), program]);
        cmd
    }

    /// Spawns `cmd` inside the namespace of `side`. Arguments, environment, working
    /// directory and stdio set on `cmd` are kept: the child enters the namespace with
    /// `setns` between fork and exec (like `ip netns exec`, without its `/sys` remount).
    pub fn spawn_in(&self, side: Side, mut cmd: Command) -> std::io::Result<Child> {
        let ns = self.ns[side.index()]
            .try_clone()
            .map_err(std::io::Error::other)?;
        let fd = ns.raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe; `ns` keeps
        // the descriptor open until spawn returns.
        unsafe {
            cmd.pre_exec(move || netns::setns_fd(fd));
        }
        let child = cmd.spawn();
        drop(ns);
        child
    }

    /// Runs `fut` to completion on a new thread inside the namespace of `side`, on a
    /// current-thread tokio runtime of its own. Every socket the future creates
    /// belongs to that namespace. See the crate docs for the pattern.
    pub fn run_in<F, T>(&self, side: Side, fut: F) -> Result<NsJoinHandle<T>, WanError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.run_in_with(side, move || fut)
    }

    /// Like [`Wan::run_in`], but builds the future inside the namespace thread, so it
    /// need not be `Send` (and anything the closure creates before the first await,
    /// such as std sockets, is created in the namespace too).
    pub fn run_in_with<C, F, T>(&self, side: Side, make: C) -> Result<NsJoinHandle<T>, WanError>
    where
        C: FnOnce() -> F + Send + 'static,
        F: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let ns = self.ns[side.index()].try_clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("wan-ns-{}", ns.name))
            .spawn(move || {
                let result = (|| {
                    ns.enter()?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| WanError::Runtime { source })?;
                    Ok(rt.block_on(make()))
                })();
                let _ = tx.send(result);
            })
            .map_err(|source| WanError::Thread { source })?;
        Ok(NsJoinHandle {
            rx,
            thread: Some(thread),
        })
    }

    /// Stops the delay line and deletes the namespaces this link created: both for a
    /// link made by [`Wan::create`], only B for one made by [`Wan::attach`] (its device
    /// in A goes away with the delay line). Devices and qdiscs go with their
    /// namespaces. Sockets that tasks still hold keep a namespace alive, unnamed,
    /// until they are closed; so do attached links for namespace A.
    pub fn teardown(mut self) -> Result<(), WanError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), WanError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.ctl.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(thread) = thread {
            // The thread owns the TUN descriptors; they close when it ends.
            if thread.join().is_err() {
                tracing::error!("wan: delay line thread panicked");
            }
        }
        let owned = if self.owns_a {
            &self.ns[..]
        } else {
            &self.ns[1..]
        };
        let mut first_err = None;
        for ns in owned {
            if let Err(err) = netns::delete(&ns.name) {
                first_err.get_or_insert(err);
            }
        }
        tracing::info!(
            a = %self.ns[0].name, b = %self.ns[1].name, link = self.index, "wan: link down"
        );
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::error!(%err, "wan: teardown on drop");
        }
    }
}

/// The namespace name of `side` (`'a'` or `'b'`) of link number `seq` of this process.
fn ns_name(config: &WanConfig, seq: u32, side: char) -> String {
    NsName {
        prefix: config.name_prefix.clone(),
        pid: std::process::id(),
        seq,
        side,
    }
    .render()
}

/// Runs `build`, which records every namespace it creates in its argument; on error,
/// deletes those again.
fn with_cleanup<T>(
    build: impl FnOnce(&mut Vec<String>) -> Result<T, WanError>,
) -> Result<T, WanError> {
    let mut created = Vec::new();
    let result = build(&mut created);
    if result.is_err() {
        for name in created {
            if let Err(err) = netns::delete(&name) {
                tracing::warn!(ns = %name, %err, "wan: cleanup after failed create");
            }
        }
    }
    result
}

/// Addresses of link `k` of a hub: `10.251.k.1` at A, `10.251.k.2` at B.
fn link_addrs(k: u8) -> [Ipv4Addr; 2] {
    [Ipv4Addr::new(10, 251, k, 1), Ipv4Addr::new(10, 251, k, 2)]
}

/// Sets up one end of a link in `ns`: loopback up, `dev` with the MTU, the
/// point-to-point address `local` peer `peer`, up, and tbf at the rate.
fn configure_end(
    ns: &NsHandle,
    dev: &str,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    config: &WanConfig,
) -> Result<(), WanError> {
    let mtu = config.mtu.to_string();
    let local = local.to_string();
    let peer = format!("{peer}/32");
    netns::run_inside(ns, "ip", &["link", "set", "lo", "up"])?;
    netns::run_inside(ns, "ip", &["link", "set", dev, "mtu", &mtu])?;
    netns::run_inside(
        ns,
        "ip",
        &["addr", "add", &local, "peer", &peer, "dev", dev],
    )?;
    netns::run_inside(ns, "ip", &["link", "set", dev, "up"])?;
    set_tbf(ns, dev, config.rate_mbit, config.mtu)
}

fn set_tbf(ns: &NsHandle, dev: &str, rate_mbit: f64, mtu: u32) -> Result<(), WanError> {
    let tbf = config::tbf_args(rate_mbit, mtu);
    let mut args = vec!["qdisc", "replace", "dev", dev, "root"];
    args.extend(tbf.iter().map(String::as_str));
    netns::run_inside(ns, "tc", &args)
}

/// The result of [`Wan::run_in`]: await it from async code or [`join`](Self::join)
/// it from a plain thread.
#[derive(Debug)]
pub struct NsJoinHandle<T> {
    rx: tokio::sync::oneshot::Receiver<Result<T, WanError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T> NsJoinHandle<T> {
    /// Blocks until the future has finished. Do not call from async code.
    pub fn join(mut self) -> Result<T, WanError> {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        match self.rx.try_recv() {
            Ok(result) => result,
            Err(_) => Err(WanError::Panicked {
                what: "task in namespace".into(),
            }),
        }
    }

    /// Whether the future has finished.
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(thread) => thread.is_finished(),
            None => true,
        }
    }
}

impl<T> Future for NsJoinHandle<T> {
    type Output = Result<T, WanError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(WanError::Panicked {
                what: "task in namespace".into(),
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_zero_keeps_the_single_link_names_and_addresses() {
        assert_eq!(link_addrs(0), [A_ADDR, B_ADDR]);
        assert_eq!(tun::device_name(0), tun::TUN_NAME);
        assert_eq!(
            link_addrs(3),
            [Ipv4Addr::new(10, 251, 3, 1), Ipv4Addr::new(10, 251, 3, 2)]
        );
        assert_eq!(tun::device_name(255), "wan255");
    }
}
