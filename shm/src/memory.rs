//! How much memory this process may still take, which limit says so, and how to make a process
//! the one the kernel's OOM killer prefers.
//!
//! Shared segments are allocated up front (see [`crate::segment`]), so the pages must exist when
//! they are asked for. Three kinds of limit can refuse them, and only one of them fails cleanly:
//!
//! | limit                                               | past it                            |
//! |-----------------------------------------------------|------------------------------------|
//! | a memory cgroup: v2 `memory.max`, v1 `memory.limit_in_bytes`, the process's own or an ancestor's | the cgroup's OOM killer kills one of its processes, often the one that allocated |
//! | the machine's `MemAvailable`                        | reclaim, then the global OOM killer |
//! | `RLIMIT_AS` (`ulimit -v`)                           | `mmap` fails with `ENOMEM`          |
//!
//! `fallocate` on shmem does not fail at a cgroup's limit: it charges the cgroup past it and the
//! OOM killer ends a process, typically the one that asked, with SIGKILL instead of an error.
//! [`headroom`] reads every limit and returns the tightest, with a description of it, so a
//! caller can refuse in time and say which limit to raise or which setting to lower.
//!
//! Rules:
//! - **Unreadable means unlimited.** A file that is missing or malformed (no cgroup mounted, a
//!   root cgroup without `memory.max`, `/proc` hidden) is "no such limit", never an error: the
//!   check is there to turn a kill into an error, not to refuse where it cannot see.
//! - **The tightest wins**, over the process's cgroup and every ancestor visible in the mount
//!   (a parent's limit covers its children's usage too).
//! - **Reclaimable page cache is not "in use".** A cgroup's usage counts the file cache of the
//!   files its processes read, which the kernel drops before it kills anything; a long-lived
//!   container is usually near its limit that way. [`headroom`] subtracts the cgroup's file pages
//!   (`active_file` + `inactive_file`, which leave out shmem) from its usage. Dirty pages are
//!   among them and are slower to reclaim: a caller keeps a margin.
//!
//! ```
//! let room = shmexec_shm::memory::headroom();
//! println!("{} left under {}", shmexec_shm::memory::Bytes(room.available), room.limit);
//! assert!(room.available > 0);
//! ```
//!
//! Assumes: Linux (`/proc`, cgroup v1 or v2).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// v1's `memory.limit_in_bytes` when no limit is set: `i64::MAX` rounded down to a page.
pub const CGROUP_V1_UNLIMITED: u64 = 9_223_372_036_854_771_712;

/// The memory this process may still take, and the limit that leaves the least.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Headroom {
    /// Bytes that may still be allocated before `limit` is reached.
    pub available: u64,
    /// Which limit it is.
    pub limit: Limit,
}

/// One of the limits [`headroom`] reads. Its `Display` names it the way an error message should
/// ("memory cgroup /batch/job7 (memory.max = 200 MiB, 12 MiB in use)").
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// A memory cgroup: the process's own or an ancestor.
    Cgroup {
        /// The cgroup's path in its hierarchy, as `/proc/self/cgroup` writes it.
        path: String,
        /// The file the limit was read from (`memory.max` or `memory.limit_in_bytes`).
        file: &'static str,
        /// The limit in bytes.
        max: u64,
        /// The cgroup's usage (`memory.current`, `memory.usage_in_bytes`) in bytes.
        usage: u64,
        /// The part of `usage` that is file cache the kernel can reclaim.
        reclaimable: u64,
    },
    /// The machine's `MemAvailable` in `/proc/meminfo` (free RAM from `sysinfo` where that file
    /// cannot be read).
    MemAvailable,
    /// The process's address-space limit, `RLIMIT_AS`.
    AddressSpace {
        /// The soft limit in bytes.
        max: u64,
        /// The address space mapped now (`VmSize`).
        mapped: u64,
    },
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Cgroup {
                path,
                file,
                max,
                usage,
                reclaimable,
            } => {
                let in_use = usage.saturating_sub(*reclaimable);
                write!(
                    f,
                    "memory cgroup {path} ({file} = {}, {} in use",
                    Bytes(*max),
                    Bytes(in_use)
                )?;
                if *reclaimable > 0 {
                    write!(
                        f,
                        " besides {} of reclaimable file cache",
                        Bytes(*reclaimable)
                    )?;
                }
                f.write_str(")")
            }
            Limit::MemAvailable => f.write_str("the machine's available memory (MemAvailable)"),
            Limit::AddressSpace { max, mapped } => write!(
                f,
                "the address-space limit RLIMIT_AS (ulimit -v) of {}, {} mapped",
                Bytes(*max),
                Bytes(*mapped)
            ),
        }
    }
}

