//! [`Wan`]: create, reconfigure, cut and tear down one emulated link.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::{self, WanConfig};
use crate::delay_line::{self, DirectionStats, LinkControl};
use crate::netns::{self, NsHandle, NsName};
use crate::tun::{self, TUN_NAME};
use crate::WanError;

/// Address of side A on the link (inside namespace A).
pub const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// Address of side B on the link (inside namespace B).
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

/// An emulated WAN link between two fresh network namespaces.
///
/// Dropping it tears everything down (best effort, errors are logged);
/// [`Wan::teardown`] does the same and reports errors.
#[derive(Debug)]
pub struct Wan {
    config: WanConfig,
    ns: [NsHandle; 2],
    rate_bits: AtomicU64,
    ctl: Arc<LinkControl>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    torn_down: bool,
}

impl Wan {
    /// Creates namespaces A and B, a TUN device `wan0` in each with
    /// [`A_ADDR`]/[`B_ADDR`], tbf at `rate_mbit` on both, and starts the delay line.
    /// On error, whatever was created is removed again.
    pub fn create(config: WanConfig) -> Result<Wan, WanError> {
        config.validate()?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let names = ['a', 'b'].map(|side| {
            NsName {
                prefix: config.name_prefix.clone(),
                pid: std::process::id(),
                seq,
                side,
            }
            .render()
        });
        let mut created = Vec::new();
        let result = Self::build(&config, &names, &mut created);
        if result.is_err() {
            for name in created {
                if let Err(err) = netns::delete(&name) {
                    tracing::warn!(ns = %name, %err, "wan: cleanup after failed create");
                }
            }
        }
        result
    }

    fn build(
        config: &WanConfig,
        names: &[String; 2],
        created: &mut Vec<String>,
    ) -> Result<Wan, WanError> {
        for name in names {
            netns::add(name)?;
            created.push(name.clone());
        }
        let ns = [NsHandle::open(&names[0])?, NsHandle::open(&names[1])?];
        let fds: [Arc<OwnedFd>; 2] = [
            Arc::new(tun::open_in(&ns[0])?),
            Arc::new(tun::open_in(&ns[1])?),
        ];
        let mtu = config.mtu.to_string();
        for (i, name) in names.iter().enumerate() {
            let (local, peer) = if i == 0 {
                (A_ADDR, B_ADDR)
            } else {
                (B_ADDR, A_ADDR)
            };
            netns::run("ip", &["-n", name, "link", "set", "lo", "up"])?;
            netns::run("ip", &["-n", name, "link", "set", TUN_NAME, "mtu", &mtu])?;
            netns::run(
                "ip",
                &[
                    "-n",
                    name,
                    "addr",
                    "add",
                    &local.to_string(),
                    "peer",
                    &format!("{peer}/32"),
                    "dev",
                    TUN_NAME,
                ],
            )?;
            netns::run("ip", &["-n", name, "link", "set", TUN_NAME, "up"])?;
            set_tbf(name, config.rate_mbit, config.mtu)?;
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
            a = %names[0], b = %names[1], rate_mbit = config.rate_mbit,
            delay = ?config.one_way_delay, "wan: link up"
        );
        Ok(Wan {
            config: config.clone(),
            ns,
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

    /// Address of side A, reachable from B.
    pub fn a_addr(&self) -> Ipv4Addr {
        A_ADDR
    }

    /// Address of side B, reachable from A.
    pub fn b_addr(&self) -> Ipv4Addr {
        B_ADDR
    }

    /// Address of `side`.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::A => A_ADDR,
            Side::B => B_ADDR,
        }
    }

    /// Name of the namespace of `side`, for `ip netns exec NAME ...`.
    pub fn ns_name(&self, side: Side) -> &str {
        &self.ns[side.index()].name
    }

    /// Current rate in Mbit/s.
    pub fn rate_mbit(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    /// Current one-way delay.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.ctl.delay_ns.load(Ordering::Relaxed))
    }

    /// Changes the rate of both directions (replaces tbf on both devices).
    pub fn set_rate(&self, rate_mbit: f64) -> Result<(), WanError> {
        config::validate_rate(rate_mbit)?;
        for ns in &self.ns {
            set_tbf(&ns.name, rate_mbit, self.config.mtu)?;
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
        tracing::info!(a = %self.ns[0].name, "wan: link cut");
    }

    /// Brings a cut link back. Stalled TCP connections recover at their next
    /// retransmission.
    pub fn restore(&self) {
        self.ctl.cut.store(false, Ordering::Relaxed);
        tracing::info!(a = %self.ns[0].name, "wan: link restored");
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

    /// Stops the delay line and deletes both namespaces (and with them the devices and
    /// qdiscs). Sockets that tasks still hold keep a namespace alive, unnamed, until
    /// they are closed.
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
        let mut first_err = None;
        for ns in &self.ns {
            if let Err(err) = netns::delete(&ns.name) {
                first_err.get_or_insert(err);
            }
        }
        tracing::info!(a = %self.ns[0].name, "wan: link down");
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

fn set_tbf(ns: &str, rate_mbit: f64, mtu: u32) -> Result<(), WanError> {
    let tbf = config::tbf_args(rate_mbit, mtu);
    let mut args = vec!["-n", ns, "qdisc", "replace", "dev", TUN_NAME, "root"];
    args.extend(tbf.iter().map(String::as_str));
    netns::run("tc", &args)
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
