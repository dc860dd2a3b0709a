//! Building a base VM: stage a root tree, make the disk and initramfs, boot
//! the guest, wait for its agent, let it settle, save it paused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudlet_qemu::accel::choose_accel;
use cloudlet_qemu::image::{commit_top, create_top, qemu_version};
use cloudlet_qemu::{MachineConfig, Vm};

use crate::kernel::find_kernel;
use crate::rootfs::{self, io};
use crate::store::hash_files;
use crate::{BaseManifest, BaseStore, BuildBaseError, BASE_FORMAT};

/// Debian release the `debian` base is made from.
const DEBIAN_SUITE: &str = "bookworm";
/// Packages on top of `minbase`: what apps and tests commonly need.
const DEBIAN_INCLUDE: &str = "ca-certificates,iproute2,procps,util-linux";

/// The kinds of base VM this build knows how to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// Busybox and the agent on a 64 MiB ext4 disk, 256 MiB RAM. For tests.
    Tiny,
    /// Debian `minbase` on a 2 GiB ext4 disk, 512 MiB RAM. For benchmarks.
    Debian,
}

impl std::str::FromStr for Recipe {
    type Err = BuildBaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tiny" => Ok(Recipe::Tiny),
            "debian" => Ok(Recipe::Debian),
            other => Err(BuildBaseError::UnknownRecipe(other.into())),
        }
    }
}