/// A byte count written for people: `200 MiB`, `1.5 GiB`, `4 KiB`, `100 bytes`.
///
/// ```
/// use shmexec_shm::memory::Bytes;
/// assert_eq!(Bytes(200 << 20).to_string(), "200 MiB");
/// assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
/// assert_eq!(Bytes(100).to_string(), "100 bytes");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} bytes", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        // One decimal, dropped when it is zero: "1.5 GiB", "200 MiB".
        let tenths = (value * 10.0).round() / 10.0;
        if tenths.fract() == 0.0 {
            write!(f, "{tenths:.0} {}", UNITS[unit])
        } else {
            write!(f, "{tenths:.1} {}", UNITS[unit])
        }
    }
}

/// The tightest memory limit over this process: its memory cgroups (v2 and v1, with their
/// ancestors), the machine's `MemAvailable` and `RLIMIT_AS`.
pub fn headroom() -> Headroom {
    let proc_cgroup = read("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = read("/proc/self/mountinfo").unwrap_or_default();
    let mut limits: Vec<Headroom> = Vec::new();
    for dir in cgroup_dirs(&proc_cgroup, &mountinfo) {
        limits.extend(dir.limits());
    }
    limits.extend(address_space());
    let machine = Headroom {
        available: mem_available(),
        limit: Limit::MemAvailable,
    };
    limits.into_iter().fold(machine, |tightest, h| {
        if h.available < tightest.available {
            h
        } else {
            tightest
        }
    })
}

/// Refuses a segment of `len` bytes that [`headroom`] says cannot be backed, with the limit in
/// the error.
pub(crate) fn ensure_fits(len: u64) -> Result<()> {
    let room = headroom();
    if charge(len).is_none_or(|c| c > room.available) {
        return Err(out_of_memory(len, room));
    }
    Ok(())
}

/// The error for a segment of `requested` bytes that does not fit `room`.
pub(crate) fn out_of_memory(requested: u64, room: Headroom) -> Error {
    Error::OutOfMemory {
        requested,
        available: room.available,
        limit: room.limit.to_string(),
    }
}

/// What a shared segment of `len` bytes costs: its length rounded up to whole pages, the unit
/// the kernel allocates and charges. `None` if that overflows.
pub fn charge(len: u64) -> Option<u64> {
    len.checked_next_multiple_of(page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system; it takes no pointer and any name
    // is a valid argument (an unknown one returns -1).
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Raises this process's OOM score adjustment (`/proc/self/oom_score_adj`) by `by`, capped at
/// 1000 (the most the kernel accepts), and returns the new value. The kernel's OOM killer then
/// picks this process before peers that use as much memory or somewhat more: a child that
/// leaks dies, not the parent that maps every segment and would take its other children down
/// with it. Raising needs no privilege; the adjustment is inherited across fork and exec.
pub fn raise_oom_score(by: i32) -> Result<i32> {
    let path = "/proc/self/oom_score_adj";
    let current: i32 = std::fs::read_to_string(path)
        .map_err(|e| Error::os("read /proc/self/oom_score_adj", e))?
        .trim()
        .parse()
        .map_err(|_| Error::InvalidArgument {
            what: "/proc/self/oom_score_adj does not hold a number".into(),
        })?;
    let raised = current.saturating_add(by).clamp(-1000, 1000);
    std::fs::write(path, format!("{raised}\n"))
        .map_err(|e| Error::os("write /proc/self/oom_score_adj", e))?;
    Ok(raised)
}

/// This process's OOM score adjustment, `None` where it cannot be read.
pub fn oom_score_adj() -> Option<i32> {
    read("/proc/self/oom_score_adj")?.trim().parse().ok()
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// The cgroup version of a directory, which names its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl Version {
    fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    fn usage_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    /// The `memory.stat` keys of the file cache in the cgroup and its descendants (what the
    /// usage file counts).
    fn file_keys(self) -> [&'static str; 2] {
        match self {
            Version::V1 => ["total_active_file", "total_inactive_file"],
            Version::V2 => ["active_file", "inactive_file"],
        }
    }
}

/// A memory cgroup this process is in, where its files are, and how far up its ancestors'
/// limits apply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CgroupDir {
    version: Version,
    /// The process's cgroup directory.
    dir: PathBuf,
    /// The mount point: the highest ancestor visible here.
    mount: PathBuf,
    /// The cgroup path of `mount` in its hierarchy (the mount's root), to name an ancestor.
    mount_root: String,
}

impl CgroupDir {
    /// The headroom under this cgroup and under each ancestor up to the mount point.
    fn limits(&self) -> Vec<Headroom> {
        // v1 with use_hierarchy off (old kernels): a parent neither limits nor counts a child.
        let hierarchical = self.version == Version::V2
            || read(self.dir.join("memory.use_hierarchy")).is_none_or(|s| s.trim() != "0");
        let mut out = Vec::new();
        let mut dir = self.dir.as_path();
        loop {
            out.extend(self.limit_at(dir));
            if !hierarchical || dir == self.mount {
                break;
            }
            match dir.parent() {
                Some(parent) if parent.starts_with(&self.mount) => dir = parent,
                _ => break,
            }
        }
        out
    }

    fn limit_at(&self, dir: &Path) -> Option<Headroom> {
        let file = self.version.limit_file();
        let max = parse_limit(&read(dir.join(file))?)?;
        let usage = read_u64(&dir.join(self.version.usage_file()))?;
        let reclaimable = read(dir.join("memory.stat"))
            .map(|stat| file_cache(&stat, self.version.file_keys()))
            .unwrap_or(0)
            .min(usage);
        let rel = dir.strip_prefix(&self.mount).unwrap_or(Path::new(""));
        let path = join_cgroup_path(&self.mount_root, rel);
        Some(Headroom {
            available: max.saturating_sub(usage - reclaimable),
            limit: Limit::Cgroup {
                path,
                file,
                max,
                usage,
                reclaimable,
            },
        })
    }
}

/// A limit file's value: `None` for "max" (v2) or v1's no-limit value.
fn parse_limit(text: &str) -> Option<u64> {
    let v = text.trim().parse::<u64>().ok()?;
    (v < CGROUP_V1_UNLIMITED).then_some(v)
}

fn file_cache(stat: &str, keys: [&str; 2]) -> u64 {
    stat.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| keys.contains(k))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .fold(0u64, u64::saturating_add)
}

/// `/a/b` joined with a relative path below it, as a cgroup path.
fn join_cgroup_path(root: &str, rel: &Path) -> String {
    let mut path = root.trim_end_matches('/').to_owned();
    for part in rel.iter() {
        path.push('/');
        path.push_str(&part.to_string_lossy());
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

/// The memory cgroups of this process, from the text of `/proc/self/cgroup` and
/// `/proc/self/mountinfo`: its v2 cgroup (if a cgroup2 file system is mounted) and its v1
/// memory cgroup (if the memory controller is mounted).
fn cgroup_dirs(proc_cgroup: &str, mountinfo: &str) -> Vec<CgroupDir> {
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut dirs = Vec::new();
    for line in proc_cgroup.lines() {
        // hierarchy-ID:controller-list:cgroup-path; the path may itself hold ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (version, mount) = if id == "0" && controllers.is_empty() {
            (Version::V2, mounts.iter().find(|m| m.fstype == "cgroup2"))
        } else if controllers.split(',').any(|c| c == "memory") {
            let memory = |m: &&Mount| {
                m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == "memory")
            };
            (Version::V1, mounts.iter().find(memory))
        } else {
            continue;
        };
        if let Some(mount) = mount {
            dirs.push(mount.dir_of(version, path));
        }
    }
    dirs
}

/// A line of `/proc/self/mountinfo`, the fields we need.
#[derive(Debug)]
struct Mount<'a> {
    /// The directory of the mounted file system that appears at the mount point.
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    super_options: &'a str,
}

