//! Test cgroups: a cgroup made for one test (of one controller: `memory`, `pids`), and the
//! test's child run inside it.
//!
//! The test process itself stays out of the cgroup (the harness runs other tests beside it):
//! a test makes a cgroup of its own with [`Cgroup::new`] and runs its binary again inside it,
//! for one `child_*` test ([`Cgroup::run`]), with [`CHILD_ENV`] set to the cgroup's name. The
//! shell that starts the child writes its own pid into the cgroup before it execs, so the child
//! (and every process it forks) is in the cgroup from its start. Without [`CHILD_ENV`] a
//! `child_*` test does nothing ([`child_cgroup`]). Where no cgroup can be made (not root, no
//! such controller, a read-only mount), [`or_skip`] says why and the test passes.
//!
//! Both hierarchies: cgroup v2 where `/sys/fs/cgroup/cgroup.controllers` exists (the test
//! cgroup is made at its root, with the controller enabled in the root's
//! `cgroup.subtree_control`), else cgroup v1 with the controller mounted at
//! `/sys/fs/cgroup/<controller>` (the test cgroup is made below this process's own cgroup of
//! that controller, so that its limits apply too).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Set in a child run inside a test cgroup: the cgroup's name (its last path component).
pub const CHILD_ENV: &str = "SHMEXEC_TEST_CGROUP";

/// How long a child may run before the test kills it.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// The root of a cgroup v2 hierarchy (and of the v1 controller mounts).
const ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A cgroup made for one test, removed on drop (after its processes are gone).
pub struct Cgroup {
    dir: PathBuf,
    version: Version,
}

impl Cgroup {
    /// A new, uniquely named cgroup of `controller` (no limit set yet), or why none can be made.
    pub fn new(controller: &str) -> Result<Cgroup, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let (parent, version) = parent_dir(controller)?;
        let name = format!(
            "shmexec-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Cgroup { dir, version })
    }

    pub fn name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Writes `value` to the cgroup's `file` (`pids.max`, `memory.max`...).
    pub fn write(&self, file: &str, value: &str) -> Result<(), String> {
        write_in(&self.dir, file, value)
    }

    /// Runs the test `test` of this binary inside the cgroup, as a child (see the module doc),
    /// and kills it past [`CHILD_DEADLINE`].
    pub fn run(&self, test: &str) -> Output {
        let exe = std::env::current_exe().unwrap();
        let procs = self.dir.join("cgroup.procs");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(&procs)
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, self.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > CHILD_DEADLINE {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // rmdir fails while the cgroup has processes: a child's workers may take a moment to
        // follow it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.dir.exists() {
            eprintln!("could not remove the test cgroup {}", self.dir.display());
        }
    }
}

/// Writes `value` to `dir/file`.
pub fn write_in(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| format!("cannot write {value} to {}/{file}: {e}", dir.display()))
}

/// The number in `dir/file` (`pids.current`), or after `key ` on one of its lines
/// (`pids.events`: `max 3`, `memory.events`: `oom_kill 1`) when `key` is given.
pub fn read_number(dir: &Path, file: &str, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    match key {
        None => text.trim().parse().ok(),
        Some(key) => text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|n| n.trim().parse().ok()),
    }
}

/// Where to make a test cgroup of `controller`: at the root of a v2 hierarchy that has the
/// controller (elsewhere a v2 cgroup with processes cannot have children with controllers),
/// or below this process's own v1 cgroup of that controller (so that its parent's limits
/// apply too).
fn parent_dir(controller: &str) -> Result<(PathBuf, Version), String> {
    let v2 = Path::new(ROOT);
    if let Ok(controllers) = std::fs::read_to_string(v2.join("cgroup.controllers")) {
        if !controllers.split_whitespace().any(|c| c == controller) {
            return Err(format!("cgroup v2 without the {controller} controller"));
        }
        let subtree =
            std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
        if !subtree.split_whitespace().any(|c| c == controller) {
            std::fs::write(v2.join("cgroup.subtree_control"), format!("+{controller}")).map_err(
                |e| format!("cannot enable the {controller} controller for children: {e}"),
            )?;
        }
        return Ok((v2.to_path_buf(), Version::V2));
    }
    let v1 = v2.join(controller);
    if !v1.join("cgroup.procs").exists() {
        return Err(format!(
            "no {controller} cgroup controller mounted at {}",
            v1.display()
        ));
    }
    let own = own_dir(controller)
        .filter(|dir| dir.join("cgroup.procs").exists())
        .unwrap_or(v1);
    Ok((own, Version::V1))
}

/// The directory of this process's own cgroup of `controller` (v1), or of its v2 cgroup, as
/// `/proc/self/cgroup` names it.
pub fn own_dir(controller: &str) -> Option<PathBuf> {
    let root = Path::new(ROOT);
    let v2 = root.join("cgroup.controllers").exists();
    std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            if v2 {
                controllers.is_empty().then(|| root.join(path))
            } else {
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| root.join(controller).join(path))
            }
        })
}

/// A cgroup of `controller` for this test, set up by `setup` (its limits), or `None` (said on
/// stderr) where none can be made or set up.
pub fn or_skip(
    controller: &str,
    setup: impl FnOnce(&Cgroup) -> Result<(), String>,
) -> Option<Cgroup> {
    match Cgroup::new(controller).and_then(|cgroup| setup(&cgroup).map(|()| cgroup)) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            eprintln!("skipped: no test {controller} cgroup: {why}");
            None
        }
    }
}

/// Panics unless the child exited 0 after running its one test.
pub fn assert_child_passed(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child stdout\n{stdout}--- child stderr\n{stderr}---");
    assert!(
        out.status.success(),
        "the child in the cgroup ended with {:?} (signal 9: killed, by the OOM killer or past \
         the deadline; exit 101: its test failed)",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}

/// The name of the test cgroup this process runs in, if it is a child.
pub fn child_cgroup() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}
