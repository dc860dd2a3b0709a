//! Opening a TUN device inside a namespace.
//!
//! A TUN device lives in the namespace of the thread that creates it. The file
//! descriptor does not care where it is used afterwards, so a short-lived thread
//! enters the namespace, creates the device and hands the descriptor back.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use crate::netns::NsHandle;
use crate::WanError;

/// Name of the device of link 0 (the link [`Wan::create`](crate::Wan::create) makes)
/// at both of its ends. Link `k` of a hub ([`Wan::attach`](crate::Wan::attach)) uses
/// `wan{k}` at both of its ends ([`Wan::device`](crate::Wan::device)).
pub const TUN_NAME: &str = "wan0";

/// Name of the device of link `k` of a hub, at both of its ends: `wan{k}`.
pub(crate) fn device_name(k: u8) -> String {
    format!("wan{k}")
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the TUN device `dev` (layer 3, no packet-info header) inside `ns` and
/// returns its non-blocking descriptor; the device goes away when the descriptor is
/// closed. Also turns IPv6 off in the namespace so that router solicitations do not
/// show up in the link's counters.
pub(crate) fn open_in(ns: &NsHandle, dev: &str) -> Result<OwnedFd, WanError> {
    let ns = ns.try_clone()?;
    let name = ns.name.clone();
    let dev = dev.to_string();
    std::thread::Builder::new()
        .name(format!("wan-tun-{name}"))
        .spawn(move || {
            ns.enter()?;
            for knob in ["default", "all"] {
                // Best effort: the host may have no IPv6 at all.
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
            }
            open_tun(&dev).map_err(|source| WanError::Tun {
                ns: ns.name.clone(),
                source,
            })
        })
        .map_err(|source| WanError::Thread { source })?
        .join()
        .map_err(|_| WanError::Panicked {
            what: format!("opening TUN in {name}"),
        })?
}

fn open_tun(dev: &str) -> std::io::Result<OwnedFd> {
    if dev.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("device name {dev:?} too long"),
        ));
    }
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(dev.bytes()) {
        *dst = src as libc::c_char;
    }
    let fd = file.into_raw_fd();
    // SAFETY: fd is a valid open /dev/net/tun descriptor that we now own; TUNSETIFF
    // reads and writes a struct ifreq, which IfReq matches in size and layout.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}