impl<'a> Mount<'a> {
    /// `id parent major:minor root point options [optional...] - fstype source super-options`
    fn parse(line: &'a str) -> Option<Mount<'a>> {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let (_id, _parent, _dev) = (l.next()?, l.next()?, l.next()?);
        let (root, point) = (l.next()?, l.next()?);
        let mut r = right.split(' ');
        let (fstype, _source) = (r.next()?, r.next()?);
        Some(Mount {
            root,
            point,
            fstype,
            super_options: r.next().unwrap_or(""),
        })
    }

    /// Where the cgroup `path` of this hierarchy is below the mount point. In a container the
    /// mount's root is often the container's own cgroup (`/docker/<id>`) while
    /// `/proc/self/cgroup` names the full path: the root is stripped. A path outside the
    /// mount's root cannot be seen; its nearest visible cgroup is the mount point.
    fn dir_of(&self, version: Version, path: &str) -> CgroupDir {
        let root = self.root.trim_end_matches('/');
        let rel = match path.strip_prefix(root) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => "",
        };
        let mount = PathBuf::from(unescape(self.point));
        let dir = mount.join(rel.trim_start_matches('/'));
        CgroupDir {
            version,
            dir,
            mount,
            mount_root: if root.is_empty() {
                "/".into()
            } else {
                root.into()
            },
        }
    }
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `MemAvailable` from `/proc/meminfo`, or free RAM from `sysinfo` where that file is unreadable.
fn mem_available() -> u64 {
    let from_meminfo = read("/proc/meminfo").and_then(|s| status_kib(&s, "MemAvailable:"));
    from_meminfo.unwrap_or_else(|| {
        let info = rustix::system::sysinfo();
        (info.freeram as u64).saturating_mul(u64::from(info.mem_unit))
    })
}

/// The value of a `Key:   1234 kB` line, in bytes.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib.saturating_mul(1024))
}