impl Recipe {
    pub fn as_str(self) -> &'static str {
        match self {
            Recipe::Tiny => "tiny",
            Recipe::Debian => "debian",
        }
    }
    fn memory_mib(self) -> u64 {
        match self {
            Recipe::Tiny => 256,
            Recipe::Debian => 512,
        }
    }
    fn disk_size(self) -> u64 {
        match self {
            Recipe::Tiny => 64 << 20,
            Recipe::Debian => 2 << 30,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Store name; defaults to the recipe's name.
    pub name: Option<String>,
    /// Guest memory in MiB; defaults to the recipe's.
    pub memory_mib: Option<u64>,
    /// Rebuild even if a base with equal inputs exists.
    pub force: bool,
    /// Where slow-to-fetch inputs are cached (the debootstrap tree).
    pub cache_dir: PathBuf,
    /// The static guest agent binary; found automatically if `None`.
    pub agent: Option<PathBuf>,
}

/// The static guest agent: `$CLOUDLET_AGENT`, next to the running program's
/// target directory, or in this workspace's `target/guest`.
pub fn find_agent() -> Result<PathBuf, BuildBaseError> {
    let rel = "guest/x86_64-unknown-linux-gnu/release/cloudlet-agent";
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("CLOUDLET_AGENT") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(3) {
            candidates.push(up.join(rel));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(rel),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            BuildBaseError::NoAgent(
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

fn hash_file(p: &Path) -> Result<String, BuildBaseError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap(p).map_err(|e| io(p, e))?;
    Ok(h.finalize().to_hex().to_string())
}

/// Build the base VM `recipe` into `store` (or return the existing one when
/// its inputs are unchanged). Work happens in a hidden directory that is
/// renamed into place only when complete.
pub async fn build_base(
    store: &BaseStore,
    recipe: Recipe,
    opts: &BuildOptions,
) -> Result<BaseManifest, BuildBaseError> {
    let name = opts.name.clone().unwrap_or_else(|| recipe.as_str().into());
    let kernel = find_kernel()?;
    let busybox = rootfs::find_busybox()?;
    let agent = match &opts.agent {
        Some(a) => a.clone(),
        None => find_agent()?,
    };
    let memory_mib = opts.memory_mib.unwrap_or(recipe.memory_mib());
    let inputs = {
        let mut h = blake3::Hasher::new();
        for part in [
            recipe.as_str().to_string(),
            memory_mib.to_string(),
            hash_file(&kernel.image)?,
            hash_file(&busybox)?,
            hash_file(&agent)?,
            DEBIAN_INCLUDE.to_string(),
            rootfs_version().to_string(),
        ] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        h.finalize().to_hex()[..16].to_string()
    };
    if !opts.force {
        if let Ok(existing) = store.get(&name) {
            if existing.manifest.inputs == inputs {
                tracing::info!(%name, "base is up to date");
                return Ok(existing.manifest);
            }
        }
    }

    std::fs::create_dir_all(store.bases_dir()).map_err(|e| io(&store.bases_dir(), e))?;
    let work = store
        .bases_dir()
        .join(format!(".build-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| io(&work, e))?;
    let result = build_in(
        &work, store, recipe, &name, memory_mib, &inputs, &kernel, &busybox, &agent, opts,
    )
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

/// Bumped when the staged root trees change in a way the hashes miss.
fn rootfs_version() -> u32 {
    1
}

#[allow(clippy::too_many_arguments)]
async fn build_in(
    work: &Path,
    store: &BaseStore,
    recipe: Recipe,
    name: &str,
    memory_mib: u64,
    inputs: &str,
    kernel: &crate::kernel::Kernel,
    busybox: &Path,
    agent: &Path,
    opts: &BuildOptions,
) -> Result<BaseManifest, BuildBaseError> {
    let root = work.join("root");
    tracing::info!(%name, "staging the root file system");
    match recipe {
        Recipe::Tiny => rootfs::stage_tiny(&root, busybox, agent)?,
        Recipe::Debian => {
            stage_debian(&root, &opts.cache_dir)?;
            rootfs::add_common_files(&root, agent, name)?;
        }
    }
    rootfs::make_ext4(&root, &work.join("disk.raw"), recipe.disk_size())?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::copy(&kernel.image, work.join("kernel")).map_err(|e| io(&work.join("kernel"), e))?;
    rootfs::write_initramfs(kernel, busybox, &work.join("initrd.img"))?;

    let machine = MachineConfig {
        machine: "pc-i440fx-7.2".into(),
        cpu: "qemu64".into(),
        vcpus: 1,
        memory_mib,
        kernel: "kernel".into(),
        initrd: "initrd.img".into(),
        cmdline: "console=ttyS0 quiet panic=-1 init_on_free=1 8250.nr_uarts=1".into(),
    };
    let accel = choose_accel(&kernel.image, &store.home().join("accel-probe")).await;
    capture_booted_state(work, &machine, accel).await?;

    let files = hash_files(work).map_err(|e| io(work, e))?;
    let mut manifest = BaseManifest {
        format: BASE_FORMAT,
        name: name.to_string(),
        id: String::new(),
        recipe: recipe.as_str().into(),
        inputs: inputs.to_string(),
        machine,
        accel,
        disk_size: recipe.disk_size(),
        devices: [
            "virtio-blk-pci",
            "virtio-net-pci",
            "virtio-rng-pci",
            "virtio-serial-pci",
            "virtserialport",
        ]
        .map(String::from)
        .to_vec(),
        qemu_version: qemu_version(),
        kernel_release: kernel.release.clone(),
        built_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        files,
    };
    manifest.id = manifest.compute_id();
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| io(work, std::io::Error::other(e)))?;
    cloudlet_qemu::files::write_atomic(&work.join("manifest.json"), &json)
        .map_err(|e| io(work, e))?;
    let dest = store.base_dir(name);
    if dest.exists() {
        let old = store
            .bases_dir()
            .join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| io(&dest, e))?;
        let _ = std::fs::remove_dir_all(old);
    }
    std::fs::rename(work, &dest).map_err(|e| io(&dest, e))?;
    tracing::info!(%name, id = %manifest.id, "base VM built");
    Ok(manifest)
}

/// Boot the staged disk, wait for the agent, settle, save paused; fold the
/// writes made during boot into `disk.raw`.
async fn capture_booted_state(
    work: &Path,
    machine: &MachineConfig,
    accel: cloudlet_qemu::Accel,
) -> Result<(), BuildBaseError> {
    let top = work.join("boot.qcow2");
    create_top(&work.join("disk.raw"), &top)?;
    let mut m = machine.clone();
    m.kernel = work.join(&machine.kernel);
    m.initrd = work.join(&machine.initrd);
    let spec = cloudlet_qemu::VmSpec {
        name: "base-build".into(),
        machine: m,
        accel,
        ram_path: work.join("memory.ram"),
        disk_path: top.clone(),
        disk_format: cloudlet_qemu::spec::DiskFormat::Qcow2,
        lazy_disk: None,
        ports: vec![],
        run_dir: work.join("run"),
        confine: None,
    };
    tracing::info!("booting the base VM");
    let vm = Vm::boot(spec).await?;
    let captured = async {
        let mut agent = vm
            .agent(Duration::from_secs(300))
            .await
            .map_err(|e| agent_error(&vm, e.to_string()))?;
        // Let boot-time work finish, then leave memory lean: clean caches
        // dropped (freed pages are zeroed: init_on_free=1), disk trimmed.
        tokio::time::sleep(Duration::from_secs(2)).await;
        agent
            .sync(true, true)
            .await
            .map_err(|e| agent_error(&vm, e.to_string()))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        vm.save_device_state(&work.join("state")).await?;
        Ok::<_, BuildBaseError>(())
    }
    .await;
    vm.quit(Duration::from_secs(10)).await;
    captured?;
    commit_top(&top)?;
    let _ = std::fs::remove_file(&top);
    let _ = std::fs::remove_dir_all(work.join("run"));
    Ok(())
}

fn agent_error(vm: &Vm, detail: String) -> BuildBaseError {
    BuildBaseError::Agent {
        detail,
        console: cloudlet_qemu::vm::log_tail(&vm.spec().console_log()),
    }
}

/// A Debian `minbase` tree in `root`, from the cache when the inputs match.
fn stage_debian(root: &Path, cache_dir: &Path) -> Result<(), BuildBaseError> {
    let mirror = std::env::var("CLOUDLET_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let key = blake3::hash(format!("{DEBIAN_SUITE}|minbase|{DEBIAN_INCLUDE}|{mirror}").as_bytes())
        .to_hex()[..16]
        .to_string();
    std::fs::create_dir_all(cache_dir).map_err(|e| io(cache_dir, e))?;
    let tarball = cache_dir.join(format!("debootstrap-{DEBIAN_SUITE}-{key}.tar"));
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    if !tarball.is_file() {
        tracing::info!(%mirror, "debootstrap (this takes a few minutes; cached afterwards)");
        let tree = cache_dir.join(format!(".debootstrap-{key}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tree);
        let out = Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={DEBIAN_INCLUDE}")])
            .arg(DEBIAN_SUITE)
            .arg(&tree)
            .arg(&mirror)
            .output()
            .map_err(|e| BuildBaseError::Tool {
                tool: "debootstrap".into(),
                detail: format!("{e} (install Debian's debootstrap)"),
            })?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tree);
            let log = String::from_utf8_lossy(&out.stderr);
            return Err(BuildBaseError::Tool {
                tool: "debootstrap".into(),
                detail: log.lines().rev().take(5).collect::<Vec<_>>().join(" | "),
            });
        }
        // Package files are not needed in the image.
        let archives = tree.join("var/cache/apt/archives");
        if let Ok(entries) = std::fs::read_dir(&archives) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let partial = tarball.with_extension("partial");
        run(
            "tar",
            Command::new("tar")
                .arg("-C")
                .arg(&tree)
                .arg("-cf")
                .arg(&partial)
                .arg("."),
        )?;
        std::fs::rename(&partial, &tarball).map_err(|e| io(&tarball, e))?;
        let _ = std::fs::remove_dir_all(&tree);
    }
    run(
        "tar",
        Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-xf")
            .arg(&tarball),
    )
}

fn run(tool: &str, cmd: &mut Command) -> Result<(), BuildBaseError> {
    let out = cmd.output().map_err(|e| BuildBaseError::Tool {
        tool: tool.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(BuildBaseError::Tool {
            tool: tool.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