/// The headroom under `RLIMIT_AS`, if one is set.
fn address_space() -> Option<Headroom> {
    let max = rustix::process::getrlimit(rustix::process::Resource::As).current?;
    let mapped = read("/proc/self/status").and_then(|s| status_kib(&s, "VmSize:"))?;
    Some(Headroom {
        available: max.saturating_sub(mapped),
        limit: Limit::AddressSpace { max, mapped },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_host_with_both_versions_has_both_cgroups() {
        let cgroup = "4:memory:/jobs/x\n1:cpu:/\n0::/\n";
        let dirs = cgroup_dirs(cgroup, HOST_V1);
        assert_eq!(dirs.len(), 2, "{dirs:?}");
        assert_eq!(dirs[0].version, Version::V1);
        assert_eq!(dirs[0].dir, Path::new("/sys/fs/cgroup/memory/jobs/x"));
        assert_eq!(dirs[0].mount, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(dirs[1].version, Version::V2);
        assert_eq!(dirs[1].dir, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn a_container_mount_root_is_stripped_from_the_path() {
        let mountinfo = "\
700 600 0:40 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
701 600 0:41 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw
";
        let dirs = cgroup_dirs("5:memory:/docker/abc/sub\n", mountinfo);
        assert_eq!(dirs[0].dir, Path::new("/sys/fs/cgroup/memory/sub"));
        assert_eq!(dirs[0].mount_root, "/docker/abc");
        // A path outside the mount's root: the mount point is the nearest visible cgroup.
        let dirs = cgroup_dirs("0::/elsewhere\n", mountinfo);
        assert_eq!(dirs[0].dir, Path::new("/sys/fs/cgroup"));
        // A prefix that is not a whole component is not the root.
        let dirs = cgroup_dirs("0::/kubepods/pod10\n", mountinfo);
        assert_eq!(dirs[0].dir, Path::new("/sys/fs/cgroup"));
        let dirs = cgroup_dirs("0::/kubepods/pod1/app\n", mountinfo);
        assert_eq!(dirs[0].dir, Path::new("/sys/fs/cgroup/app"));
        assert_eq!(
            join_cgroup_path(&dirs[0].mount_root, Path::new("app")),
            "/kubepods/pod1/app"
        );
    }

    #[test]
    fn no_controller_mounted_means_no_cgroup() {
        assert!(cgroup_dirs("4:memory:/x\n", "").is_empty());
        assert!(cgroup_dirs("", HOST_V1).is_empty());
        assert!(cgroup_dirs("1:cpu:/x\n", HOST_V1).is_empty());
    }

    #[test]
    fn limit_values() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("209715200\n"), Some(200 << 20));
        let stat = "cache 10\ntotal_active_file 4096\ntotal_inactive_file 8192\nactive_file 1\n";
        assert_eq!(file_cache(stat, Version::V1.file_keys()), 12288);
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(join_cgroup_path("/", Path::new("")), "/");
        assert_eq!(join_cgroup_path("/", Path::new("a/b")), "/a/b");
    }

    #[test]
    fn limits_name_themselves() {
        let limit = Limit::Cgroup {
            path: "/jobs/x".into(),
            file: "memory.limit_in_bytes",
            max: 200 << 20,
            usage: 15 << 20,
            reclaimable: 3 << 20,
        };
        assert_eq!(
            limit.to_string(),
            "memory cgroup /jobs/x (memory.limit_in_bytes = 200 MiB, 12 MiB in use besides \
             3 MiB of reclaimable file cache)"
        );
        assert_eq!(Bytes(1023).to_string(), "1023 bytes");
        assert_eq!(Bytes(u64::MAX).to_string(), "16 EiB");
    }

    #[test]
    fn this_process_has_some_headroom() {
        let room = headroom();
        println!("{} under {}", Bytes(room.available), room.limit);
        assert!(room.available > 0, "{room:?}");
        assert!(room.available <= mem_available(), "{room:?}");
    }
}
